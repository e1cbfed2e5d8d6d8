"""TLS sessions counted per policy domain and UTC day, and the daily reports sent for them
(RFC 8460).  What is counted and how a report looks are tlsrpt.py's.

Deliveries count in memory (one lock, no I/O: this is on every new connection); the
scheduler's housekeeping writes the counts to spool_dir/tlsrpt.db once a minute and, once a
UTC day is over, sends each domain that publishes an `_smtp._tls` record its report for it:
through elemta's own queue to the mailto: addresses, and by HTTPS POST to the https: ones
(§5.4), in a thread of its own so that slow DNS or web servers never hold up delivery.  A
crash loses at most a minute of counts, which are statistics, never mail.  The delivery
process is the file's only user.
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable

from elemta.delivery import tlsrpt
from elemta.delivery.dns import DnsError, Resolver
from elemta.delivery.mtasts_fetch import FETCH_TIMEOUT, PinnedConnection
from elemta.delivery.tlsrpt import PolicyCounts, PolicyKey
from elemta.queue import db
from elemta.queue.model import NewMessage, NewRecipient

FILENAME = "tlsrpt.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    day TEXT NOT NULL,              -- UTC, YYYY-MM-DD
    domain TEXT NOT NULL,           -- the policy domain (the recipient domain)
    policy TEXT NOT NULL,           -- JSON: [type, [policy-string...], [mx-host...]]
    result TEXT NOT NULL,           -- "" for a successful session, else the result-type
    mx TEXT NOT NULL,               -- the receiving MX host name ("" for successes)
    ip TEXT NOT NULL,               -- the receiving IP address ("" when there was none)
    count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, policy, result, mx, ip)
);
"""

Key = tuple[str, PolicyKey, str, str, str]  # day, policy, result, mx, ip


class Reports:
    def __init__(self, spool_dir: str, *, hostname: str, resolver: Resolver,
                 enqueue: Callable[[NewMessage], str], new_id: Callable[[], str],
                 log: Callable[..., None] = lambda event, **fields: None,
                 clock: Callable[[], float] = time.time, ca_file: str | None = None,
                 sign: Callable[[bytes], bytes] | None = None):
        self.path = os.path.join(spool_dir, FILENAME)
        self.hostname = hostname
        self.resolver = resolver
        self.enqueue = enqueue
        self.new_id = new_id
        self.log = log
        self.clock = clock
        self.ca_file = ca_file  # for https: report URIs, as for MTA-STS policies
        self.sign = sign  # DKIM-Signature fields for a report (the dkim plugin's keys), or None
        self._lock = threading.Lock()  # the counts in memory
        self._db_lock = threading.Lock()  # the connection: the scheduler's thread and the sender's
        self._pending: dict[Key, int] = {}
        self._sender: threading.Thread | None = None
        self._conn = db.connect(self.path, create=True, check_same_thread=False)
        with db.write(self._conn) as conn:
            conn.execute(SCHEMA)

    # -- counting, from the delivery threads -------------------------------------------------

    def success(self, policy: PolicyKey) -> None:
        self._count((tlsrpt.day_of(self.clock()), policy, "", "", ""))

    def failure(self, policy: PolicyKey, result: str, mx: str, ip: str = "") -> None:
        self._count((tlsrpt.day_of(self.clock()), policy, result, mx, ip))

    def _count(self, key: Key) -> None:
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + 1

    # -- housekeeping, from the scheduler thread -------------------------------------------

    def housekeeping(self) -> None:
        """Write the counts; once a day is over, send its reports in a thread (one at a time)."""
        self.flush()
        if (self._sender is not None and self._sender.is_alive()) or not self._due():
            return
        self._sender = threading.Thread(target=self._send_quietly, name="tls-reports", daemon=True)
        self._sender.start()

    def _send_quietly(self) -> None:
        try:
            self.send_due()
        except Exception as exc:  # noqa: BLE001 -- statistics: the next housekeeping tries again
            self.log("tls_report_error", error=str(exc)[:200])

    def flush(self) -> None:
        """Add the counts kept in memory to the file."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        rows = [(day, p.domain, json.dumps([p.type, list(p.string), list(p.mx_host)]), result, mx, ip, n)
                for (day, p, result, mx, ip), n in pending.items()]
        with self._db_lock, db.write(self._conn) as conn:
            conn.executemany(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (day, domain, policy, result, mx, ip) DO UPDATE SET count = count + excluded.count",
                rows)

    def _due(self) -> list[tuple[str, str]]:
        with self._db_lock:
            return self._conn.execute("SELECT DISTINCT day, domain FROM sessions WHERE day < ? ORDER BY day, domain",
                                      (tlsrpt.day_of(self.clock()),)).fetchall()

    def send_due(self) -> int:
        """Send the reports for every day that is over; how many were sent (queued or posted)."""
        self.flush()
        return sum(self._send(day, domain) for day, domain in self._due())

    def _send(self, day: str, domain: str) -> int:
        try:
            uris = tlsrpt.parse_record(self.resolver.txt(f"_smtp._tls.{domain}"))
        except DnsError as exc:
            if not exc.permanent:
                return 0  # asked again at the next housekeeping
            uris = ()
        policies = self._policies(day, domain)
        to = tlsrpt.mailto_addresses(uris)
        posts = [u for u in uris if u.lower().startswith("https:")]
        sent = self._deliver(day, domain, policies, to, posts) if to or posts else 0
        with self._db_lock, db.write(self._conn) as conn:
            conn.execute("DELETE FROM sessions WHERE day = ? AND domain = ?", (day, domain))
        self.log("tls_report", domain=domain, day=day, to=",".join([*to, *posts]) or "-",
                 sessions=sum(c.successes + sum(c.failures.values()) for c in policies.values()), sent=sent)
        return sent

    def _deliver(self, day: str, domain: str, policies: dict[PolicyKey, PolicyCounts], to: list[str],
                 posts: list[str]) -> int:
        """Queue the report to the mailto: addresses and post it to the https: URIs; how many
        of those two ways worked."""
        report_id = f"{self.new_id()}@{self.hostname}"
        report = tlsrpt.build_report(day, domain, policies, organization=self.hostname,
                                     contact=f"postmaster@{self.hostname}", report_id=report_id)
        sent = 0
        if to:
            body = tlsrpt.build_message(report, domain=domain, day=day, submitter=self.hostname,
                                        sender=f"postmaster@{self.hostname}", to=to, now=self.clock())
            if self.sign is not None:  # §5.3: receivers may ignore a report without DKIM
                body = self.sign(body) + body
            # The null reverse-path: a report that cannot be delivered is not bounced (RFC 5321
            # §4.5.5), so reports never loop; elemta's delivery does not count it (is_report).
            self.enqueue(NewMessage(queue_id=report_id.split("@")[0], sender="",
                                    recipients=tuple(NewRecipient(a) for a in to), body=body, listener="tlsrpt"))
            sent += 1
        for uri in posts:
            try:
                self._post(uri, tlsrpt.compressed(report))
                sent += 1
            except ReportError as exc:  # §5.4: no retry is required; the mailto: copy, if any, stands
                self.log("tls_report_post_failed", domain=domain, day=day, uri=uri[:200], error=str(exc)[:200])
        return sent

    def _post(self, uri: str, data: bytes) -> None:
        """POST the gzipped report to an https: URI (§5.4): the certificate verified for its
        host, no redirect followed, any 2xx is success."""
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname or ""
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            addresses = self.resolver.addresses(host)
        except DnsError as exc:
            raise ReportError(exc.text) from None
        context = ssl.create_default_context(cafile=self.ca_file)
        problems = []
        for address in addresses:
            conn = PinnedConnection(host, address, parts.port or 443, context, FETCH_TIMEOUT)
            try:
                conn.request("POST", path, body=data, headers={"Content-Type": tlsrpt.MEDIA_TYPE,
                                                               "Connection": "close"})
                response = conn.getresponse()
                if 200 <= response.status < 300:
                    return
                problems.append(f"{address}: HTTP {response.status}")
            except ssl.SSLCertVerificationError as exc:
                problems.append(f"{address}: certificate not valid for {host}: {exc.verify_message}")
            except (OSError, http.client.HTTPException) as exc:
                problems.append(f"{address}: {type(exc).__name__}: {str(exc)[:120]}")
            finally:
                conn.close()
        raise ReportError("; ".join(problems) or f"{host} has no address")

    def _policies(self, day: str, domain: str) -> dict[PolicyKey, PolicyCounts]:
        out: dict[PolicyKey, PolicyCounts] = {}
        with self._db_lock:
            rows = self._conn.execute("SELECT policy, result, mx, ip, count FROM sessions WHERE day = ? AND domain = ?",
                                      (day, domain)).fetchall()
        for policy, result, mx, ip, count in rows:
            kind, string, mx_host = json.loads(policy)
            counts = out.setdefault(PolicyKey(kind, domain, tuple(string), tuple(mx_host)), PolicyCounts())
            if result:
                counts.failures[(result, mx, ip)] = counts.failures.get((result, mx, ip), 0) + count
            else:
                counts.successes += count
        return out

    def close(self) -> None:
        if self._sender is not None:
            self._sender.join(timeout=FETCH_TIMEOUT)
        try:
            self.flush()
        except sqlite3.Error as exc:
            self.log("tls_report_error", error=str(exc)[:200])
        with self._db_lock:
            self._conn.close()


class ReportError(Exception):
    """A report could not be posted; the text says why."""
