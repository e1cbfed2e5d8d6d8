"""Plugins: the API (api.py), the manager (manager.py) and the built-ins (builtin/)."""
