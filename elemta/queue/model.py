"""Plain value types handed to the queue store, and the small vocabularies it stores.

Nothing here touches SQLite: sessions build a NewMessage while receiving mail and
hand it to Store.enqueue(), which owns every database detail.
"""

from __future__ import annotations

from dataclasses import dataclass

from elemta.priorities import PRIORITIES

__all__ = ["PRIORITIES", "STATES", "UNDELIVERED_STATES", "NewMessage", "NewRecipient", "priority_value",
           "recipient_domain"]

# Per-recipient delivery states, stored as these exact TEXT values (see schema.py).
STATES = ("queued", "active", "deferred", "held", "delivered", "failed")

# States in which a recipient still needs work; used for quotas and scheduling.
UNDELIVERED_STATES = ("queued", "active", "deferred", "held")


def priority_value(name: str) -> int:
    """The integer stored for a priority name; ValueError for an unknown name."""
    try:
        return PRIORITIES.index(name)
    except ValueError:
        raise ValueError(f"unknown priority {name!r}; expected one of {', '.join(PRIORITIES)}") from None


def recipient_domain(address: str) -> str:
    """Lower-cased part after the last '@', or '' when there is none (e.g. 'postmaster')."""
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""


@dataclass(frozen=True)
class NewRecipient:
    address: str
    orcpt: str | None = None  # RFC 3461 ORCPT as 'type;addr' text, e.g. 'rfc822;bob@example.org'
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY keywords, e.g. ('SUCCESS', 'FAILURE'); () = not given


@dataclass(frozen=True)
class NewMessage:
    queue_id: str
    sender: str  # '' for the null reverse-path <>
    recipients: tuple[NewRecipient, ...]
    body: bytes  # the full message as stored: CRLF line endings, Received header already prepended
    priority: str = "normal"
    hold: bool = False  # recipients start 'held' instead of 'queued'
    envid: str | None = None
    ret: str | None = None  # 'FULL' or 'HDRS' (RFC 3461), None if not given
    body_type: str = "7BIT"
    smtputf8: bool = False
    requiretls: bool = False  # RFC 8689: onward only over authenticated TLS, else a bounce
    client_ip: str = ""
    client_helo: str = ""
    listener: str = ""
    received_at: float = 0.0  # unix time; 0.0 means "use the store's clock when written"

    def __post_init__(self) -> None:
        # These are programming errors in the caller, so fail at construction time
        # rather than deep inside the writer thread.
        priority_value(self.priority)
        if not isinstance(self.recipients, tuple) or not self.recipients:
            raise TypeError("a message needs a non-empty tuple of recipients")
        if not isinstance(self.body, bytes):
            raise TypeError("body must be bytes")
