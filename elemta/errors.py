"""The exception hierarchy shared by every layer. Imports nothing from elemta."""


class ElemtaError(Exception):
    """Base of every error elemta raises on purpose."""


class ConfigError(ElemtaError):
    """Configuration problems; each names the key path and what is allowed.

    A file can have several: config.parse reports them all at once, so an operator fixes the
    file in one pass.  `problems` holds one line each; str() joins them with newlines, so an
    error with one problem reads as it always did.
    """

    def __init__(self, *problems: str) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(problems))


class QueueError(ElemtaError):
    """The queue could not take or change a message; transient (the client may retry)."""


class QueueFullError(QueueError):
    """No room: the disk is (nearly) full or a queue quota is reached (452 4.3.1)."""
