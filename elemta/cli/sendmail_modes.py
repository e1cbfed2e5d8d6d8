"""sendmail's modes other than plain submission: -bs (SMTP on stdin and stdout), -bp (mailq),
-q (flush the queue) and -bi (newaliases)."""

from __future__ import annotations

import os
import signal
import sys

from elemta import config as cfg
from elemta import maildrop, pidfile
from elemta.cli.sendmail_base import (
    EX_NOPERM,
    EX_UNAVAILABLE,
    Failure,
    Options,
    load_config,
    write_drop,
)
from elemta.errors import QueueError
from elemta.smtp.replies import Reply
from elemta.smtp.session import Client, Close, Enqueue, Output, Services, Session, Settings


def run(opts: Options, config: cfg.Config, program: str) -> int:
    if opts.mode == "s":
        return smtp_on_stdio(config, sys.stdin.buffer, sys.stdout.buffer)
    if opts.mode == "p":
        code = _elemtactl(opts, ["queue", "list"], program)
        waiting = _maildrop_count(config)
        if waiting:
            print(f"{program}: {waiting} message(s) in the maildrop {config.maildrop_path} wait for "
                  f"the daemon to take them", file=sys.stderr)
        return code
    if opts.mode == "q":
        return _elemtactl(opts, ["queue", "flush"], program)
    return newaliases(opts, config, program)


def smtp_on_stdio(config: cfg.Config, stdin, stdout) -> int:
    """-bs: an SMTP dialogue on stdin/stdout (mutt and some MUAs speak it), served by the
    daemon's own sans-IO session; each message accepted goes into the maildrop."""
    settings = Settings(
        hostname=config.hostname, role="submission", listener="sendmail -bs",
        max_message_size=config.smtp.max_message_size, max_recipients=config.smtp.max_recipients,
        max_errors=config.smtp.max_errors, max_received_headers=config.smtp.max_received_headers,
        auth_required=False, accept_all=True,  # a local user may send anywhere, as with plain sendmail
    )
    session = Session(settings, Client("127.0.0.1", trusted=True), Services(new_id=maildrop.new_name))

    def send(outputs: list[Output]) -> bool:
        """Write the replies; True when the session asked to close."""
        closing = False
        for out in outputs:
            if isinstance(out, Enqueue):
                closing = send(_store(session, config, out)) or closing
            elif isinstance(out, Close):
                closing = True
            elif isinstance(out, Reply):
                stdout.write(out.to_bytes())
        stdout.flush()
        return closing

    send(session.greeting())
    # Line by line, bare LF taken as CRLF: a script piping a whole dialogue into sendmail -bs
    # is no pipelining client that broke the rules (RFC 2920 §3.1 guards the network).
    for line in stdin:
        if line.endswith(b"\n") and not line.endswith(b"\r\n"):
            line = line[:-1] + b"\r\n"
        if send(session.feed(line)):
            break
    session.disconnected()
    return 0


def _store(session: Session, config: cfg.Config, out: Enqueue) -> list:
    message = out.message
    drop = maildrop.Drop(
        recipients=message.recipients, body=_without_first_field(message.body), sender=message.sender,
        envid=message.envid, ret=message.ret, body_type=message.body_type, smtputf8=message.smtputf8,
    )
    try:
        write_drop(config, drop, name=message.queue_id)
    except Failure as exc:
        return session.enqueue_failed(QueueError(str(exc)))
    return session.enqueued(message)


def _without_first_field(body: bytes) -> bytes:
    """The message without the Received field the session put first: it would name a client
    at 127.0.0.1; the daemon's pickup writes the true one, with the submitter's UID."""
    end = body.find(b"\r\n")
    while end >= 0 and body[end + 2:end + 3] in (b" ", b"\t"):
        end = body.find(b"\r\n", end + 2)
    return body[end + 2:] if end >= 0 else body


def _elemtactl(opts: Options, words: list[str], program: str) -> int:
    from elemta.cli import elemtactl

    args = (["--config", opts.config] if opts.config else []) + words
    try:
        elemtactl.main.main(args=args, prog_name=program, standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _maildrop_count(config: cfg.Config) -> int:
    try:
        return sum(1 for entry in os.scandir(config.maildrop_path) if maildrop.is_name(entry.name))
    except OSError:
        return 0  # an ordinary user may not list it: the queue listing said what it could


def newaliases(opts: Options, config: cfg.Config, program: str) -> int:
    """elemta keeps its aliases in elemta.toml ([local] aliases): there is no database to
    rebuild.  What newaliases promises, that the new aliases are used, is a reload."""
    load_config(opts.config)  # a broken config is reported (exit 78) before anything else
    source = config.source if config.source.startswith("/") else cfg.DEFAULT_PATH
    if not os.access(config.server.spool_dir, os.X_OK):
        print(f"{program}: cannot see whether elemta runs: {config.server.spool_dir}: permission denied "
              f"(run it as root, or systemctl reload elemta)", file=sys.stderr)
        return EX_NOPERM
    pid = pidfile.read_pid(config.server.spool_dir)
    if pid is None:
        print(f"{program}: aliases are read from {source} ([local] aliases) when elemta starts; "
              f"it is not running", file=sys.stderr)
        return 0
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        print(f"{program}: cannot tell elemta (PID {pid}) to reload: permission denied "
              f"(run it as root, or systemctl reload elemta)", file=sys.stderr)
        return EX_NOPERM
    except ProcessLookupError:
        print(f"{program}: elemta (PID {pid}) is gone", file=sys.stderr)
        return EX_UNAVAILABLE
    print(f"{program}: elemta (PID {pid}) reloads its aliases from {source}", file=sys.stderr)
    return 0
