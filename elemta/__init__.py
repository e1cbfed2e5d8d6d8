"""elemta: a mail transfer agent for people who run their own mail servers."""

__version__ = "0.1.0"
