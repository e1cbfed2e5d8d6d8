"""Read-only queries behind `elemtactl queue list|show|trace|stats`, and the values they return.

The dataclasses' field names are the keys of elemtactl's --json output (docs/elemtactl.md), so a
renamed field is a changed interface. Times are Unix seconds; ages are whole seconds.

Every query here is shaped by an index (schema.py, version 3) so that it stays fast with a
million messages queued: `list` reads one range of an index per recipient state and never
sorts more than a page; `stats` counts from (domain, state, queue_id) without touching the
recipients table, taking message ages from the queue IDs (which are time-ordered: ids.py).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from elemta.errors import QueueError
from elemta.queue import ids
from elemta.queue.model import PRIORITIES, STATES, UNDELIVERED_STATES, priority_value

FINAL_STATES = ("delivered", "failed")
# Postfix qshape's columns: recipients whose message is younger than 5 minutes, 5 to 10, ...
BUCKET_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
# A queue ID is issued at MAIL and `created` is set at the end of DATA, so an ID's time is at
# most `created` -- unless the clock stepped back and the ID generator kept counting from the
# last ID (ids.py). --older-than bounds its scan by ID with this much slack for such a step.
_ID_CLOCK_SLACK = 3600.0
_HEADER_READ = 65_536  # bytes of the body read at a time while looking for the end of the header


@dataclass(frozen=True)
class Filters:
    """`queue list` filters; None = not filtered. Recipient filters match a recipient that is
    not final (or in `state`, when given); all given filters must hold for the same message."""

    state: str | None = None  # one of model.STATES
    domain: str | None = None  # recipient domain
    sender: str | None = None  # address (case-insensitive), "@domain", or "" / "<>" for bounces
    recipient: str | None = None  # address, case-insensitive
    older_than: float | None = None  # seconds
    priority: str | None = None  # one of model.PRIORITIES

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATES:
            raise ValueError(f"unknown state {self.state!r}; expected one of {', '.join(STATES)}")
        if self.priority is not None:
            priority_value(self.priority)
        if self.older_than is not None and self.older_than < 0:
            raise ValueError("older_than must not be negative")


@dataclass(frozen=True)
class RecipientState:
    address: str
    state: str


@dataclass(frozen=True)
class MessageSummary:
    queue_id: str
    created: float
    age: int
    size: int
    sender: str
    priority: str
    recipients: tuple[RecipientState, ...]
    next_attempt: float | None  # earliest of the recipients waiting (queued or deferred)
    last_error: str | None  # the most recent error of a recipient not yet delivered


@dataclass(frozen=True)
class Page:
    messages: tuple[MessageSummary, ...]
    next_after: str | None  # pass as `after` for the next page; None = this was the last


@dataclass(frozen=True)
class RecipientDetail:
    address: str
    state: str
    attempts: int
    next_attempt: float | None
    last_error: str | None
    orcpt: str | None
    notify: tuple[str, ...]
    updated: float | None
    expanded_from: str | None  # the alias this recipient was expanded from


@dataclass(frozen=True)
class MessageDetail:
    queue_id: str
    created: float
    age: int
    size: int
    sender: str
    priority: str
    client_ip: str
    client_helo: str
    listener: str
    envid: str | None
    ret: str | None
    body_type: str
    smtputf8: bool
    requiretls: bool  # RFC 8689
    done_at: float | None  # when the last recipient became final; its body is gone then
    body_available: bool
    headers: tuple[tuple[str, str], ...]
    recipients: tuple[RecipientDetail, ...]


@dataclass(frozen=True)
class Try:
    at: float
    outcome: str
    host: str | None
    ip: str | None
    port: int | None
    tls: str | None
    reply: str | None
    duration: float | None


@dataclass(frozen=True)
class RecipientTrace:
    address: str
    state: str
    attempts: int
    next_attempt: float | None  # when it is tried again; None once final, held or active
    last_error: str | None
    tries: tuple[Try, ...]


@dataclass(frozen=True)
class Trace:
    queue_id: str
    created: float
    sender: str
    recipients: tuple[RecipientTrace, ...]


@dataclass(frozen=True)
class DomainShape:
    domain: str
    total: int
    buckets: tuple[int, ...]  # one count per BUCKET_MINUTES, then the older ones


@dataclass(frozen=True)
class Stats:
    messages: int  # messages with a recipient still to deliver
    bytes: int  # their size
    oldest_age: int | None
    recipients_by_state: dict[str, int]  # every state; delivered/failed = kept for retention
    messages_by_priority: dict[str, int]
    bucket_minutes: tuple[int, ...]
    totals: tuple[int, ...]  # DomainShape.buckets summed over every domain
    domain_count: int
    domains: tuple[DomainShape, ...]  # most recipients first


class NoSuchMessage(QueueError):
    """No message with that queue ID (never queued, deleted, or purged after retention)."""


# -- list ---------------------------------------------------------------------------------------


def list_messages(conn: sqlite3.Connection, filters: Filters, limit: int, after: str, now: float) -> Page:
    """One page of messages, oldest first (by queue ID), after the queue ID `after` ('' = start).

    The page is found by one sub-query per recipient state, each reading one index range in
    queue_id order and stopping at limit + 1 messages, merged by UNION: never a scan or sort of
    the whole queue for a filter that has an index (state, domain, recipient), and for the
    others (sender, priority, age) a scan that stops at the first page of matches.
    limit 0 = no limit.
    """
    found = [row[0] for row in conn.execute(*_page_query(filters, limit, after, now))]
    more = bool(limit) and len(found) > limit
    if more:
        found = found[:limit]
    return Page(tuple(_summaries(conn, found, now)), found[-1] if more else None)


def _page_query(filters: Filters, limit: int, after: str, now: float) -> tuple[str, dict]:
    params: dict = {"after": after, "n": limit + 1 if limit else -1}
    where = ["r.queue_id > :after"]
    if filters.recipient is not None:
        params["address"] = filters.recipient
        where.append("r.address = :address COLLATE NOCASE")
        domain = filters.recipient.rpartition("@")[2] if "@" in filters.recipient else ""
        if filters.domain is not None and filters.domain.lower().rstrip(".") != domain.lower():
            where.append("0")  # two different domains: nothing can match
        params["domain"] = domain.lower()
        where.append("r.domain = :domain")
    elif filters.domain is not None:
        params["domain"] = filters.domain.lower().rstrip(".")
        where.append("r.domain = :domain")
    if filters.sender is not None:
        sender = filters.sender.strip()
        if sender in ("", "<>"):
            where.append("m.sender = ''")
        elif sender.startswith("@"):
            params["sender_domain"] = "%" + _like_escape(sender)
            where.append("m.sender LIKE :sender_domain ESCAPE '\\'")
        else:
            params["sender"] = sender.strip("<>")
            where.append("m.sender = :sender COLLATE NOCASE")
    if filters.priority is not None:
        params["priority"] = priority_value(filters.priority)
        where.append("m.priority = :priority")
    if filters.older_than is not None:
        cutoff = now - filters.older_than
        params["cutoff"] = cutoff
        where.append("m.created <= :cutoff")
        # Ages are a prefix of the ID order: bound the index range too, so a queue with nothing
        # that old costs one short range, not a scan of every message.
        params["id_bound"] = _id_at(cutoff + _ID_CLOCK_SLACK)
        where.append("r.queue_id <= :id_bound")
    states = (filters.state,) if filters.state else UNDELIVERED_STATES
    selects = []
    for index, state in enumerate(states):
        params[f"s{index}"] = state
        selects.append(
            "SELECT * FROM (SELECT r.queue_id AS queue_id FROM recipients r"
            " JOIN messages m ON m.queue_id = r.queue_id"
            f" WHERE r.state = :s{index} AND {' AND '.join(where)}"
            " GROUP BY r.queue_id ORDER BY r.queue_id LIMIT :n)"
        )
    return " UNION ".join(selects) + " ORDER BY queue_id LIMIT :n", params


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _id_at(when: float) -> str:
    """The largest queue ID that can have been issued at or before `when`."""
    tick = max(0, int(when * 1_000_000) + 1) << (ids.SEQ_BITS + ids.WORKER_BITS)
    return ids.encode(min(tick, 1 << 64) - 1)


def _summaries(conn: sqlite3.Connection, queue_ids: list[str], now: float) -> list[MessageSummary]:
    if not queue_ids:
        return []
    messages: dict[str, sqlite3.Row] = {}
    recipients: dict[str, list[sqlite3.Row]] = {}
    # In slices: SQLite caps the number of variables in one statement.
    for start in range(0, len(queue_ids), 500):
        chunk = queue_ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"SELECT queue_id, created, size, sender, priority FROM messages WHERE queue_id IN ({marks})", chunk
        ):
            messages[row[0]] = row
        for row in conn.execute(
            "SELECT queue_id, address, state, next_attempt, last_error, updated FROM recipients"
            f" WHERE queue_id IN ({marks}) ORDER BY queue_id, id", chunk,
        ):
            recipients.setdefault(row[0], []).append(row)
    result = []
    for qid in queue_ids:
        m = messages.get(qid)
        if m is None:
            continue  # not possible inside one read transaction, which every caller holds
        rcpts = recipients.get(qid, [])
        waiting = [r[3] for r in rcpts if r[2] in ("queued", "deferred") and r[3] is not None]
        errors = sorted((r[5] or 0, r[4]) for r in rcpts if r[4] and r[2] not in ("delivered",))
        result.append(MessageSummary(
            qid, m[1], _age(now, m[1]), m[2], m[3], PRIORITIES[m[4]],
            tuple(RecipientState(r[1], r[2]) for r in rcpts),
            min(waiting) if waiting else None, errors[-1][1] if errors else None,
        ))
    return result


def _age(now: float, created: float) -> int:
    return max(0, int(now - created))


# -- show and trace -----------------------------------------------------------------------------


def show(conn: sqlite3.Connection, queue_id: str, now: float) -> MessageDetail:
    m = _message(conn, queue_id)
    headers, has_body = _headers(conn, queue_id)
    by_id = {}
    details = []
    for r in conn.execute(
        "SELECT id, address, state, attempts, next_attempt, last_error, orcpt, notify, updated, parent"
        " FROM recipients WHERE queue_id = ? ORDER BY id", (queue_id,),
    ):
        by_id[r["id"]] = r["address"]
        details.append(RecipientDetail(
            r["address"], r["state"], r["attempts"], _waiting(r), r["last_error"], r["orcpt"],
            tuple(r["notify"].split(",")) if r["notify"] else (), r["updated"],
            by_id.get(r["parent"]) if r["parent"] is not None else None,
        ))
    return MessageDetail(
        queue_id, m["created"], _age(now, m["created"]), m["size"], m["sender"], PRIORITIES[m["priority"]],
        m["client_ip"], m["client_helo"], m["listener"], m["envid"], m["ret"], m["body_type"],
        bool(m["smtputf8"]), bool(m["requiretls"]), m["done_at"], has_body, headers, tuple(details),
    )


def body(conn: sqlite3.Connection, queue_id: str) -> bytes | None:
    """The message as stored (None once the message is final and its body was dropped)."""
    _message(conn, queue_id)
    row = conn.execute("SELECT data FROM bodies WHERE queue_id = ?", (queue_id,)).fetchone()
    return bytes(row[0]) if row else None


def trace(conn: sqlite3.Connection, queue_id: str) -> Trace:
    m = _message(conn, queue_id)
    tries: dict[int, list[Try]] = {}
    for a in conn.execute(
        "SELECT recipient_id, at, outcome, host, ip, port, tls, reply, duration FROM attempts"
        " WHERE queue_id = ? ORDER BY at, id", (queue_id,),
    ):
        tries.setdefault(a["recipient_id"], []).append(Try(
            a["at"], a["outcome"], a["host"], a["ip"], a["port"], a["tls"], a["reply"], a["duration"]))
    recipients = tuple(
        RecipientTrace(r["address"], r["state"], r["attempts"], _waiting(r), r["last_error"],
                       tuple(tries.get(r["id"], ())))
        for r in conn.execute(
            "SELECT id, address, state, attempts, next_attempt, last_error FROM recipients"
            " WHERE queue_id = ? ORDER BY id", (queue_id,),
        )
    )
    return Trace(queue_id, m["created"], m["sender"], recipients)


def _message(conn: sqlite3.Connection, queue_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    if row is None:
        raise NoSuchMessage(queue_id)
    return row


def _waiting(r: sqlite3.Row) -> float | None:
    """next_attempt means something only while the scheduler waits to try the recipient."""
    return r["next_attempt"] if r["state"] in ("queued", "deferred") else None


def _headers(conn: sqlite3.Connection, queue_id: str) -> tuple[tuple[tuple[str, str], ...], bool]:
    """The header fields (RFC 5322 §2.2: up to the first empty line), unfolded, and whether
    the body is still stored. Reads the body in growing prefixes: a 25 MB message is not
    loaded to show its Subject."""
    want = _HEADER_READ
    while True:
        row = conn.execute(
            "SELECT substr(data, 1, ?), length(data) FROM bodies WHERE queue_id = ?", (want, queue_id)
        ).fetchone()
        if row is None:
            return (), False
        data, total = bytes(row[0]), row[1]
        end = _header_end(data)
        if end is not None or want >= total:
            return parse_headers(data[: end if end is not None else len(data)]), True
        want *= 4


def _header_end(data: bytes) -> int | None:
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = data.find(sep)
        if at >= 0:
            return at
    return None


def parse_headers(data: bytes) -> tuple[tuple[str, str], ...]:
    """(name, value) pairs in order; folded lines joined (RFC 5322 §2.2.3), bytes as UTF-8.

    SMTPUTF8 mail carries UTF-8 header fields (RFC 6532); anything else that is not UTF-8 is
    shown with replacement characters rather than refused: this is for reading.
    """
    fields: list[list[str]] = []
    for line in data.replace(b"\r\n", b"\n").split(b"\n"):
        text = line.decode("utf-8", errors="replace")
        if text[:1] in (" ", "\t") and fields:
            fields[-1][1] += " " + text.strip()
        elif ":" in text:
            name, _, value = text.partition(":")
            fields.append([name.strip(), value.strip()])
    return tuple((name, value) for name, value in fields)


# -- stats --------------------------------------------------------------------------------------


def stats(conn: sqlite3.Connection, now: float) -> Stats:
    # One pass over the messages table: SQLite's GROUP BY would sort every row first.
    sums = ", ".join(f"sum(priority = {i})" for i in range(len(PRIORITIES)))
    row = conn.execute(
        f"SELECT count(*), coalesce(sum(size), 0), min(created), {sums} FROM messages WHERE done_at IS NULL"
    ).fetchone()
    by_priority = {name: row[3 + i] or 0 for i, name in enumerate(PRIORITIES)}
    oldest = _age(now, row[2]) if row[2] is not None else None
    by_state, shapes = _shape(conn, now)
    totals = [0] * (len(BUCKET_MINUTES) + 1)
    for shape in shapes:
        totals = [a + b for a, b in zip(totals, shape.buckets, strict=True)]
    shapes.sort(key=lambda s: (-s.total, s.domain))
    return Stats(row[0], row[1], oldest, by_state, by_priority, BUCKET_MINUTES, tuple(totals),
                 len(shapes), tuple(shapes))


def _shape(conn: sqlite3.Connection, now: float) -> tuple[dict[str, int], list[DomainShape]]:
    """Recipients per state, and pending ones per domain and message age (Postfix's qshape).

    One pass over the covering index (domain, state, queue_id), in its order, so GROUP BY needs
    no sort and the recipients table is never read. Ages come from the queue IDs, which sort by
    issue time: "older than 5 minutes" is "queue_id <= the last ID of 5 minutes ago", and
    messages need not be joined. Measured with 1,000,000 messages: 0.35 s, against 1.9 s for
    the same counts searched by state and joined to messages.
    """
    bounds = [_id_at(now - minutes * 60) for minutes in BUCKET_MINUTES]
    by_state = dict.fromkeys(STATES, 0)
    # Per domain: [pending recipients, of them older than BUCKET_MINUTES[0], [1], ...]
    cumulative: dict[str, list[int]] = {}
    for domain, state, count, *older_than in conn.execute(shape_sql(), bounds):
        by_state[state] = by_state.get(state, 0) + count
        if state in UNDELIVERED_STATES:
            counts = cumulative.setdefault(domain, [0] * (len(bounds) + 1))
            for k, value in enumerate((count, *older_than)):
                counts[k] += value
    shapes = []
    for domain, counts in cumulative.items():
        edges = [*counts, 0]  # each bucket is the difference of two neighbours
        shapes.append(DomainShape(domain, counts[0], tuple(edges[k] - edges[k + 1] for k in range(len(counts)))))
    return by_state, shapes


def shape_sql() -> str:
    """Per domain and state: recipients, and how many are older than each bucket's bound."""
    older = ", ".join("sum(queue_id <= ?)" for _ in BUCKET_MINUTES)
    return f"SELECT domain, state, count(*), {older} FROM recipients GROUP BY domain, state"
