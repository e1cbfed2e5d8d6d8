"""One delivery attempt: some recipients of one message, along one route.

For SMTP and LMTP the route's hosts are tried in order (RFC 5321 §5.1), each of their
addresses in turn: a connection failure, a 4xx for the whole transaction or a 4xx for a
recipient moves on to the next address, a 2xx or 5xx is final for that recipient. Every
try is recorded as an attempt (host, IP, TLS, the remote's reply, duration).

What each host gets for TLS is tls_decision.py's: the destination's policy and, under dane,
dane-only and mta-sts, the DANE records and the MTA-STS policy of the recipient domain, found
here.  A host ruled out is recorded as skipped, with the reason, and never connected to.

The attempt's TLS field says what applied: "(DANE 3 1 1)" or "(MTA-STS enforce)".

An attempt is steps (delivery/steps.py): its transactions' reads and writes are yielded, and
SLOW before whatever may block (a DNS answer not in the cache, a new connection, the MTA-STS
policy, a Maildir), so the delivery loop runs the rest and a pool thread only those parts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from elemta.delivery import dane_dns, maildir, tlsrpt
from elemta.delivery.dane_dns import TlsaLookup
from elemta.delivery.dns import DnsError, NotCached, Resolver
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
from elemta.delivery.steps import SLOW, Steps, run
from elemta.delivery.tls_decision import PUBLISHED, REQUIRETLS_STATUS, HostTls, Plan, make_plan
from elemta.delivery.tlsrpt import PolicyKey
from elemta.delivery.tlsrpt_store import Reports
from elemta.queue.jobs import Attempt, Job, Recipient
from elemta.queue.query import parse_headers
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
                 dane: TlsaLookup | None = None, dane_off: str = "delivery.dane is off",
                 tls_reports: Reports | None = None) -> None:
        self.settings = settings
        self.resolver = resolver
        self.pool = pool
        self.clock = clock
        self.sts = sts  # None: MTA-STS off (delivery.mta_sts)
        self.dane = dane  # None: DANE off (delivery.dane, or no trusted validating resolver)
        self.dane_off = dane_off  # why, when it is off
        self.tls_reports = tls_reports  # None: no TLS-RPT (delivery.tls_reports)

    def close(self) -> None:
        """Release what outlives one attempt (the MTA-STS cache's file, the TLS-RPT counts)."""
        if self.sts is not None:
            self.sts.close()
        if self.tls_reports is not None:
            self.tls_reports.close()

    def run(self, job: Job, body: bytes, recipients: Sequence[Recipient], route: Route) -> AttemptResult:
        """The attempt on this thread."""
        return run(self.steps(job, body, recipients, route))

    def steps(self, job: Job, body: bytes, recipients: Sequence[Recipient], route: Route) -> Steps[AttemptResult]:
        """The attempt as steps, for a driver that waits elsewhere (delivery/loop.py)."""
        if route.kind == "maildir":
            yield SLOW  # file system writes and an fsync
            return self._maildir(job, body, recipients, route)
        return (yield from self._smtp(job, body, recipients, route))

    # -- SMTP / LMTP -----------------------------------------------------------

    def _smtp(self, job: Job, body: bytes, recipients: Sequence[Recipient], route: Route) -> Steps[AttemptResult]:
        out = AttemptResult()
        remaining = list(recipients)
        last: dict[int, Verdict] = {}
        # REQUIRETLS governs relaying over SMTP; LMTP is final delivery into a mailbox store.
        requiretls = job.requiretls and route.kind == "smtp"
        policy_route = route
        if not job.requiretls and route.tls_policy in PUBLISHED and tls_required_no(body):
            policy_route = dataclasses.replace(route, tls_policy="may")  # RFC 8689 §4.2.2
        domain = recipients[0].domain
        if self._plan_asks(policy_route):
            yield SLOW  # DNS, and MTA-STS's policy fetch
        plan = self.plan(policy_route, domain)
        # RFC 8460: sessions with MX hosts count for the domain's TLS report, not a report's own.
        reports = self.tls_reports if route.mx and not tlsrpt.is_report(body) else None
        for item in self._addresses(route, remaining, out, last, plan, requiretls, reports):
            if item is SLOW:
                yield SLOW
                continue
            host, ip, tls = item
            started = time.monotonic()
            message = OutMessage(
                sender=job.sender,
                recipients=tuple(OutRecipient(r.address, r.notify, r.orcpt) for r in remaining),
                body=body, envid=job.envid, ret=job.ret, body_type=job.body_type, smtputf8=job.smtputf8,
                requiretls=requiretls,
            )
            key = (route.kind, route.path, host, ip, route.port, tls.pool_policy, route.auth)
            tls_text = ""
            try:
                conn = self.pool.get(key)
                if conn is None:
                    yield SLOW  # connect, EHLO, STARTTLS, AUTH
                    conn = self._session(route, host, ip, tls, plan, reports)
                tls_text = (str(conn.tls) + tls.label) if conn.tls else ""
                if requiretls and "REQUIRETLS" not in conn.extensions:
                    # RFC 8689 §4.2.1: the next hop must carry the requirement on; try the next.
                    yield from self._pool_put(key, conn)
                    reply = f"REQUIRETLS: {host} does not offer REQUIRETLS"
                    for r in remaining:
                        last[r.id] = Verdict(r, "permanent", reply, REQUIRETLS_STATUS, host)
                        out.attempts.append(self._attempt(r, "permanent", reply, host, ip, route, tls_text, started))
                    continue
                results = yield from conn.send_steps(message)
            except SmtpClientError as exc:
                status = "permanent" if exc.permanent and not exc.try_next_host else "transient"
                reply = str(exc.reply) if exc.reply else str(exc)
                for r in remaining:
                    last[r.id] = Verdict(r, status, reply, exc.enhanced or _default_status(status), host)
                    out.attempts.append(self._attempt(r, status, reply, host, ip, route, tls_text, started))
                if not exc.try_next_host:
                    break
                continue
            yield from self._pool_put(key, conn)
            still = []
            for r, res in zip(remaining, results, strict=True):
                status = "ok" if res.is_positive else "permanent" if res.is_permanent else "transient"
                verdict = Verdict(r, status, str(res.reply), res.reply.enhanced or _default_status(status),
                                  host, relayed=res.relayed)
                out.attempts.append(self._attempt(r, status, str(res.reply), host, ip, route, tls_text, started))
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

    def _pool_put(self, key: tuple, conn: SmtpConnection) -> Steps[None]:
        if not self.pool.keep(key, conn):
            yield SLOW  # QUIT waits for the server
            self.pool.discard(conn)

    def _plan_asks(self, route: Route) -> bool:
        """Whether plan() may ask DNS or fetch an MTA-STS policy (make_plan's cases)."""
        return (route.tls_policy in PUBLISHED and not route.path and route.mx
                and (self.dane is not None or self.sts is not None))

    def _session(self, route: Route, host: str, ip: str, tls: HostTls, plan: Plan,
                 reports: Reports | None) -> SmtpConnection:
        """A new connection, counted for TLS-RPT (RFC 8460: a session each).  Under an MTA-STS
        policy in mode testing, what enforce would have found is counted, and the mail goes as
        under may: a host the policy does not name at once, a named one after its verified TLS
        failed (RFC 8461 §5)."""
        policy = plan.report_policy(host, tls) if reports is not None else None
        if tls.testing and tls.result:
            if reports is not None and policy is not None:
                reports.failure(policy, tls.result, host, ip)
            return self._open(route, host, ip, HostTls("may"))
        try:
            conn = self._open(route, host, ip, tls)
        except SmtpClientError as exc:
            if reports is not None and policy is not None and exc.tls_result:
                reports.failure(policy, exc.tls_result, host, ip)
            if tls.testing and exc.tls_result:
                return self._open(route, host, ip, HostTls("may"))
            raise
        if reports is not None and policy is not None:
            if conn.tls is not None:
                reports.success(policy)
            elif tls.policy != "none":  # offered no STARTTLS: the mail goes in clear
                reports.failure(policy, tlsrpt.STARTTLS_NOT_SUPPORTED, host, ip)
        return conn

    def plan(self, route: Route, domain: str) -> Plan:
        """What the TLS decision needs of the recipient domain: whether its hosts' TLSA records
        are asked, and its MTA-STS policy (fetched if due)."""
        def mta_sts(name: str) -> tuple[Policy | None, str]:
            assert self.sts is not None
            found = self.sts.find(name)
            if found.failed and self.tls_reports is not None and route.mx:
                # RFC 8460 §4.3.2.2: counted once per fetch that failed (the next waits 5 minutes)
                result = tlsrpt.STS_POLICY_INVALID if found.failed == "invalid" else tlsrpt.STS_POLICY_FETCH_ERROR
                self.tls_reports.failure(PolicyKey(tlsrpt.STS, name), result, "")
            return found.policy, found.note

        dane = self.dane
        return make_plan(route, domain, mx_secure=(lambda d: dane.secure(d, "MX")) if dane else None,
                         dane_off=self.dane_off, sts=mta_sts if self.sts is not None else None)

    def _addresses(self, route: Route, remaining: list[Recipient], out: AttemptResult, last: dict[int, Verdict],
                   plan: Plan, requiretls: bool = False, reports: Reports | None = None):
        """(host, ip, its TLS decision) to try, resolving each host only when it is reached; a
        host the decision rules out is recorded as skipped (for REQUIRETLS, as failed).  SLOW
        comes before a DNS question whose answer is not in the cache."""
        if route.path:  # LMTP over a unix socket
            yield "localhost", "", plan.host("localhost")
            return
        count = 0
        for host in route.hosts:
            checked = None
            if plan.asks_dane and self.dane is not None and not is_ip(host):
                yield SLOW
                checked = dane_dns.host_check(self.dane, host, route.port if not route.mx else 25)
            tls = plan.host(host, checked)
            if requiretls:
                tls = plan.require_tls(host, tls)
            if tls.skip:
                if reports is not None and tls.result:  # a session refused by the policy: a failure
                    reports.failure(plan.report_policy(host, tls), tls.result, host)
                status = "permanent" if tls.status.startswith("5") else "transient"
                for r in remaining:
                    last[r.id] = Verdict(r, status, tls.skip, tls.status, host)
                    out.attempts.append(Attempt(r.id, self.clock(), _OUTCOME[status], tls.skip, host))
                continue
            if is_ip(host):
                addresses = [host]
            else:
                try:
                    try:
                        addresses = self.resolver.addresses(host, cached_only=True)
                    except NotCached:
                        yield SLOW
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
                yield host, ip, tls
                if not remaining:
                    return

    def _open(self, route: Route, host: str, ip: str, tls: HostTls) -> SmtpConnection:
        s = self.settings
        # With DANE records the check is the records' alone (smtp_client); verify makes TLS mandatory.
        return SmtpConnection.open(
            host, ip, route.port, helo_name=s.helo_name, lmtp=route.kind == "lmtp", dane=tls.dane,
            tls_policy=tls.policy, tls_name=host, ca_file=s.ca_file or None, auth=route.auth,
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


def tls_required_no(body: bytes) -> bool:
    """Whether the message's header has "TLS-Required: No" (RFC 8689 §3, §4.2.2): its sender asks that
    what the recipient domain publishes (DANE, MTA-STS) not stop it.  A cheap test first: this
    runs for every delivery."""
    end = body.find(b"\r\n\r\n")
    head = body[: end if end >= 0 else len(body)]
    if b"tls-required" not in head.lower():
        return False
    return any(name.lower() == "tls-required" and value.lower() == "no" for name, value in parse_headers(head))


def _default_status(status: str) -> str:
    return {"ok": "2.0.0", "transient": "4.0.0", "permanent": "5.0.0"}[status]
