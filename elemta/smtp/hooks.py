"""The session's side of the plugins: builds each hook's context, asks the manager, and turns
the outcome into a reply or into changes the core makes itself (plugins never touch the
envelope).  A part of smtp/session.py's Session, held as session.hooks; what it reads of the
session is context.SessionFacts.

With no plugins configured every call here returns at once, so the plain path costs a branch.
"""

from __future__ import annotations

from elemta import log as logmod
from elemta.plugins import api
from elemta.plugins.manager import NOTHING, HookResult
from elemta.smtp import headers
from elemta.smtp.context import SessionFacts
from elemta.smtp.replies import Reply


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


class PluginHooks:
    def __init__(self, session: SessionFacts):
        self.session = session
        self.notes: TransactionNotes | None = None  # the transaction's, from MAIL on (with plugins)
        self._connection: api.Connection | None = None  # the plugins' view of the connection
        self._conn_auth_results: dict[str, list[str]] = {}  # hook -> its latest auth results

    def _plugin_connection(self) -> api.Connection:
        s = self.session
        if self._connection is None:
            c = s.client
            self._connection = api.Connection(ip=c.ip, port=c.port, listener=s.settings.listener,
                                              role=s.settings.role, trusted=c.trusted, id=c.conn)
        pc = self._connection
        pc.helo, pc.user = s.helo, s.user
        pc.tls = str(s.tls) if s.tls is not None else None
        return pc

    def run(self, hook: str, **parts) -> HookResult:
        """Run hook's plugins; the outcome's auth results and headers are kept for the message."""
        plugins = self.session.services.plugins
        if plugins is None or not plugins.wants(hook):
            return NOTHING
        notes = self.notes
        ctx = api.Context(hook, self._plugin_connection(), notes.transaction if notes else None, **parts)
        if notes is not None:
            ctx.auth_results = list(notes.auth_results)
        outcome = plugins.run(hook, ctx)
        if outcome.action in ("reject", "defer"):
            pass  # refused: what the plugins added belongs to a command that did not happen
        elif notes is not None and hook in api.MESSAGE_HOOKS:
            notes.add_headers += outcome.add_headers
            notes.remove_headers += outcome.remove_headers
            notes.auth_results += outcome.auth_results
            notes.priority = outcome.priority or notes.priority
            if outcome.action == "discard" and not notes.discard:
                notes.discard = outcome.plugin
            elif outcome.action == "quarantine" and not notes.quarantine:
                notes.quarantine = outcome.verdict.reason or outcome.plugin
        elif outcome.auth_results:
            self._conn_auth_results[hook] = list(outcome.auth_results)  # a second EHLO replaces the first
        if outcome.verdict.final:
            s = self.session
            s.services.log("plugin_verdict", qid=notes.transaction.queue_id if notes else None,
                           ip=s.client.ip, conn=s.client.conn, hook=hook, plugin=outcome.plugin,
                           verdict=outcome.action, **_reply_fields(outcome.verdict))
        return outcome

    def refusal(self, hook: str, **parts) -> Reply | None:
        """Run hook's plugins: the reply for a reject or defer, else None."""
        plugins = self.session.services.plugins
        if plugins is None or not plugins.wants(hook):  # the plain path: one branch per command
            return None
        return self.run(hook, **parts).verdict.reply

    def notice(self, hook: str, **parts) -> None:
        """A hook for something that has happened; what it returns changes nothing."""
        plugins = self.session.services.plugins
        if plugins is not None and plugins.wants(hook):
            notes = self.notes
            plugins.run(hook, api.Context(hook, self._plugin_connection(), notes.transaction if notes else None,
                                          **parts))

    def begin_transaction(self, queue_id: str, sender: str) -> None:
        self.notes = TransactionNotes(api.Transaction(queue_id, sender)) if self.session.services.plugins else None
        if self.notes is not None:
            for results in self._conn_auth_results.values():
                self.notes.auth_results += results

    def end_transaction(self) -> None:
        self.notes = None

    def tls_started(self) -> None:
        """RFC 3207 §4.2: what the plugins made of HELO and AUTH before TLS is gone with them."""
        self._conn_auth_results.pop("on_helo", None)
        self._conn_auth_results.pop("on_auth", None)

    def connect_refusal(self) -> Reply | None:
        """on_connect's refusal as the greeting gives it (RFC 5321 §3.1): a transient one as 421
        (then close), a permanent one as 554 (then only QUIT is served)."""
        refusal = self.refusal("on_connect")
        if refusal is None:
            return None
        if refusal.is_transient:
            return Reply(421, refusal.enhanced, f"{self.session.settings.hostname} {refusal.text}")
        return Reply(554, refusal.enhanced, refusal.text)

    def message_edits(self, text: bytes, queue_id: str) -> bytes:
        """The message with the plugins' header edits and our Authentication-Results, and with
        any arriving Authentication-Results that claim our authserv-id removed (RFC 8601 §5)."""
        settings, services = self.session.settings, self.session.services
        notes, authserv_id = self.notes, settings.authserv_id or settings.hostname
        removed = {name.lower().encode() for name in notes.remove_headers} if notes else set()
        forged = headers.has_auth_results(text)
        if removed or forged:
            def drop(name: bytes, value: bytes) -> bool:
                if name == headers.AUTH_RESULTS and headers.claims_authserv_id(value, authserv_id):
                    services.log("auth_results_removed", qid=queue_id, level=logmod.INFO)
                    return True
                return name in removed
            text = headers.remove_fields(text, drop)
        if notes is None:
            return text
        top = b""
        if notes.auth_results:
            top += headers.authentication_results(authserv_id, notes.auth_results)
        for name, value in notes.add_headers:
            top += headers.field(name, value)
        return top + text


def _reply_fields(v: api.Verdict) -> dict:
    if v.reply is not None:
        return {"reply": f"{v.reply.code} {v.reply.enhanced}", "text": v.reply.text[:120]}
    return {"reason": v.reason} if v.reason else {}
