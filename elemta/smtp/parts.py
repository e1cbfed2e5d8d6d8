"""What the parts of an SMTP session share.  Session (session.py) is built from parts:
MailTransaction (transaction.py: MAIL, RCPT, DATA, BDAT) and PluginHooks (hooks.py: the
plugins).  SessionParts declares the state Session.__init__ sets that the parts read and
change, and the session's methods they call, so each part's needs are written down in one
place instead of being found by reading session.py.  The methods are declared for readers and
type checkers only: at run time they are Session's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from elemta.plugins import api
from elemta.plugins.manager import HookResult
from elemta.smtp import dotreader
from elemta.smtp import envelope as env
from elemta.smtp.context import Client, Services, Settings, State
from elemta.smtp.replies import Reply
from elemta.smtp.tls import TlsInfo


class TransactionNotes:
    """What the plugins decided about the message being received, for the core to apply."""

    def __init__(self, transaction: api.Transaction):
        self.transaction = transaction
        self.add_headers: list[tuple[str, str]] = []
        self.remove_headers: list[str] = []
        self.auth_results: list[str] = []
        self.priority: str | None = None
        self.discard = ""  # the plugin that discarded the message, if one did
        self.quarantine = ""  # the reason it is held, if it is
        self.data_seen = False  # on_data has run (BDAT: at the first chunk)


class SessionParts:
    settings: Settings
    client: Client
    services: Services
    tls: TlsInfo | None  # once TLS is up
    user: str | None  # the authenticated user
    helo: str | None  # the name given in HELO/EHLO; None before it
    esmtp: bool  # EHLO rather than HELO
    state: State
    envelope: env.Envelope | None  # the transaction from MAIL on
    errors: int
    refused: bool  # a plugin refused the connection: only QUIT is served
    _verb: str  # the command being answered, for metrics
    _buf: bytearray  # input not yet consumed
    _data: dotreader.DataReader | None  # reading DATA
    _chunks: list[bytes]  # the BDAT chunks of the message so far
    _chunk: dotreader.Chunk | None  # the BDAT chunk being read
    _pconn: api.Connection | None  # the plugins' view of the connection
    _pnotes: TransactionNotes | None  # ... and of the transaction
    _conn_auth_results: dict[str, list[str]]  # hook -> its latest auth results

    if TYPE_CHECKING:
        # session.py
        def _to(self, state: State) -> None: ...
        def _error(self, reply: Reply) -> list: ...
        def _sequence(self, why: str) -> list: ...
        def _syntax(self, usage: str) -> list: ...
        def _reset(self) -> None: ...
        def _after_queue(self, reply: Reply) -> list: ...
        def input_before_reply(self) -> list: ...

        # hooks.py
        def _hook(self, hook: str, **parts: object) -> HookResult: ...
        def _notice(self, hook: str, **parts: object) -> None: ...
        def _begin_transaction(self, queue_id: str, sender: str) -> None: ...
        def _message_edits(self, text: bytes) -> bytes: ...
        @staticmethod
        def _refusal(outcome: HookResult) -> Reply | None: ...
