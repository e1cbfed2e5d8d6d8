"""What the parts of an SMTP session see of it.  Session (session.py) owns the input loop, the
state and the session-level commands; its parts are objects it holds, each with its own state:
MailTransaction (transaction.py: MAIL, RCPT, DATA, BDAT and the message being received),
Login (login.py: the AUTH command) and PluginHooks (hooks.py: the plugins' view and verdicts).

SessionView is the one contract between them: the session's facts a part reads
(context.SessionFacts, all PluginHooks needs), and the session's methods a part calls to
answer (an error counts against the session's budget; a move of state is checked against
context.TRANSITIONS).  A part touches nothing else of the
session, so what each needs is written here rather than found by reading session.py.
"""

from __future__ import annotations

from typing import Protocol

from elemta.smtp.context import Output, SessionFacts, State
from elemta.smtp.hooks import PluginHooks
from elemta.smtp.replies import Reply


class SessionView(SessionFacts, Protocol):
    state: State
    verb: str  # the command being answered, for metrics
    hooks: PluginHooks

    def in_transaction(self) -> bool:
        """MAIL was accepted and the transaction is not over."""

    def enter(self, state: State) -> None:
        """Move to state (TRANSITIONS allows it, else a bug: RuntimeError)."""

    def error(self, reply: Reply) -> list[Output]:
        """A negative reply; 5yz ones count against the error budget (then 421 and close)."""

    def out_of_sequence(self, why: str) -> list[Output]:
        """503 5.5.1 with why, through error()."""

    def syntax_error(self, usage: str) -> list[Output]:
        """501 5.5.4 with the usage, through error()."""

    def close_with(self, reply: Reply) -> list[Output]:
        """The last reply, then Close."""

    def input_pending(self) -> bool:
        """Input came after the command being answered (pipelined, RFC 2920)."""

    def input_before_reply(self) -> list[Output]:
        """The client did not wait for a reply it had to wait for: 554 and close."""

    def after_queue(self, reply: Reply) -> list[Output]:
        """The transaction is over with reply; go on with any input that waited."""
