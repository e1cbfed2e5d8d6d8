"""Socket timeouts kept by the kernel (SO_RCVTIMEO/SO_SNDTIMEO), for the server's sessions and
the outbound client alike.

Python's own socket timeouts cost a poll() before every recv and send and an ioctl() for every
settimeout(): most of a plain-text conversation's system calls.  The kernel's cost nothing per
call.  Neither side uses them over TLS: when the kernel ends a read on a blocking SSLSocket,
OpenSSL says SSL_ERROR_WANT_READ and Python's ssl module simply reads again.
"""

from __future__ import annotations

import socket
import struct

_TIMEVAL = struct.Struct("@ll")  # struct timeval


def set_kernel_timeout(sock: socket.socket, option: int, seconds: float) -> float:
    """Set SO_RCVTIMEO or SO_SNDTIMEO to seconds (at least 1 ms: 0 would mean none at all);
    return what was set."""
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000)))
    return seconds
