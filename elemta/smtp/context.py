"""What a session is given and what it gives back: its settings, client and services, the
outputs it asks the server to act on, and its states with the moves between them.  Plain
data, no behaviour."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from elemta.config import SUBMISSION_ROLES
from elemta.local import LocalRecipients
from elemta.plugins.manager import Manager
from elemta.queue.model import NewMessage
from elemta.smtp.auth import Verifier
from elemta.smtp.replies import Reply
from elemta.smtp.tls import TlsInfo


@dataclass(frozen=True)
class Enqueue:
    """Output: store this message, then call enqueued() or enqueue_failed()."""

    message: NewMessage


@dataclass(frozen=True)
class StartTls:
    """Output, after the 220 to STARTTLS: start the TLS handshake, then call tls_started()."""


@dataclass(frozen=True)
class Close:
    """Output, after the last reply: close the connection (QUIT, a 421, too many errors)."""


# What feed() and the other entry points give back, in the order the server acts on them.
Output = Reply | Enqueue | StartTls | Close


@dataclass(frozen=True)
class Settings:
    """What a session needs from the configuration; built once per listener, not per client."""

    hostname: str
    role: str = "mx"  # "mx", "submission" or "submissions"
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
    starttls: bool = False  # offer STARTTLS (a certificate is loaded; not on implicit TLS)
    auth_mechanisms: tuple[str, ...] = ()  # SASL mechanisms offered (with a password file)
    auth_max_failures: int = 3
    sender_logins: dict | None = None  # user -> allowed senders, smtp.sender_logins
    authserv_id: str = ""  # smtp.authserv_id; "" = hostname

    @property
    def submission(self) -> bool:
        return self.role in SUBMISSION_ROLES


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
    verifier: Verifier | None = None  # checks passwords (passwords.PasswordFile); None = no AUTH
    guard: Guard | None = None  # flood protection (smtp/limits.py); None = no limits
    plugins: Manager | None = None  # None = no plugins


class SessionFacts(Protocol):
    """What the session knows of its client, as its parts read it (smtp/parts.py)."""

    settings: Settings
    client: Client
    services: Services
    tls: TlsInfo | None  # once TLS is up
    user: str | None  # the authenticated user
    helo: str | None  # the name given in HELO/EHLO; None before it
    esmtp: bool  # EHLO rather than HELO


class Guard:
    """The rate limits a session asks about; this base class limits nothing.

    Each check counts the event when it is allowed and returns None, or returns the
    refusal to send (the event is then not counted).
    """

    def auth_locked(self, ip: str) -> bool:
        return False

    def auth_failed(self, ip: str) -> None:
        return None

    def mail(self, client: Client, sender: str, user: str | None, size: int) -> Reply | None:
        return None

    def rcpt(self, client: Client, user: str | None) -> Reply | None:
        return None

    def message(self, client: Client, size: int) -> None:
        return None


class State(enum.Enum):
    """Where a session is.  The moves it may make are TRANSITIONS; Session.enter() keeps to them."""

    COMMAND = "command"  # waiting for a command line
    DATA = "data"  # reading message text up to CRLF.CRLF (after the 354)
    BDAT_CHUNK = "bdat chunk"  # reading the octets a BDAT announced (RFC 3030 §2)
    WAIT_QUEUE = "wait queue"  # the message is being stored: input waits for enqueued()
    AUTH = "auth"  # an AUTH exchange waits for the client's next line (RFC 4954 §4)
    TLS_WAIT = "tls wait"  # the 220 to STARTTLS went out: the handshake comes next (RFC 3207 §4)
    CLOSED = "closed"  # the last reply went out; the server closes the connection

    # Members are singletons compared by identity, so identity hashing agrees with equality;
    # Enum's own __hash__ is Python code (hash of the name), run at every TRANSITIONS lookup.
    __hash__ = object.__hash__


COMMAND, DATA, BDAT_CHUNK, WAIT_QUEUE = State.COMMAND, State.DATA, State.BDAT_CHUNK, State.WAIT_QUEUE
AUTH, TLS_WAIT, CLOSED = State.AUTH, State.TLS_WAIT, State.CLOSED

# From each state, the states a session may go to.  CLOSED is reachable from every state but
# itself is the end (a 421, QUIT, too many errors, a refused connection).
TRANSITIONS: dict[State, frozenset[State]] = {
    # DATA and BDAT start a message, and a message is stored from here: the end of its text
    # (or of its LAST chunk) comes back to COMMAND first, then the transaction is finished.
    # AUTH with an initial response may end at once (COMMAND again); STARTTLS.
    COMMAND: frozenset({COMMAND, DATA, BDAT_CHUNK, WAIT_QUEUE, AUTH, TLS_WAIT, CLOSED}),
    DATA: frozenset({COMMAND, CLOSED}),
    BDAT_CHUNK: frozenset({COMMAND, CLOSED}),
    WAIT_QUEUE: frozenset({COMMAND, CLOSED}),
    AUTH: frozenset({AUTH, COMMAND, CLOSED}),
    TLS_WAIT: frozenset({COMMAND, CLOSED}),
    CLOSED: frozenset(),
}
