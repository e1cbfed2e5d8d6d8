"""`sendmail`, `mailq`, `newaliases`: local submission (see elemta-sendmail(8)).

Work in progress: the flags and the maildrop come in the next commits.
"""

from __future__ import annotations

import sys

EX_UNAVAILABLE = 69


def main(argv: list[str] | None = None) -> int:
    print("sendmail: not implemented yet", file=sys.stderr)
    return EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
