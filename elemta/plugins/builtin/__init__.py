"""The built-in plugins; each imports only elemta.plugins.api."""
