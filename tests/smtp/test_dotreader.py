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
