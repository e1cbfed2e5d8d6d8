"""Plugins for the manager's tests and the daemon's integration tests, loaded by module path
("tests.plugins.sample:Tagger") as any third-party plugin would be."""

from __future__ import annotations

import threading
from typing import ClassVar

from elemta.plugins import api

RELEASE = threading.Event()  # set by a test to let Hangs return


class Tagger(api.Plugin):
    """Adds a header naming itself and an auth result; options: verdict for on_rcpt_to."""

    options: ClassVar[dict] = {"header": "X-Tagged", "rcpt_verdict": "continue", "reject_rcpt": ""}

    def configure(self, options):
        if options["rcpt_verdict"] not in ("continue", "accept", "reject", "defer", "discard", "quarantine"):
            raise api.PluginError("rcpt_verdict: not a verdict")
        self.opts = options

    def on_mail_from(self, ctx):
        return api.proceed(add_headers=((self.opts["header"], f"by {self.name}"),),
                           auth_results=(f"x-{self.name}=pass",))

    def on_rcpt_to(self, ctx):
        if self.opts["reject_rcpt"] and ctx.recipient == self.opts["reject_rcpt"]:
            return api.reject(550, "5.7.1", f"{self.name} refuses {ctx.recipient}")
        action = self.opts["rcpt_verdict"]
        if action == "reject":
            return api.reject(550, "5.7.1", "no thanks")
        if action == "defer":
            return api.defer(450, "4.7.1", "later please")
        if action == "quarantine":
            return api.quarantine("sample")
        return api.Verdict(action)

    def on_message(self, ctx):
        return api.proceed(priority="high", auth_results=(f"x-seen={len(ctx.auth_results)}",))


class Raises(api.Plugin):
    def on_mail_from(self, ctx):
        raise RuntimeError("plugin bug")

    def on_connect(self, ctx):
        raise RuntimeError("plugin bug at connect")


class Hangs(api.Plugin):
    options: ClassVar[dict] = {"hook": "on_mail_from"}

    def configure(self, options):
        self.hook = options["hook"]

    def _hang(self, ctx):
        RELEASE.wait(60)
        return api.reject(550, "5.7.1", "too late to count")

    def on_mail_from(self, ctx):
        return self._hang(ctx) if self.hook == "on_mail_from" else None

    def on_message(self, ctx):
        return self._hang(ctx) if self.hook == "on_message" else None


class Garbage(api.Plugin):
    def on_mail_from(self, ctx):
        return "OK"  # not a Verdict

    def on_helo(self, ctx):
        return api.DISCARD  # not a verdict on_helo may give


class Recorder(api.Plugin):
    """Remembers every hook it saw (for the delivery and notice hooks)."""

    seen: ClassVar[list] = []

    def _note(self, ctx):
        Recorder.seen.append((ctx.hook, ctx))

    on_connect = on_helo = on_auth = on_mail_from = on_rcpt_to = on_data = on_message = _note
    on_enqueue = on_pre_delivery = on_delivery_success = on_delivery_failure = on_disconnect = _note


class Gate(api.Plugin):
    """Refuses at on_connect or quarantines/discards at on_message, as its options say."""

    options: ClassVar[dict] = {"connect": "continue", "message": "continue"}

    def configure(self, options):
        self.opts = options

    def on_connect(self, ctx):
        if self.opts["connect"] == "reject":
            return api.reject(554, "5.7.1", f"No SMTP service for {ctx.connection.ip}")
        if self.opts["connect"] == "defer":
            return api.defer(450, "4.7.0", "Come back later")
        return None

    def on_message(self, ctx):
        if self.opts["message"] == "quarantine":
            return api.quarantine("looks odd")
        if self.opts["message"] == "discard":
            return api.DISCARD
        if self.opts["message"] == "strip":
            return api.proceed(remove_headers=("X-Secret",))
        return None


class Notes(api.Plugin):
    """An auth result at on_helo; a header with every RCPT, and a refusal of refused@."""

    def on_helo(self, ctx):
        return api.proceed(auth_results=(f"x-helo=pass smtp.helo={ctx.connection.helo}",))

    def on_rcpt_to(self, ctx):
        header = (("X-Rcpt", ctx.recipient),)
        if ctx.recipient.startswith("refused@"):
            return api.reject(550, "5.7.1", "not this one", add_headers=header)
        return api.proceed(add_headers=header)


class Threads(api.Plugin):
    """Notes which thread ran its on_mail_from in ctx.transaction.notes[name]."""

    def on_mail_from(self, ctx):
        ctx.transaction.notes[self.name] = threading.get_ident()


class InlineThreads(Threads):
    default_timeout: ClassVar[float] = 0.0  # as the built-ins: in the caller's thread


class SlowHealth(api.Plugin):
    """health() waits for RELEASE (a plugin whose health check hangs), then says why it is sick."""

    def health(self):
        RELEASE.wait(60)
        return "backend unreachable"


class Logs(api.Plugin):
    """Logs a line at each hook without naming a queue ID (as the built-ins' "checked" lines)."""

    def _log(self, ctx):
        self.log("seen", hook=ctx.hook)

    on_connect = on_mail_from = on_message = on_delivery_success = _log
