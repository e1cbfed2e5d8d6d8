"""What a session is given and what it gives back: its settings, client and services, the
outputs it asks the server to act on, and its state numbers.  Plain data, no behaviour."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from elemta.local import LocalRecipients
from elemta.queue.model import NewMessage


@dataclass(frozen=True)
class Enqueue:
    """Output: store this message, then call enqueued() or enqueue_failed()."""

    message: NewMessage


@dataclass(frozen=True)
class Settings:
    """What a session needs from the configuration; built once per listener, not per client."""

    hostname: str
    role: str = "mx"  # "mx" or "submission"
    listener: str = ""
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_errors: int = 20
    max_received_headers: int = 50
    local_domains: frozenset[str] = frozenset()
    relay_domains: frozenset[str] = frozenset()
    auth_required: bool = True
    accept_all: bool = False  # dev mode: every recipient is accepted
    recipients: LocalRecipients | None = None  # who exists in local_domains; None = everyone
    hold: bool = False  # new mail starts held in the queue


@dataclass(frozen=True)
class Client:
    ip: str
    port: int = 0
    trusted: bool = False  # from a trusted network (smtp.trusted_networks)
    conn: int = 0  # the connection's number in the log (connect ... disconnect)


@dataclass(frozen=True)
class Services:
    """What the session asks of the rest of elemta; plain callables, no I/O of its own."""

    new_id: Callable[[], str]
    intake_check: Callable[[], str | None] = lambda: None  # None, or why mail can't be taken now
    log: Callable[..., None] = lambda event, **fields: None  # log(event, qid=..., key=value)
    now: Callable[[], float] = time.time


# Session states
COMMAND, DATA, BDAT_CHUNK, WAIT_QUEUE, CLOSED = range(5)
