"""`sendmail`, `mailq`, `newaliases`: local submission, as every Debian MTA provides it
(see elemta-sendmail(8)).

Any local user may run it.  The message goes into the maildrop (maildrop.py): a file the
kernel marks as the user's, which the daemon takes into the queue, or takes at its next start
if it is stopped.  Exit 0 means the file is on disk; errors use the sysexits.h codes that
cron, PHP's mail() and other callers test for.  The flags are sendmail's own, as cron, PHP,
git send-email, mutt and logwatch use them; the ones that steer sendmail's internals
(-odb, -oem, -v, ...) are accepted and ignored, as Postfix's sendmail does.
"""

from __future__ import annotations

import os
import sys

from elemta import config as cfg
from elemta import maildrop
from elemta.cli.sendmail_base import (
    EX_DATAERR,
    EX_TEMPFAIL,
    EX_USAGE,
    Failure,
    Options,
    Usage,
    load_config,
    write_drop,
)
from elemta.queue.model import NewRecipient
from elemta.smtp import address as addr

USAGE = "usage: {} [-t] [-i] [-f sender] [-F name] [-C config] [-bs | -bp | -bi | -q] [recipient ...]"

# Flags that take no value and change nothing here (-v verbose, -n no aliasing, -m me too,
# -U initial submission, -G gateway submission, -s save From lines, -x ...).
IGNORED_FLAGS = set("vnmUGsx")
# Flags whose value (attached or the next argument) is accepted and ignored: -X log file,
# -L syslog label, -h hop count, -A submit/mta config, -O option=value, -p protocol, -e.
IGNORED_WITH_VALUE = set("XLhAOpe")


def parse_args(argv: list[str], program: str) -> Options:
    opts = Options()
    if program == "mailq":
        opts.mode = "p"
    elif program == "newaliases":
        opts.mode = "i"
    i = 0

    def value(flag: str, rest: str) -> str:
        nonlocal i
        if rest:
            return rest
        i += 1
        if i >= len(argv):
            raise Usage(f"option -{flag} needs a value")
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            opts.recipients.extend(argv[i + 1:])
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            i += 1
            continue
        flag, rest = arg[1], arg[2:]
        if flag in "ti" or flag in IGNORED_FLAGS:
            # Flags without a value, alone or grouped as getopt allows ("-ti" = "-t -i").
            for letter in flag + rest:
                if letter == "t":
                    opts.extract = True
                elif letter == "i":
                    opts.dot_ends = False
                elif letter not in IGNORED_FLAGS:
                    raise Usage(f"unknown option -{letter} in {arg}")
            i += 1
            continue
        elif flag == "o":  # -oX[value]: only -oi means something here
            if rest == "i":
                opts.dot_ends = False
            elif not rest:
                raise Usage("option -o needs a letter (such as -oi)")
        elif flag in "fr":
            opts.sender = _strip_brackets(value(flag, rest))
        elif flag == "F":
            opts.full_name = value(flag, rest).replace("\r", " ").replace("\n", " ")
        elif flag == "b":
            if rest not in ("m", "s", "p", "i", "d", "v", "t", "D", "a", "h", "H", "P"):
                raise Usage(f"unknown mode -b{rest}")
            if rest in ("d", "D"):
                raise Usage("-bd: run the daemon as elemta (systemctl start elemta), not sendmail")
            if rest not in ("m", "s", "p", "i"):
                raise Usage(f"-b{rest} is not supported by elemta")
            opts.mode = rest
        elif flag == "q":
            opts.mode = "q"  # -q, -q30m, -qR site, -qS sender, -qI id: all flush the queue
        elif flag == "N":
            opts.notify = _notify(value(flag, rest))
        elif flag == "R":
            ret = value(flag, rest).upper()
            if ret not in ("FULL", "HDRS"):
                raise Usage(f"-R {ret.lower()}: expected full or hdrs")
            opts.ret = ret
        elif flag == "V":
            opts.envid = value(flag, rest)
        elif flag == "B":
            body = value(flag, rest).upper()
            if body not in ("7BIT", "8BITMIME"):
                raise Usage(f"-B {body}: expected 7BIT or 8BITMIME")
            opts.body_type = body
        elif flag == "C":
            opts.config = value(flag, rest)
        elif flag in IGNORED_WITH_VALUE:
            value(flag, rest)
        elif flag == "d":  # -d debug flags: ignored
            pass
        else:
            raise Usage(f"unknown option -{flag}")
        i += 1
    return opts


def _strip_brackets(text: str) -> str:
    text = text.strip()
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def _notify(text: str) -> tuple[str, ...]:
    """-N never | success,failure,delay (RFC 3461 §4.1 NOTIFY)."""
    words = tuple(w.strip().upper() for w in text.split(",") if w.strip())
    if words == ("NEVER",):
        return words
    if not words or any(w not in ("SUCCESS", "FAILURE", "DELAY") for w in words):
        raise Usage(f"-N {text}: expected never, or success, failure and delay separated by commas")
    return words


def read_message(stream, dot_ends: bool, limit: int) -> bytes:
    """The message from stream with CRLF line endings; a lone "." ends it unless -i."""
    lines = []
    size = 0
    for line in stream:
        text = line[:-1] if line.endswith(b"\n") else line
        if text.endswith(b"\r"):
            text = text[:-1]
        if dot_ends and text == b".":
            break
        size += len(text) + 2
        if size > limit:
            raise Failure(EX_DATAERR, f"the message is larger than smtp.max_message_size ({limit} octets)")
        lines.append(text)
    return b"".join(line + b"\r\n" for line in lines)


def header_fields(message: bytes) -> list[tuple[str, str]]:
    """The header section's fields as (lower-case name, unfolded value) (RFC 5322 §2.2.3)."""
    end = message.find(b"\r\n\r\n")
    head = (message if end < 0 else message[:end]).decode("utf-8", "surrogateescape")
    fields: list[list[str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1] += line
        elif ":" in line:
            name, value = line.split(":", 1)
            fields.append([name.strip().lower(), value])
    return [(name, value.strip()) for name, value in fields]


def header_recipients(message: bytes) -> tuple[list[str], bytes]:
    """-t: the addresses in To, Cc and Bcc (or in Resent-To/-Cc/-Bcc when the message has
    any, RFC 5322 §3.6.6), and the message without its Bcc fields."""
    fields = header_fields(message)
    resent = any(name in ("resent-to", "resent-cc", "resent-bcc") for name, _ in fields)
    names = {f"resent-{n}" if resent else n for n in ("to", "cc", "bcc")}
    found = parse_addresses([value for name, value in fields if name in names])
    return found, _without_fields(message, {b"bcc", b"resent-bcc"} if resent else {b"bcc"})


def parse_addresses(values: list[str]) -> list[str]:
    """The addresses in address-list values ("A <a@x>, b@y", groups, comments): email.utils
    does it right; it is imported only when a value needs it (a plain address does not)."""
    if all(not any(c in value for c in ',<>()":;') and " " not in value.strip() for value in values):
        return [value.strip() for value in values if value.strip()]
    import email.utils

    return [address for _, address in email.utils.getaddresses(values) if address]


def _without_fields(message: bytes, names: set[bytes]) -> bytes:
    end = message.find(b"\r\n\r\n")
    head, body = (message, b"") if end < 0 else (message[:end + 2], message[end + 2:])
    kept, dropping = [], False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in names
        if not dropping:
            kept.append(line)
    return b"".join(line + b"\r\n" for line in kept) + body


def qualify(address: str, config: cfg.Config) -> str:
    """A bare user name (cron's "root") gets @hostname, as other MTAs append their origin.
    The host name is asked for only then: without /etc/mailname it is a DNS lookup."""
    address = _strip_brackets(address)
    return address if "@" in address or not address else f"{address}@{config.hostname}"


def check_address(address: str, what: str, code: int, allow_null: bool = False) -> str:
    try:
        return str(addr.parse_path(f"<{address}>", smtputf8=True, allow_null=allow_null, allow_postmaster=True))
    except addr.AddressError as exc:
        raise Failure(code, f"{what} {address!r}: {exc}") from None


def submit(opts: Options, config: cfg.Config, stdin) -> str:
    message = read_message(stdin, opts.dot_ends, config.smtp.max_message_size)
    cli = parse_addresses(opts.recipients)
    if opts.recipients and not cli:
        raise Usage(f"no address in {' '.join(opts.recipients)!r}")
    addresses = [check_address(qualify(a, config), "recipient", EX_USAGE) for a in cli]
    if opts.extract:
        found, message = header_recipients(message)
        addresses += [check_address(qualify(a, config), "recipient in the header", EX_DATAERR) for a in found]
        if not addresses:
            raise Failure(EX_DATAERR, "no recipients: the message has no To, Cc or Bcc address")
    elif not addresses:
        raise Usage("no recipients given (name them, or use -t to take them from the message)")
    sender = None
    if opts.sender is not None:
        sender = check_address(qualify(opts.sender, config), "sender (-f)", EX_USAGE, allow_null=True)
    unique = list(dict.fromkeys(addresses))
    body_type = opts.body_type or ("7BIT" if message.isascii() else "8BITMIME")
    drop = maildrop.Drop(
        recipients=tuple(NewRecipient(a, None, opts.notify) for a in unique), body=message,
        sender=sender, full_name=opts.full_name, envid=opts.envid, ret=opts.ret, body_type=body_type,
        smtputf8=not all(a.isascii() for a in [*unique, sender or ""]),
    )
    return write_drop(config, drop)


def program_name(argv0: str) -> str:
    return os.path.basename(argv0 or "sendmail")


def main(argv: list[str] | None = None) -> int:
    program = program_name(sys.argv[0])
    args = sys.argv[1:] if argv is None else argv
    shown = "sendmail" if program == "elemta-sendmail" else program
    if args[:1] == ["--help"]:
        print(f"{USAGE.format(shown)}\nSee elemta-sendmail(8) for every option.")
        return 0
    try:
        opts = parse_args(args, program)
        config = load_config(opts.config)
        if opts.mode == "m":
            submit(opts, config, sys.stdin.buffer)
            return 0
        from elemta.cli import sendmail_modes  # the other modes, imported only when used

        return sendmail_modes.run(opts, config, shown)
    except Usage as exc:
        print(f"{shown}: {exc}", file=sys.stderr)
        print(USAGE.format(shown), file=sys.stderr)
        return EX_USAGE
    except Failure as exc:
        for line in str(exc).splitlines():  # a bad config may name several problems, one a line
            print(f"{shown}: {line}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
