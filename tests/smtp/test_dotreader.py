"""DataReader's size limit does not depend on how the input was split (issue 16, defect 2)."""

from __future__ import annotations

import random

import pytest

from elemta.smtp.dotreader import DataReader

LIMIT = 100


def feed_all(stream: bytes, cuts: list[int]) -> tuple[bool, bytes]:
    reader, start = DataReader(LIMIT), 0
    for end in cuts + [len(stream)]:
        done = reader.feed(stream[start:end])
        start = end
        if done is not None:
            return reader.too_big, done[0]
    raise AssertionError("no terminator found")


@pytest.mark.parametrize("size, too_big", [(LIMIT - 1, False), (LIMIT, False), (LIMIT + 1, True), (61_001, True)])
def test_limit_is_the_same_for_every_split(size, too_big):
    text = b"x" * (size - 2) + b"\r\n"  # the text's size counts its last CRLF
    stream = text + b".\r\n"
    rng = random.Random(size)
    splits = [[], list(range(1, len(stream))), sorted(rng.sample(range(1, len(stream)), 5))]
    splits += [[len(stream) - k] for k in range(1, 6)]  # the terminator cut anywhere
    for cuts in splits:
        assert feed_all(stream, cuts) == (too_big, b"" if too_big else text), cuts


def test_the_line_length_check_agrees_with_splitting_every_line():
    """check_text finds a long line by jumping through the text; it must say what splitting
    it into lines says, at every length around the limit, with or without a final CRLF."""
    import random

    from elemta.smtp.dotreader import MAX_TEXT_LINE, _lines_fit

    rng = random.Random(3)
    for _ in range(20_000):
        sizes = [rng.choice([0, 1, 2, 500, 997, 998, 999, 1000, 1001, rng.randrange(3000)])
                 for _ in range(rng.randrange(1, 8))]
        text = b"\r\n".join(b"x" * size for size in sizes) + (b"\r\n" if rng.random() < 0.7 else b"")
        assert _lines_fit(text) == (max(map(len, text.split(b"\r\n"))) <= MAX_TEXT_LINE), sizes


def reference(stream: bytes) -> tuple[bytes, bytes]:
    """The message text and the rest, the slow way: lines, the first "." line ends it."""
    index = (b"\r\n" + stream).find(b"\r\n.\r\n")
    text, rest = stream[:index], stream[index + 3:]
    lines = text.split(b"\r\n")  # a line is what lies between CRLFs: a bare CR or LF is in one
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines), rest


def test_the_reader_unstuffs_and_ends_where_the_lines_say_however_the_input_is_split():
    """One search finds both the stuffed dots and the terminator: it must agree with reading
    line by line, with dot lines anywhere (first, last, several, "..", "." alone in a bare-LF
    line), bare CRs and LFs next to dots, and the input cut at every place."""
    rng = random.Random(7)
    pieces = [b"a", b"xyz", b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.", b"\n.\r\n", b"\r.\r\n"]
    for trial in range(3_000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))
        stream = body + b"\r\n.\r\n" + b"QUIT\r\n"[: rng.randrange(7)]
        want = reference(stream)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 6))))
        for split in (cuts, list(range(1, len(stream)))):
            reader, start, got = DataReader(10_000), 0, None
            for end in split + [len(stream)]:
                got = reader.feed(stream[start:end])
                start = end
                if got is not None:
                    got = (got[0], got[1] + stream[end:])
                    break
            assert got == want, (trial, stream, split)


def test_bare_line_endings_are_found_next_to_crlf():
    from elemta.smtp import replies
    from elemta.smtp.dotreader import check_text

    assert check_text(b"a\r\nb\r\n") is None
    assert check_text(b"  \r\n  \r\n") is None  # the mask's own spaces are plain text
    for bad in (b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"a\r\n\n", b"a\n\r\n", b"a\r\n\r", b"\r"):
        assert check_text(bad) is replies.BARE_LINE_ENDING, bad
