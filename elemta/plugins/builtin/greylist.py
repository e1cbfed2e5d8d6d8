"""Greylisting (RFC 6647): the first message of an unknown (client network, sender, recipient)
triplet gets a temporary refusal; a real MTA retries (RFC 5321 §4.5.4.1) and is let through
once `delay` has passed, while most bulk-spam software never comes back.

The triplet uses the client's network, not its address, as RFC 6647 advises: big senders
retry from another machine of the same pool.  A network whose retries have passed
`auto_whitelist_after` times is trusted for `pass_lifetime` and not greylisted at all, so a
known sender pays the delay once, not once per new correspondent (the cost of greylisting
that RFC 6647 asks receivers to keep low is the delay of legitimate mail).

State lives in one SQLite file shared by all worker processes.  Each process keeps ONE
connection, used under a lock: SMTP sessions run one thread each and threads come and go
with connections, so a connection per thread would mean opening the file (and running its
PRAGMAs) per SMTP session; and SQLite serialises writers anyway, while each greylist check
is a short write transaction.  BEGIN IMMEDIATE takes the write lock before the triplet is
read, so two processes cannot both count the same retry; busy_timeout makes the other wait.
WAL lets readers go on during a write, and synchronous=NORMAL skips the fsync per commit:
what a power cut can lose is the last moments of greylist state, which costs a retry.

A failing database (disk full, locked for longer than the timeout) lets mail through: a
greylist is a filter of convenience, not worth refusing legitimate mail for.  health() says so.
"""

from __future__ import annotations

import ipaddress
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from elemta.plugins import api

BUSY_TIMEOUT = 5.0  # seconds a hook waits for another process's write before giving up
CLEANUP_EVERY = 600.0  # expired rows are deleted at most this often (per process)
# A process trusts its memory of an auto-whitelisted network this long before asking the
# database again, which also refreshes the network's lifetime there.  Short, so another
# process (or an admin) removing the entry is seen within a minute.
CACHE_SECONDS = 60.0
CACHE_MAX = 10_000  # networks remembered per process

# expires: when the row stops counting; first_seen + retry_window while waiting for the
# retry, last use + pass_lifetime once passed.  Cleanup and lookups only compare it with now.
SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passed REAL,
    count INTEGER NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (network, sender, recipient)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS triplets_expires ON triplets (expires);
CREATE TABLE IF NOT EXISTS awl (
    network TEXT PRIMARY KEY,
    passes INTEGER NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS awl_expires ON awl (expires);
"""


class GreylistPlugin(api.Plugin):
    default_timeout: ClassVar[float] = 0.0  # in the session's thread: SQLite waits at most BUSY_TIMEOUT
    options: ClassVar[dict[str, Any]] = {
        "database": "",  # "" = <spool_dir>/greylist.db; a relative path is under spool_dir
        "delay": 300,  # seconds before a retry is accepted
        "retry_window": 86400,  # a triplet not retried within this starts over
        "pass_lifetime": 36 * 86400,  # a passed triplet / whitelisted network, since last use
        "auto_whitelist_after": 1,  # passed retries that whitelist a network; 0 = never
        "ipv4_prefix": 24,
        "ipv6_prefix": 64,
        "whitelist": [],  # CIDR networks and "@domain" sender domains never greylisted
        "skip_null_sender": False,  # RFC 6647 allows greylisting bounces too
        "add_header": True,  # X-Greylist on a message that passed after a delay
    }

    def __init__(self, name: str, *, now: Callable[[], float] = time.time):
        super().__init__(name)
        # Wall-clock time: the database outlives the process and is shared between processes.
        self.now = now
        self._lock = threading.Lock()  # guards _db and writes to _cache
        self._db: sqlite3.Connection | None = None
        self._cache: dict[str, float] = {}  # network -> trusted as whitelisted until
        self._next_cleanup = 0.0
        self._error: str | None = None
        self.configure(dict(self.options))

    # ---- configuration ----------------------------------------------------------------------

    def configure(self, options: dict) -> None:
        o = {**self.options, **options}
        for key in ("delay", "retry_window", "pass_lifetime", "auto_whitelist_after", "ipv4_prefix", "ipv6_prefix"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 0:
                raise api.PluginError(f"{key}: must be a whole number >= 0, not {o[key]!r}")
        if o["retry_window"] <= o["delay"]:
            raise api.PluginError("retry_window: must be longer than delay")
        if o["pass_lifetime"] < 1:
            raise api.PluginError("pass_lifetime: must be at least 1 second")
        if not 1 <= o["ipv4_prefix"] <= 32:
            raise api.PluginError("ipv4_prefix: must be 1-32")
        if not 1 <= o["ipv6_prefix"] <= 128:
            raise api.PluginError("ipv6_prefix: must be 1-128")
        for key in ("skip_null_sender", "add_header"):
            if not isinstance(o[key], bool):
                raise api.PluginError(f"{key}: must be true or false")
        if not isinstance(o["database"], str):
            raise api.PluginError("database: must be a path (a string)")
        if not isinstance(o["whitelist"], list):
            raise api.PluginError("whitelist: must be a list of networks and @domains")
        domains, networks = set(), []
        for entry in o["whitelist"]:
            if isinstance(entry, str) and entry.startswith("@") and len(entry) > 1:
                domains.add(entry[1:].lower().rstrip("."))
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except (TypeError, ValueError):
                raise api.PluginError(f"whitelist: {entry!r} is neither a network (CIDR) nor an @domain") from None
        self.database = o["database"]
        self.delay = o["delay"]
        self.retry_window = o["retry_window"]
        self.pass_lifetime = o["pass_lifetime"]
        self.auto_whitelist_after = o["auto_whitelist_after"]
        self.ipv4_prefix, self.ipv6_prefix = o["ipv4_prefix"], o["ipv6_prefix"]
        self.skip_null_sender, self.add_header = o["skip_null_sender"], o["add_header"]
        self._domains, self._networks = frozenset(domains), tuple(networks)

    def start(self, services: api.Services) -> None:
        super().start(services)
        path = os.path.join(services.spool_dir, self.database or "greylist.db")
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; timeout= is busy_timeout.
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            _use_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise api.PluginError(f"database: cannot use {path}: {exc}") from None
        with self._lock:
            self._db = db
            self._cache.clear()
            self._next_cleanup = 0.0  # clean up at the first check

    def stop(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def health(self) -> str | None:
        return self._error

    # ---- the hook ---------------------------------------------------------------------------

    def on_rcpt_to(self, ctx: api.Context) -> api.Verdict | None:
        conn, tx = ctx.connection, ctx.transaction
        if conn is None or tx is None or ctx.recipient is None or conn.outbound:
            return None  # our own users' mail is not greylisted
        if (self.skip_null_sender and not tx.sender) or self._whitelisted(conn.ip, tx.sender_domain):
            return None
        network = api.network_of(conn.ip, self.ipv4_prefix, self.ipv6_prefix)
        now = self.now()
        if self._cache.get(network, 0.0) > now:  # the hot path: no lock, no database
            return None
        try:
            with self._lock:
                if self._db is None:
                    return None  # not started (or stopped): nothing to check against
                state, seconds = self._check(network, tx.sender.lower(), ctx.recipient.lower(), now)
            self._error = None
        except sqlite3.Error as exc:
            self._error = f"greylist database: {exc}"
            self.log("db_error", error=str(exc))
            return None
        if state in ("whitelisted", "known"):
            return None
        where = {"network": network, "sender": tx.sender, "recipient": ctx.recipient}
        if state == "passed":
            self.log("passed", waited=round(seconds), **where)
            # One header per message, however many of its recipients pass now.
            if not self.add_header or tx.notes.get(f"{self.name}.header"):
                return None
            tx.notes[f"{self.name}.header"] = True
            host = self.services.hostname if self.services else ""
            passed = f"passed after {round(seconds)} seconds at {host} ({network})"
            return api.proceed(add_headers=(("X-Greylist", passed),))
        wait = max(1, math.ceil(seconds))
        self.log("greylisted", wait=wait, first=state == "new", **where)
        # RFC 3463 4.7.1: delivery not authorized, for now.
        return api.defer(450, "4.7.1", f"Greylisted, try again in {wait} seconds")

    def _whitelisted(self, ip: str, sender_domain: str) -> bool:
        if sender_domain and sender_domain in self._domains:
            return True
        if not self._networks:
            return False
        address = api.client_address(ip)
        if address is None:
            return False
        # `in` does not check the version itself: 0.0.0.1 would be "in" ::/96.
        return any(net.version == address.version and address in net for net in self._networks)

    # ---- the database (called with the lock held) ---------------------------------------------

    def _check(self, network: str, sender: str, recipient: str, now: float) -> tuple[str, float]:
        """(state, seconds): ("whitelisted", 0), ("known", 0) for a triplet that passed before,
        ("passed", seconds waited), ("new", delay) or ("early", seconds still to wait)."""
        db = self._db
        assert db is not None, "start() opened the database; stop() closes it after the last hook"
        if now >= self._next_cleanup:
            self._cleanup(db, now)
        db.execute("BEGIN IMMEDIATE")
        with db:  # commits, or rolls back on an exception
            if self.auto_whitelist_after:
                row = db.execute("SELECT passes, expires FROM awl WHERE network = ?", (network,)).fetchone()
                if row is not None and row[1] > now and row[0] >= self.auto_whitelist_after:
                    # Each use keeps the network whitelisted for another pass_lifetime.
                    db.execute("UPDATE awl SET expires = ? WHERE network = ?", (now + self.pass_lifetime, network))
                    self._remember(network, now)
                    return "whitelisted", 0.0
            key = (network, sender, recipient)
            row = db.execute(
                "SELECT first_seen, passed, expires FROM triplets WHERE network = ? AND sender = ? AND recipient = ?",
                key).fetchone()
            if row is None or row[2] <= now:
                # Unknown, or not retried within retry_window, or unused for pass_lifetime.
                db.execute(
                    "INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?, ?, NULL, 1, ?)",
                    (*key, now, now, now + self.retry_window))
                return "new", float(self.delay)
            first_seen, passed, _ = row
            waited = now - first_seen
            if passed is None and waited < self.delay:
                # Too early: counted, but first_seen stays, so hammering does not help.
                db.execute(
                    "UPDATE triplets SET last_seen = ?, count = count + 1"
                    " WHERE network = ? AND sender = ? AND recipient = ?", (now, *key))
                return "early", self.delay - waited
            db.execute(
                "UPDATE triplets SET passed = coalesce(passed, ?), last_seen = ?, count = count + 1, expires = ?"
                " WHERE network = ? AND sender = ? AND recipient = ?",
                (now, now, now + self.pass_lifetime, *key))
            if passed is not None:
                return "known", 0.0
            if self.auto_whitelist_after:
                # A pass counts towards the network's auto-whitelist; an expired entry starts at 1.
                (passes,) = db.execute(
                    "INSERT INTO awl VALUES (?, 1, ?) ON CONFLICT (network) DO UPDATE SET"
                    " passes = CASE WHEN awl.expires > ? THEN awl.passes + 1 ELSE 1 END,"
                    " expires = excluded.expires RETURNING passes",
                    (network, now + self.pass_lifetime, now)).fetchone()
                if passes >= self.auto_whitelist_after:
                    self._remember(network, now)
                    self.log("auto_whitelisted", network=network, passes=passes)
            return "passed", waited

    def _remember(self, network: str, now: float) -> None:
        if len(self._cache) >= CACHE_MAX:
            for stale in [n for n, until in self._cache.items() if until <= now]:
                del self._cache[stale]
            while len(self._cache) >= CACHE_MAX:
                del self._cache[next(iter(self._cache))]  # the oldest remembered
        self._cache[network] = now + min(CACHE_SECONDS, self.pass_lifetime)

    def _cleanup(self, db: sqlite3.Connection, now: float) -> None:
        """Delete expired rows: at most every CLEANUP_EVERY seconds, never on every call."""
        self._next_cleanup = now + CLEANUP_EVERY
        triplets = db.execute("DELETE FROM triplets WHERE expires <= ?", (now,)).rowcount
        networks = db.execute("DELETE FROM awl WHERE expires <= ?", (now,)).rowcount
        for stale in [n for n, until in self._cache.items() if until <= now]:
            del self._cache[stale]
        if triplets or networks:
            self.log("cleanup", triplets=triplets, networks=networks)


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL once.  Worker processes start their plugins at the same moment,
    and a journal-mode change that meets another connection fails with "database is locked"
    at once, without the busy timeout (SQLite takes an exclusive lock for it), so: read the
    mode first (WAL persists in the file) and retry the switch for up to BUSY_TIMEOUT."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
