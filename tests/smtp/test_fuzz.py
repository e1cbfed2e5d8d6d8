"""Fuzzing Session.feed: mutated dialogues fed whole, byte by byte and in random pieces.

A sans-IO session sees only the byte stream, never how TCP split it, so every split must give
the same replies (issue 16, defect 2), no input may raise, and every reply must be well formed
(RFC 5321 §4.2: a 3-digit code, text, CRLF; RFC 3463 §2: the enhanced code's class is the
reply's first digit).  Deterministic seed; ELEMTA_FUZZ_ITERATIONS runs longer.
"""

from __future__ import annotations

import os
import random
import re

import pytest

from elemta.smtp.session import Close, Enqueue
from tests.smtp.test_session import make_session

ITERATIONS = int(os.environ.get("ELEMTA_FUZZ_ITERATIONS", "300"))
LINE = re.compile(rb"([2-5][0-9][0-9])[ -]((?:[245])\.[0-9]{1,3}\.[0-9]{1,3} )?[^\r\n]*\r\n")

BODY = b"Subject: t\r\n\r\n" + b"x" * 120 + b"\r\n..dot\r\n.\r\n"
SEEDS = [
    [b"EHLO c.example\r\n", b"MAIL FROM:<a@s.example> SIZE=100 BODY=8BITMIME\r\n",
     b"RCPT TO:<b@local.example>\r\n", b"DATA\r\n", BODY, b"QUIT\r\n"],
    [b"EHLO c.example\r\n", b"MAIL FROM:<a@s.example>\r\n", b"RCPT TO:<b@local.example>\r\n",
     b"BDAT 5\r\n", b"Subje", b"BDAT 12 LAST\r\n", b"ct: t\r\n\r\nhi\r\n", b"NOOP\r\n"],
    [b"HELO c\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<b@local.example>\r\n", b"DATA\r\n",
     b"a\nb\r\n" + b"y" * 1200 + b"\r\n.\r\n", b"RSET\r\n", b"QUIT\r\n"],
    [b"EHLO c.example\r\n", b"AUTH PLAIN\r\n", b"AGFsaWNlAHNlY3JldA==\r\n", b"NOOP\r\n"],
    [b"EHLO c.example\r\n", b"MAIL FROM:<a@s.example> SIZE=\xd9\xa3\r\n",
     b"RCPT TO:<b@local.example>\r\n", b"BDAT \xc2\xb2 LAST\r\n", b"BDAT \xd9\xa3\r\n", b"abc",
     b"\x00\xff garbage\r\n", b"QUIT\r\n"],
    # Over max_message_size (2000 in make_session), terminator in the same piece.
    [b"EHLO c.example\r\n", b"MAIL FROM:<a@s.example>\r\n", b"RCPT TO:<b@local.example>\r\n",
     b"DATA\r\n", b"z" * 5_001 + b"\r\n.\r\n", b"NOOP\r\n"],
]
INSERTS = [b"\r\n", b"\n", b"\r", b".", b"\r\n.\r\n", b"\xc2\xb2", b"\xd9\xa3", b"0", b"9" * 12,
           b"BDAT 3\r\n", b"RSET\r\n", b"DATA\r\n", b"x" * 600, b" LAST", b"=", b"<", b">"]


def mutate(rng: random.Random, seed: list[bytes]) -> bytes:
    parts = list(seed)
    for _ in range(rng.randrange(4)):
        i = rng.randrange(len(parts))
        op = rng.randrange(5)
        if op == 0:
            del parts[i]
            if not parts:
                parts = [b"NOOP\r\n"]
        elif op == 1:
            parts.insert(i, rng.choice(parts))
        else:
            p = parts[i]
            at = rng.randrange(len(p) + 1)
            cut = at + rng.randrange(3) if op == 2 else at
            parts[i] = p[:at] + rng.choice(INSERTS) + p[cut:]
    return b"".join(parts)


def run(stream: bytes, cuts: list[int]) -> bytes:
    """Feed stream split at cuts; return every reply's bytes (enqueues accepted)."""
    session, _ = make_session()
    out, start = bytearray(), 0
    for end in cuts + [len(stream)]:
        out += _replies(session, session.feed(stream[start:end]))
        start = end
    return bytes(out)


def sync_cuts(stream: bytes) -> set[int]:
    """Where a client that waits for the 354 pauses: after each DATA line that got one.

    Whether message text came before the 354 is timing, not the byte stream (RFC 2920 §3.1:
    DATA ends a pipelined group; the session refuses text that arrived with the command), so
    every split keeps these pauses.  Fed byte by byte, no text can come with the DATA line.
    """
    session, _ = make_session()
    found = set()
    for i in range(len(stream)):
        if b"\r\n354 " in b"\r\n" + _replies(session, session.feed(stream[i : i + 1])):
            found.add(i + 1)
    return found


def _replies(session, outputs: list) -> bytes:
    out = bytearray()
    while outputs:
        item = outputs.pop(0)
        if isinstance(item, Enqueue):
            outputs[:0] = session.enqueued(item.message)
            continue
        if isinstance(item, Close):  # nothing on the wire; the session feeds nothing after it
            continue
        out += _wire(item)
    return bytes(out)


def _wire(reply) -> bytes:
    # The reply as the server writes it (replies.Reply's own rendering when it has one).
    for name in ("wire", "encode", "to_bytes"):
        method = getattr(reply, name, None)
        if callable(method):
            data = method()
            return data if isinstance(data, bytes) else data.encode()
    raise AssertionError(f"no wire form for {reply!r}")


def check_wellformed(data: bytes) -> None:
    pos = 0
    while pos < len(data):
        m = LINE.match(data, pos)
        assert m, f"malformed reply at {data[pos:pos + 80]!r}"
        if m.group(2):
            assert m.group(2)[:1] == m.group(1)[:1], f"class mismatch {m.group(0)!r}"
        pos = m.end()


def splits(rng: random.Random, n: int) -> list[list[int]]:
    random_cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randrange(1, 12)))) if n > 1 else []
    every = list(range(1, n))  # byte by byte
    return [random_cuts, every]


def test_fuzz_any_split_same_replies():
    rng = random.Random(16)
    for i in range(ITERATIONS):
        stream = mutate(rng, SEEDS[i % len(SEEDS)])
        pauses = sync_cuts(stream)
        whole = run(stream, sorted(pauses))
        check_wellformed(whole)
        for cuts in splits(rng, len(stream)):
            cuts = sorted(pauses.union(cuts))
            assert run(stream, cuts) == whole, f"dialogue {i}: {stream[:200]!r} split at {cuts[:20]}"


def test_size_limit_whatever_the_split():
    """Issue 16 defect 2: 5,001 octets over a 2000 limit got 250 when sent in one write."""
    stream = SEEDS[-1]
    whole = run(b"".join(stream), sorted(sync_cuts(b"".join(stream))))
    after_354 = whole.split(b"\r\n354 ")[1].split(b"\r\n")
    assert after_354[1].startswith(b"552 5.3.4 ") and after_354[2] == b"250 2.0.0 Ok"
    cuts, at = [], 0
    for part in stream[:-1]:
        at += len(part)
        cuts.append(at)
    assert run(b"".join(stream), cuts) == whole


def _limit_streams() -> list[bytes]:
    from elemta.smtp import auth
    from elemta.smtp.session import MAX_COMMAND, MAX_ENVELOPE_COMMAND

    streams = []
    for n in range(MAX_COMMAND - 8, MAX_COMMAND - 3):  # "NOOP " + n + CRLF around the limit
        streams += [b"EHLO c\r\nNOOP " + b"a" * n + end + b"NOOP\r\n" for end in (b"\r\n", b"\n")]
    for n in range(MAX_ENVELOPE_COMMAND - 28, MAX_ENVELOPE_COMMAND - 22):
        streams.append(b"EHLO c\r\nMAIL FROM:<" + b"a" * n + b"@x.example>\r\nNOOP\r\n")
    for n in range(auth.MAX_LINE - 1, auth.MAX_LINE + 2):  # RFC 4954 §4 continuation lines
        streams.append(b"EHLO c\r\nAUTH PLAIN\r\n" + b"A" * n + b"\r\nNOOP\r\n")
    return streams


def test_line_limits_whatever_the_split():
    """Command, envelope and AUTH line limits (and the draining of an overlong line) at
    and around their boundaries give the same replies whole, byte by byte and cut at random."""
    rng = random.Random(5321)
    for stream in _limit_streams():
        pauses = sync_cuts(stream)
        whole = run(stream, sorted(pauses))
        check_wellformed(whole)
        for cuts in splits(rng, len(stream)):
            assert run(stream, sorted(pauses.union(cuts))) == whole, stream[:40]


ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@s.example>\r\nRCPT TO:<b@local.example>\r\n"


@pytest.mark.parametrize("text, verdict", [
    (b"DATA\r\nS: t\r\n\r\na\r\nb\r\n.\r\n", b"250 2.0.0 Ok: queued"),
    (b"DATA\r\nS: t\r\n\r\na\rb\r\n.\r\n", b"550 5.6.0 "),
    # BDAT chunks are one text (RFC 3030 §2): a CR ending one chunk and the LF opening the
    # next are a CRLF, not bare line endings.
    (b"BDAT 10\r\nS: t\r\n\r\na\rBDAT 4 LAST\r\n\nb\r\n", b"250 2.0.0 Ok: queued"),
    (b"BDAT 10\r\nS: t\r\n\r\na\rBDAT 4 LAST\r\nxb\r\n", b"550 5.6.0 "),
])
def test_line_endings_across_any_boundary(text, verdict):
    """A CR at the end of one read and an LF at the start of the next are one CRLF."""
    stream = ENVELOPE + text + b"NOOP\r\n"
    pauses = sync_cuts(stream)
    whole = run(stream, sorted(pauses))
    assert whole.split(b"\r\n")[-3].startswith(verdict)
    for cut in range(1, len(stream)):
        assert run(stream, sorted(pauses | {cut})) == whole, cut
