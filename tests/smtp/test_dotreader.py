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
