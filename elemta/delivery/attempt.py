"""One delivery attempt: some recipients of one message, along one route.

For SMTP and LMTP the route's hosts are tried in order (RFC 5321 §5.1), each of their
addresses in turn: a connection failure, a 4xx for the whole transaction or a 4xx for a
recipient moves on to the next address, a 2xx or 5xx is final for that recipient. Every
try is recorded as an attempt (host, IP, TLS, the remote's reply, duration).

MX delivery under an opportunistic TLS policy (may, encrypt) applies what the recipient domain
publishes, per host:

- DANE (RFC 7672), when the MX records are authenticated and the host's TLSA records are:
  usable records make TLS mandatory and checked by them alone; records none of which is usable
  make TLS mandatory but unchecked ("encrypt", §2.2); a TLSA lookup that fails (a bogus answer)
  skips the host (§2.1.1).  DANE takes precedence over MTA-STS for the hosts that have it
  (RFC 8461 §2).
- MTA-STS (mtasts_finder.py) for the others: in mode enforce only the MX hosts the policy names
  are tried, each over TLS verified for its name, and the others are recorded as skipped
  (RFC 8461 §4.2, §5).

The attempt's TLS field says which: "(DANE 3 1 1)" or "(MTA-STS enforce)".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from elemta.delivery import dane_dns, maildir
from elemta.delivery.dane import DaneCheck
from elemta.delivery.dane_dns import TlsaLookup
from elemta.delivery.dns import DnsError, Resolver
from elemta.delivery.mtasts import Policy
from elemta.delivery.mtasts_finder import PolicyFinder
from elemta.delivery.router import Route
from elemta.delivery.smtp_client import (
    OutMessage,
    OutRecipient,
    SmtpClientError,
    SmtpConnection,
)
from elemta.delivery.smtp_pool import Pool
from elemta.queue.work import Attempt, Job, Recipient
from elemta.transport import is_ip

# Postfix's smtp_mx_address_limit: past five addresses more tries rarely help and only delay.
MAX_ADDRESSES = 5


@dataclass
class Verdict:
    """The end of one recipient's attempt."""

    recipient: Recipient
    status: str  # ok | transient | permanent
    reply: str  # the remote's reply ("550 5.1.1 ...") or elemta's own reason
    enhanced: str  # RFC 3463 status for a DSN
    host: str = ""  # the remote MTA that said it, for the DSN's Remote-MTA
    relayed: bool = False  # NOTIFY=SUCCESS met a remote without DSN (RFC 3461 §5.2.2)


@dataclass
class AttemptResult:
    """What one delivery run decided: a verdict per recipient, and the attempts made."""

    verdicts: list[Verdict] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    helo_name: str
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    ca_file: str | None = None


class Attempter:
    def __init__(self, settings: Settings, resolver: Resolver, pool: Pool[SmtpConnection],
                 clock: Callable[[], float] = time.time, sts: PolicyFinder | None = None,
                 dane: TlsaLookup | None = None) -> None:
        self.settings = settings
        self.resolver = resolver
        self.pool = pool
        self.clock = clock
        self.sts = sts  # None: MTA-STS off (delivery.mta_sts)
        self.dane = dane  # None: DANE off (delivery.dane, or no trusted validating resolver)

    def close(self) -> None:
        """Release what outlives one attempt (the MTA-STS cache's file)."""
        if self.sts is not None:
            self.sts.close()

    def run(self, job: Job, body: bytes, recipients: Sequence[Recipient], route: Route) -> AttemptResult:
        if route.kind == "maildir":
            return self._maildir(job, body, recipients, route)
        return self._smtp(job, body, recipients, route)

    # -- SMTP / LMTP -----------------------------------------------------------

    def _smtp(self, job: Job, body: bytes, recipients: Sequence[Recipient], route: Route) -> AttemptResult:
        out = AttemptResult()
        remaining = list(recipients)
        last: dict[int, Verdict] = {}
        domain = recipients[0].domain
        tls_policy, sts = self._tls_policy(route, domain)
        dane_domain = self.dane is not None and route.opportunistic_mx and self.dane.secure(domain, "MX")
        for host, ip, dane in self._addresses(route, remaining, out, last, sts, dane_domain):
            started = time.monotonic()
            message = OutMessage(
                sender=job.sender,
                recipients=tuple(OutRecipient(r.address, r.notify, r.orcpt) for r in remaining),
                body=body, envid=job.envid, ret=job.ret, body_type=job.body_type, smtputf8=job.smtputf8,
            )
            policy = tls_policy if dane is None else "encrypt" if not dane.records else "dane"
            key = (route.kind, route.path, host, ip, route.port, policy, route.auth)
            tls = ""
            try:
                conn = self.pool.get(key) or self._open(route, host, ip, policy, dane)
                tls = str(conn.tls) if conn.tls else ""
                if sts is not None and dane is None:
                    tls += " (MTA-STS enforce)"
                results = conn.send(message)
            except SmtpClientError as exc:
                status = "permanent" if exc.permanent and not exc.try_next_host else "transient"
                reply = str(exc.reply) if exc.reply else str(exc)
                for r in remaining:
                    last[r.id] = Verdict(r, status, reply, exc.enhanced or _default_status(status), host)
                    out.attempts.append(self._attempt(r, status, reply, host, ip, route, tls, started))
                if not exc.try_next_host:
                    break
                continue
            self.pool.put(key, conn)
            still = []
            for r, res in zip(remaining, results, strict=True):
                status = "ok" if res.is_positive else "permanent" if res.is_permanent else "transient"
                verdict = Verdict(r, status, str(res.reply), res.reply.enhanced or _default_status(status),
                                  host, relayed=res.relayed)
                out.attempts.append(self._attempt(r, status, str(res.reply), host, ip, route, tls, started))
                if status == "transient":
                    last[r.id] = verdict
                    still.append(r)
                else:
                    out.verdicts.append(verdict)
            remaining[:] = still  # the address generator watches this list
            if not remaining:
                break
        for r in remaining:
            out.verdicts.append(last.get(r.id) or Verdict(
                r, "transient", "no next hop could be reached", "4.4.1"))
        return out

    def _tls_policy(self, route: Route, domain: str) -> tuple[str, Policy | None]:
        """The TLS policy for this attempt, and the MTA-STS policy it enforces (or None).

        Only for route.opportunistic_mx."""
        if self.sts is None or not route.opportunistic_mx:
            return route.tls_policy, None
        found = self.sts.find(domain)
        if found.policy is None or found.policy.mode != "enforce":
            return route.tls_policy, None  # testing: delivered as without a policy (TLS-RPT reports)
        return "verify", found.policy

    def _addresses(self, route: Route, remaining: list[Recipient], out: AttemptResult, last: dict[int, Verdict],
                   sts: Policy | None = None, dane_domain: bool = False):
        """(host, ip, DANE check or None) to try, resolving each host only when it is reached;
        a host DANE or an enforced MTA-STS policy rules out is recorded as skipped."""
        if route.path:  # LMTP over a unix socket
            yield "localhost", "", None
            return
        count = 0
        for host in route.hosts:
            dane, skip, status = None, "", "4.7.5"  # a host DANE cannot check: RFC 7672 §2.1.1
            if dane_domain and self.dane is not None and not is_ip(host):
                dane, skip = dane_dns.host_check(self.dane, host)
            if not skip and dane is None and sts is not None and not sts.allows(host):
                skip, status = f"MTA-STS: the recipient domain's policy does not name {host} as an MX host", "4.7.4"
            if skip:
                for r in remaining:
                    last[r.id] = Verdict(r, "transient", skip, status, host)
                    out.attempts.append(Attempt(r.id, self.clock(), "deferred", skip, host))
                continue
            if is_ip(host):
                addresses = [host]
            else:
                try:
                    addresses = self.resolver.addresses(host)
                except DnsError as exc:
                    # An MX host that does not resolve: try the next one (RFC 5321 §5.1).
                    for r in remaining:
                        last[r.id] = Verdict(r, "transient", exc.text, "4.4.4", host)
                        out.attempts.append(Attempt(r.id, self.clock(), "deferred", exc.text, host))
                    continue
            for ip in addresses:
                count += 1
                if count > MAX_ADDRESSES:
                    return
                yield host, ip, dane
                if not remaining:
                    return

    def _open(self, route: Route, host: str, ip: str, tls_policy: str, dane: DaneCheck | None = None) -> SmtpConnection:
        s = self.settings
        if dane is not None and not dane.records:  # §2.2: TLSA records, none usable: TLS, unchecked
            tls_policy, dane = "encrypt", None
        elif dane is not None:
            tls_policy = "verify"  # mandatory TLS; the check itself is the records' (smtp_client)
        return SmtpConnection.open(
            host, ip, route.port, helo_name=s.helo_name, lmtp=route.kind == "lmtp", dane=dane,
            tls_policy=tls_policy, tls_name=host, ca_file=s.ca_file or None, auth=route.auth,
            connect_timeout=s.connect_timeout, command_timeout=s.command_timeout,
            unix_path=route.path or None,
        )

    def _attempt(self, r: Recipient, status: str, reply: str, host: str, ip: str, route: Route,
                 tls: str, started: float) -> Attempt:
        return Attempt(r.id, self.clock(), _OUTCOME[status], reply, host if not route.path else f"unix:{route.path}",
                       ip, route.port if not route.path else 0, tls, time.monotonic() - started)

    # -- Maildir -----------------------------------------------------------------

    def _maildir(self, job: Job, body: bytes, recipients: Sequence[Recipient], route: Route) -> AttemptResult:
        out = AttemptResult()
        for r in recipients:
            started = time.monotonic()
            try:
                name = maildir.deliver(route.path, r.address, body, job.sender)
            except maildir.MaildirError as exc:
                status = "permanent" if exc.permanent else "transient"
                verdict = Verdict(r, status, str(exc), "5.1.1" if exc.permanent else "4.3.0")
                reply = str(exc)
            else:
                verdict = Verdict(r, "ok", f"delivered to maildir as {name}", "2.0.0")
                reply = verdict.reply
            out.verdicts.append(verdict)
            out.attempts.append(Attempt(r.id, self.clock(), _OUTCOME[verdict.status], reply, "maildir",
                                        duration=time.monotonic() - started))
        return out


_OUTCOME = {"ok": "delivered", "transient": "deferred", "permanent": "failed"}


def _default_status(status: str) -> str:
    return {"ok": "2.0.0", "transient": "4.0.0", "permanent": "5.0.0"}[status]
