"""One SMTP reply type for every side of elemta: the replies the server sends, the replies a
remote server gives the delivery client, and the refusals plugins ask for.

A reply is a code, an enhanced status code (RFC 3463; "" where there is none) and text.
What kind of reply it is follows from the first digit alone (RFC 5321 §4.2.1): 2 positive
completion, 3 positive intermediate, 4 transient negative, 5 permanent negative.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str = ""  # "X.Y.Z", or "" (the 220 greeting, EHLO, 354; a remote that gave none)
    text: str = ""  # lines joined by "\n" (a remote's: joined by a space)

    @property
    def is_positive(self) -> bool:
        """2yz: the command was done."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3yz: go on (354 after DATA, 334 in AUTH)."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4yz: not now; the same command may work later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5yz: never; do not repeat the same command."""
        return 500 <= self.code < 600

    def format(self, **fields: object) -> Reply:
        """The reply with its text's {name} fields filled."""
        return Reply(self.code, self.enhanced, self.text.format(**fields))

    def to_bytes(self) -> bytes:
        """As a server sends it: one line per text line, "-" after the code on all but the
        last, the enhanced code on each (RFC 2034 §3)."""
        # Kept with the reply: most replies are constants (replies.py), sent again and again.
        # (By hand, not functools.cached_property: on Python 3.11 its first read takes a lock.)
        wire = self.__dict__.get("_wire")
        if wire is None:
            wire = self.__dict__["_wire"] = self._encode()
        return wire

    def _encode(self) -> bytes:
        lines = self.text.split("\n")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = [f"{self.code}-{prefix}{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {prefix}{lines[-1]}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        """One line for logs and the queue's records: code, enhanced code, text."""
        text = self.text.replace("\n", " ")
        head = f"{self.code} {self.enhanced}" if self.enhanced else str(self.code)
        return f"{head} {text}" if text else head
