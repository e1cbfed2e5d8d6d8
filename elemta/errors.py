"""The exception hierarchy shared by every layer. Imports nothing from elemta."""


class ElemtaError(Exception):
    """Base of every error elemta raises on purpose."""


class ConfigError(ElemtaError):
    """A configuration problem; the message names the key path and what is allowed."""


class QueueError(ElemtaError):
    """The queue could not take or change a message; transient (the client may retry)."""


class QueueFullError(QueueError):
    """No room: the disk is (nearly) full or a queue quota is reached (452 4.3.1)."""
