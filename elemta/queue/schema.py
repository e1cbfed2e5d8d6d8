"""Queue database schema and its migrations, versioned by PRAGMA user_version.

MIGRATIONS[n - 1] takes a database from version n - 1 to version n. A new
schema change is appended as a new tuple; existing entries are never edited,
because databases in the field have already run them.

Representation choices:
  * recipients.state is TEXT, one of model.STATES, guarded by a CHECK. Text
    keeps the spool readable with the sqlite3 shell during an incident, and
    the (state, priority, next_attempt) index works the same as with integers.
  * priority is INTEGER 0..3 (0 = critical) so ORDER BY priority is urgency.
  * times are REAL Unix seconds.
  * notify is the NOTIFY keywords joined with ',' (NULL when not given).
  * bodies live in their own table so list queries over messages never page
    through message data.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from elemta.errors import QueueError
from elemta.queue import db, ids
from elemta.queue.model import (
    UNDELIVERED_STATES,
    NewMessage,
    priority_value,
    recipient_domain,
)

_V1 = (
    """
    CREATE TABLE messages (
        queue_id    TEXT PRIMARY KEY NOT NULL,
        created     REAL NOT NULL,
        sender      TEXT NOT NULL,
        size        INTEGER NOT NULL,
        priority    INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 3),
        envid       TEXT,
        ret         TEXT,
        body_type   TEXT NOT NULL,
        smtputf8    INTEGER NOT NULL DEFAULT 0,
        client_ip   TEXT NOT NULL DEFAULT '',
        client_helo TEXT NOT NULL DEFAULT '',
        listener    TEXT NOT NULL DEFAULT '',
        recipients  INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE bodies (
        queue_id TEXT PRIMARY KEY NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
        data     BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE recipients (
        id           INTEGER PRIMARY KEY,
        queue_id     TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
        address      TEXT NOT NULL,
        domain       TEXT NOT NULL,
        orcpt        TEXT,
        notify       TEXT,
        state        TEXT NOT NULL
                     CHECK (state IN ('queued', 'active', 'deferred', 'held', 'delivered', 'failed')),
        priority     INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 3),
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL,
        last_error   TEXT,
        lease_until  REAL,
        lease_owner  TEXT,
        updated      REAL
    )
    """,
    """
    CREATE TABLE attempts (
        id           INTEGER PRIMARY KEY,
        recipient_id INTEGER NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
        queue_id     TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
        at           REAL NOT NULL,
        host         TEXT,
        reply        TEXT,
        tls          TEXT,
        outcome      TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value TEXT
    )
    """,
    # '' sorts before every real ID, so max() against it works from the start.
    "INSERT INTO meta (key, value) VALUES ('last_queue_id', '')",
    # The scheduler's "what is due" scan.
    "CREATE INDEX recipients_state_next ON recipients (state, next_attempt)",
    # Per-destination views and connection reuse.
    "CREATE INDEX recipients_domain ON recipients (domain)",
    # Looking up a message's recipients, and the ON DELETE CASCADE from messages.
    "CREATE INDEX recipients_queue_id ON recipients (queue_id)",
    "CREATE INDEX attempts_queue_id ON attempts (queue_id)",
    # Not in the original list: without it the cascade from a deleted recipient
    # to its attempts scans the whole attempts table once per recipient.
    "CREATE INDEX attempts_recipient_id ON attempts (recipient_id)",
)

# Delivery: where each attempt went and how long it took, the delay-warning flag, and when a
# message became final (every recipient delivered or failed), which retention counts from.
_V2 = (
    "ALTER TABLE attempts ADD COLUMN ip TEXT",
    "ALTER TABLE attempts ADD COLUMN port INTEGER",
    "ALTER TABLE attempts ADD COLUMN duration REAL",
    "ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0",
    # The alias row a recipient was expanded from: its address is final, never expanded again.
    "ALTER TABLE recipients ADD COLUMN parent INTEGER",
    "ALTER TABLE messages ADD COLUMN done_at REAL",
    "CREATE INDEX messages_done_at ON messages (done_at) WHERE done_at IS NOT NULL",
)

# elemtactl: `queue list` pages through messages oldest first (by queue_id) with keyset
# pagination, so every filter it offers needs an index that yields queue_ids in order.
# Measured with 1,000,000 queued messages (bench/queue_fill.py): without these, the first page
# of `--state held` or `--domain D` took 50-75 ms (a temporary B-tree over every match) and
# `queue stats` by domain 1.9 s; with them, well under a millisecond and 0.33 s.
_V3 = (
    # `queue list --state S`: one range of this index, whatever the size of the queue.
    "CREATE INDEX recipients_state_queue ON recipients (state, queue_id)",
    # recipients_domain was never searched on its own. (domain, state, queue_id) serves
    # `queue list --domain D [--state S]` in queue_id order, `queue flush D`, and `queue stats`,
    # which counts pending recipients per domain and age from this index alone.
    "DROP INDEX recipients_domain",
    "CREATE INDEX recipients_domain_state ON recipients (domain, state, queue_id)",
)

# The scheduler's claim, most urgent first: per (state, priority) the due recipients in
# next_attempt order are one range of this index, so a claim costs a few probes however large a
# backlog of due mail is (with (state, next_attempt) it sorted every due recipient, 18 ms with
# 120,000 due). It replaces that index: the earliest next_attempt of a state is one probe per
# priority.
_V4 = (
    "DROP INDEX recipients_state_next",
    "CREATE INDEX recipients_state_priority_next ON recipients (state, priority, next_attempt)",
)

# REQUIRETLS (RFC 8689): the message goes on only over authenticated TLS.
_V5 = ("ALTER TABLE messages ADD COLUMN requiretls INTEGER NOT NULL DEFAULT 0",)

# The queue-ID high-water mark kept when a message is deleted instead of when one is stored:
# max(queue_id) of messages already covers every stored one, so only a deleted message's ID
# needs remembering. Storing mail then leaves the meta page alone, one 16 KiB WAL frame fewer per
# commit (10.7 -> 9.7 for one 5 KB message). A trigger, so every way a message is deleted
# (delivery's purge, elemtactl, the sqlite3 shell) keeps the mark.
_V6 = (
    """
    CREATE TRIGGER messages_high_water AFTER DELETE ON messages BEGIN
        UPDATE meta SET value = max(value, OLD.queue_id) WHERE key = 'last_queue_id';
    END
    """,
)
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4, _V5, _V6)
VERSION = len(MIGRATIONS)


def version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _refuse_newer(found: int, path_hint: str) -> None:
    if found > VERSION:
        raise QueueError(
            f"queue database{path_hint} has schema version {found}, but this elemta only "
            f"knows versions up to {VERSION}; it was written by a newer elemta. "
            "Run that version, or restore a backup made before the upgrade."
        )


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database up to VERSION in one transaction; return the version.

    Raises QueueError if the database is newer than this code, or if a
    migration fails (in which case nothing of it is applied).
    """
    path_hint = ""
    row = conn.execute("PRAGMA database_list").fetchone()
    if row is not None and row[2]:
        path_hint = f" {row[2]}"
    found = version(conn)
    _refuse_newer(found, path_hint)
    if found == VERSION:
        return found
    try:
        with db.write(conn):
            # Another process may have migrated between the check above and
            # taking the write lock; decide again under the lock.
            found = version(conn)
            _refuse_newer(found, path_hint)
            for step in MIGRATIONS[found:]:
                for statement in step:
                    conn.execute(statement)
            # user_version lives in the database header, which is part of the
            # transaction: a crash leaves the old version and none of the DDL.
            conn.execute(f"PRAGMA user_version = {VERSION}")
    except sqlite3.Error as exc:
        raise QueueError(
            f"could not migrate queue database{path_hint} from version {found} to {VERSION}: {exc}"
        ) from exc
    return VERSION


# -- statements the store runs, kept next to the DDL so a column change is made in one place

_INSERT_MESSAGE = (
    "INSERT INTO messages (queue_id, created, sender, size, priority, envid, ret, body_type,"
    " smtputf8, client_ip, client_helo, listener, recipients, requiretls)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_BODY = "INSERT INTO bodies (queue_id, data) VALUES (?, ?)"
_INSERT_RECIPIENT = (
    "INSERT INTO recipients (queue_id, address, domain, orcpt, notify, state, priority,"
    " next_attempt, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def insert_messages(conn: sqlite3.Connection, msgs: Iterable[NewMessage], now: float) -> int:
    """Insert messages, bodies and recipients inside the caller's transaction; return body bytes.

    Recipients start 'held' or 'queued' and are due at once (next_attempt =
    the received time); received_at 0.0 means "now".
    """
    messages, bodies, recipients = [], [], []
    nbytes = 0
    for m in msgs:
        created = m.received_at or now
        prio = priority_value(m.priority)
        state = "held" if m.hold else "queued"
        messages.append((
            m.queue_id, created, m.sender, len(m.body), prio, m.envid, m.ret, m.body_type,
            1 if m.smtputf8 else 0, m.client_ip, m.client_helo, m.listener, len(m.recipients),
            1 if m.requiretls else 0,
        ))
        bodies.append((m.queue_id, m.body))
        nbytes += len(m.body)
        for r in m.recipients:
            recipients.append((
                m.queue_id, r.address, recipient_domain(r.address), r.orcpt,
                ",".join(r.notify) if r.notify else None, state, prio, created, now,
            ))
    conn.executemany(_INSERT_MESSAGE, messages)
    conn.executemany(_INSERT_BODY, bodies)
    conn.executemany(_INSERT_RECIPIENT, recipients)
    # No high-water mark here: id_floor() sees these IDs in messages, and the trigger of _V6
    # moves them to meta when they are deleted.
    return nbytes


def release_active(conn: sqlite3.Connection, now: float, *, expired_only: bool,
                   keep: frozenset[int] = frozenset()) -> int:
    """Put 'active' recipients back to 'queued' (all, or those whose lease ran out), but those
    in keep; return how many."""
    kept = ",".join(str(int(rid)) for rid in keep)
    cur = conn.execute(
        "UPDATE recipients SET state = 'queued', lease_until = NULL, lease_owner = NULL, updated = ?"
        " WHERE state = 'active' AND (NOT ? OR lease_until IS NULL OR lease_until < ?)"
        + (f" AND id NOT IN ({kept})" if kept else ""),
        (now, 1 if expired_only else 0, now),
    )
    return cur.rowcount


def id_floor(conn: sqlite3.Connection) -> str | None:
    """The highest queue ID this database has seen, or None for a fresh one.

    Stored messages give max(queue_id); meta remembers the highest deleted one (the trigger
    of _V6), e.g. after the newest message was delivered and purged.
    """
    found = []
    for sql in ("SELECT value FROM meta WHERE key = 'last_queue_id'", "SELECT max(queue_id) FROM messages"):
        rows = conn.execute(sql).fetchall()
        if rows and ids.is_valid(rows[0][0]):
            found.append(rows[0][0])
    return max(found) if found else None


def undelivered_totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """(messages, body bytes) of messages with at least one recipient still to deliver."""
    marks = ", ".join("?" * len(UNDELIVERED_STATES))
    row = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM messages m WHERE EXISTS"
        f" (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND r.state IN ({marks}))",
        UNDELIVERED_STATES,
    ).fetchall()[0]
    return row[0], row[1]
