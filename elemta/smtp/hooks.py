"""The session's side of the plugins: builds each hook's context, asks the manager, and turns
the outcome into a reply or into changes the core makes itself (plugins never touch the
envelope).  A part of smtp/session.py's Session, like transaction.py; what it shares with the
session is declared in parts.py.

With no plugins configured every call here returns at once, so the plain path costs a branch.
"""

from __future__ import annotations

from elemta import log as logmod
from elemta.plugins import api
from elemta.plugins.manager import NOTHING, HookResult
from elemta.smtp import headers
from elemta.smtp.parts import SessionParts, TransactionNotes
from elemta.smtp.replies import Reply


class PluginHooks(SessionParts):
    def _plugin_connection(self) -> api.Connection:
        if self._pconn is None:
            c = self.client
            self._pconn = api.Connection(ip=c.ip, port=c.port, listener=self.settings.listener,
                                         role=self.settings.role, trusted=c.trusted, id=c.conn)
        pc = self._pconn
        pc.helo, pc.user = self.helo, self.user
        pc.tls = str(self.tls) if self.tls is not None else None
        return pc

    def _hook(self, hook: str, **parts) -> HookResult:
        """Run hook's plugins; the outcome's auth results and headers are kept for the message."""
        plugins = self.services.plugins
        if plugins is None or not plugins.wants(hook):
            return NOTHING
        notes: TransactionNotes | None = self._pnotes
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
            self.services.log("plugin_verdict", qid=notes.transaction.queue_id if notes else None,
                              ip=self.client.ip, conn=self.client.conn, hook=hook, plugin=outcome.plugin,
                              verdict=outcome.action, **_reply_fields(outcome.verdict))
        return outcome

    def _notice(self, hook: str, **parts) -> None:
        """A hook for something that has happened; what it returns changes nothing."""
        plugins = self.services.plugins
        if plugins is not None and plugins.wants(hook):
            notes = self._pnotes
            plugins.run(hook, api.Context(hook, self._plugin_connection(), notes.transaction if notes else None,
                                          **parts))

    def _begin_transaction(self, queue_id: str, sender: str) -> None:
        self._pnotes = TransactionNotes(api.Transaction(queue_id, sender)) if self.services.plugins else None
        if self._pnotes is not None:
            for results in self._conn_auth_results.values():
                self._pnotes.auth_results += results

    @staticmethod
    def _refusal(outcome: HookResult) -> Reply | None:
        """The reply for a reject or defer, else None."""
        return outcome.verdict.reply

    def _connect_refusal(self) -> Reply | None:
        outcome = self._hook("on_connect")
        refusal = outcome.verdict.reply
        if refusal is None:
            return None
        if refusal.is_transient:  # RFC 5321 §3.1: 421 and close
            return Reply(421, refusal.enhanced, f"{self.settings.hostname} {refusal.text}", close=True)
        self.refused = True  # RFC 5321 §3.1: 554, then wait for QUIT
        return Reply(554, refusal.enhanced, refusal.text)

    def _message_edits(self, text: bytes) -> bytes:
        """The message with the plugins' header edits and our Authentication-Results, and with
        any arriving Authentication-Results that claim our authserv-id removed (RFC 8601 §5)."""
        notes, authserv_id = self._pnotes, self.settings.authserv_id or self.settings.hostname
        removed = {name.lower().encode() for name in notes.remove_headers} if notes else set()
        forged = headers.has_auth_results(text)
        if removed or forged:
            def drop(name: bytes, value: bytes) -> bool:
                if name == headers.AUTH_RESULTS and headers.claims_authserv_id(value, authserv_id):
                    qid = self.envelope.queue_id if self.envelope else None
                    self.services.log("auth_results_removed", qid=qid, level=logmod.INFO)
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
