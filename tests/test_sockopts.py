"""sockopts.py: kernel socket timeouts, read back from the kernel."""

import socket
import struct

import pytest

from elemta.sockopts import set_kernel_timeout

TIMEVAL = struct.Struct("@ll")


def kernel_value(sock: socket.socket, option: int) -> tuple[int, int]:
    return TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, option, TIMEVAL.size))


@pytest.mark.parametrize("option", [socket.SO_RCVTIMEO, socket.SO_SNDTIMEO])
def test_the_kernel_keeps_the_timeout(option):
    with socket.socket() as sock:
        assert set_kernel_timeout(sock, option, 2.5) == 2.5
        assert kernel_value(sock, option) == (2, 500000)


def test_zero_is_the_shortest_timeout_not_none():
    with socket.socket() as sock:
        assert set_kernel_timeout(sock, socket.SO_RCVTIMEO, 0) == 0.001
        assert kernel_value(sock, socket.SO_RCVTIMEO) != (0, 0)


def test_a_read_ends_when_the_timeout_runs_out():
    left, right = socket.socketpair()
    with left, right:
        set_kernel_timeout(left, socket.SO_RCVTIMEO, 0.05)
        with pytest.raises(BlockingIOError):
            left.recv(1)
