"""smtp/context.py: the session's states and the moves between them."""

import pytest

from elemta.smtp.context import CLOSED, COMMAND, DATA, TRANSITIONS, WAIT_QUEUE, State
from tests.smtp.test_session import make_session


def test_every_state_has_its_moves_and_closed_is_the_end():
    assert set(TRANSITIONS) == set(State)
    assert all(CLOSED in moves for state, moves in TRANSITIONS.items() if state is not CLOSED)
    assert TRANSITIONS[CLOSED] == frozenset()


def test_a_move_the_table_does_not_list_is_refused():
    session, _ = make_session()
    session.enter(DATA)
    with pytest.raises(RuntimeError, match="no move from DATA to AUTH"):
        session.enter(State.AUTH)
    assert session.state is DATA
    session.enter(CLOSED)
    with pytest.raises(RuntimeError, match="no move from CLOSED to COMMAND"):
        session.enter(COMMAND)


def test_a_whole_dialogue_keeps_to_the_table():
    session, _ = make_session()
    seen = []
    moves = session.enter

    def recording(state):
        seen.append((session.state, state))
        moves(state)

    session.enter = recording
    session.greeting()
    for line in (b"EHLO client.example\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@local.example>\r\n",
                 b"DATA\r\n", b"Subject: x\r\n\r\nhello\r\n.\r\n"):
        session.feed(line)
    # The terminator comes back to COMMAND, then the finished transaction waits for the queue.
    assert seen == [(COMMAND, DATA), (DATA, COMMAND), (COMMAND, WAIT_QUEUE)]
