"""elemtactl's output: a rich table on a terminal, tab-separated lines when piped, or JSON.

Plain lines are for scripts: no colours, no header line, no shortening, times as ISO 8601 UTC
and ages in seconds, one record per line with tabs and newlines inside values turned into
spaces, so `cut -f1` gives queue IDs that `elemtactl queue hold -` reads back. Records of
different kinds (show, trace, stats) start with their kind. docs/elemtactl.md lists them.
The --json documents are the queue.query dataclasses as they are (dataclasses.asdict).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from typing import Any, Literal

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from elemta.queue.admin import Change
from elemta.queue.query import MessageDetail, Page, Stats, Trace

_ERROR_WIDTH = 60  # last error in the table; the plain line and --json carry all of it
_RECIPIENTS_SHOWN = 3


def plain_time(when: float | None) -> str:
    if when is None:
        return "-"
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_time(when: float | None) -> str:
    if when is None:
        return "-"
    return datetime.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")


def human_duration(seconds: float) -> str:
    """The two largest units: 45s, 12m30s, 2h05m, 3d04h."""
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def relative(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    if when <= now:
        return "now"
    return "in " + human_duration(when - now)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # not reached


def shorten(text: str | None, width: int) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _field(value: object) -> str:
    """One tab-separated field: never a tab or newline inside, '-' for nothing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return " ".join(str(value).split("\t")).replace("\r", " ").replace("\n", " ")


def sender_text(sender: str) -> str:
    return sender or "<>"


class Output:
    """Where one command's data goes: stdout, as JSON, a rich table or plain lines."""

    def __init__(self, as_json: bool = False, terminal: bool | None = None, console: Console | None = None):
        self.as_json = as_json
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self._console = console

    @property
    def console(self) -> Console:
        if self._console is None:
            # highlight=False: addresses and replies are shown as they are, not coloured by guesses.
            self._console = Console(file=sys.stdout, highlight=False)
        return self._console

    def json(self, value: object) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        click.echo(json.dumps(value, indent=2))

    def line(self, *fields: object) -> None:
        click.echo("\t".join(_field(f) for f in fields))

    def note(self, text: str) -> None:
        """A remark that is not data (an empty queue): on stdout for a person, on stderr for a
        pipe, so a script reading IDs never reads it as one."""
        click.echo(text, err=not self.terminal)

    # -- queue list ----------------------------------------------------------------------------

    def page(self, page: Page, now: float, empty: str) -> None:
        if self.as_json:
            return self.json(page)
        if not page.messages:
            return self.note(empty)
        if not self.terminal:
            for m in page.messages:
                self.line(m.queue_id, m.age, m.size, sender_text(m.sender), m.priority,
                          ",".join(f"{r.address}:{r.state}" for r in m.recipients),
                          plain_time(m.next_attempt), m.last_error)
            return None
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
            ("ID", "left"), ("Age", "right"), ("Size", "right"), ("Sender", "left"), ("Priority", "left"),
            ("Recipients", "left"), ("Next", "left"), ("Last error", "left"))
        for name, justify in columns:
            table.add_column(name, justify=justify, overflow="fold")
        for m in page.messages:
            shown = [f"{r.address} ({r.state})" for r in m.recipients[:_RECIPIENTS_SHOWN]]
            if len(m.recipients) > _RECIPIENTS_SHOWN:
                shown.append(f"+{len(m.recipients) - _RECIPIENTS_SHOWN} more")
            table.add_row(*(Text(cell) for cell in (
                m.queue_id, human_duration(m.age), human_size(m.size), sender_text(m.sender), m.priority,
                "\n".join(shown), relative(m.next_attempt, now), shorten(m.last_error, _ERROR_WIDTH))))
        if page.next_after:
            table.caption = f"more: add --after {page.next_after}"
        self.console.print(table)
        return None

    # -- queue show ----------------------------------------------------------------------------

    def detail(self, d: MessageDetail, now: float) -> None:
        if self.as_json:
            return self.json(d)
        envelope: list[tuple[str, Any]] = [
            ("queue_id", d.queue_id), ("created", d.created), ("age", d.age), ("size", d.size),
            ("sender", sender_text(d.sender)), ("priority", d.priority), ("client_ip", d.client_ip),
            ("client_helo", d.client_helo), ("listener", d.listener), ("envid", d.envid), ("ret", d.ret),
            ("body_type", d.body_type), ("smtputf8", d.smtputf8), ("requiretls", d.requiretls),
            ("done_at", d.done_at),
        ]
        body = "stored" if d.body_available else "dropped: every recipient is delivered or failed"
        if not self.terminal:
            for key, value in envelope:
                self.line(key, plain_time(value) if key in ("created", "done_at") else value)
            self.line("body", body)
            for name, value in d.headers:
                self.line("header", name, value)
            for r in d.recipients:
                self.line("recipient", r.address, r.state, r.attempts, plain_time(r.next_attempt), r.last_error,
                          r.orcpt, ",".join(r.notify), r.expanded_from)
            return None
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column(overflow="fold")
        for key, value in envelope:
            if key in ("created", "done_at"):
                value = local_time(value) if value is not None else None
            elif key == "age":
                value = human_duration(d.age)
            elif key == "size":
                value = f"{d.size} bytes" + (f" ({human_size(d.size)})" if d.size >= 1024 else "")
            grid.add_row(key, Text(_field(value)))
        grid.add_row("body", Text(body))
        self.console.print(grid)
        headers = Table(title="Headers", box=box.SIMPLE_HEAD, show_header=False, title_justify="left")
        headers.add_column(style="bold", no_wrap=True)
        headers.add_column(overflow="fold")
        for name, value in d.headers:
            headers.add_row(Text(name), Text(value))
        if d.headers:
            self.console.print(headers)
        rcpts = Table(title="Recipients", box=box.SIMPLE_HEAD, title_justify="left")
        for name in ("Address", "State", "Attempts", "Next", "Last error", "ORCPT", "NOTIFY"):
            rcpts.add_column(name, overflow="fold")
        for r in d.recipients:
            address = r.address + (f"\n(from {r.expanded_from})" if r.expanded_from else "")
            rcpts.add_row(*(Text(_field(c)) for c in (
                address, r.state, r.attempts, relative(r.next_attempt, now), r.last_error, r.orcpt,
                ",".join(r.notify))))
        self.console.print(rcpts)
        return None

    # -- queue trace ---------------------------------------------------------------------------

    def trace(self, t: Trace, now: float) -> None:
        if self.as_json:
            return self.json(t)
        if not self.terminal:
            for r in t.recipients:
                self.line("recipient", r.address, r.state, r.attempts, plain_time(r.next_attempt), r.last_error)
                for a in r.tries:
                    self.line("attempt", r.address, plain_time(a.at), a.outcome, a.host, a.ip, a.port, a.tls,
                              a.duration, a.reply)
            return None
        self.console.print(Text(f"{t.queue_id} from {sender_text(t.sender)}, received {local_time(t.created)}"))
        for r in t.recipients:
            when = f", next try {relative(r.next_attempt, now)}" if r.next_attempt is not None else ""
            table = Table(title=Text(f"{r.address}: {r.state}, {r.attempts} attempts{when}"),
                          title_justify="left", box=box.SIMPLE_HEAD)
            for name in ("Time", "Outcome", "Host", "Address", "TLS", "Duration", "Reply"):
                table.add_column(name, overflow="fold")
            for a in r.tries:
                address = f"{a.ip}:{a.port}" if a.ip and a.port else a.ip
                table.add_row(*(Text(_field(c)) for c in (
                    local_time(a.at), a.outcome, a.host, address, a.tls,
                    f"{a.duration:.2f}s" if a.duration is not None else None, a.reply)))
            if not r.tries:
                table.add_row(*(Text(c) for c in ("-", "no attempt yet", "", "", "", "", "")))
            self.console.print(table)
        return None

    # -- queue stats ---------------------------------------------------------------------------

    def stats(self, s: Stats, top: int) -> None:
        domains = s.domains[:top] if top else s.domains
        labels = [str(m) for m in s.bucket_minutes] + [f"{s.bucket_minutes[-1]}+"]
        if self.as_json:
            return self.json({**dataclasses.asdict(s), "domains": [dataclasses.asdict(d) for d in domains]})
        total = sum(s.totals)
        if not self.terminal:
            self.line("messages", s.messages)
            self.line("bytes", s.bytes)
            self.line("oldest_age", s.oldest_age)
            for state, count in s.recipients_by_state.items():
                self.line("state", state, count)
            for name, count in s.messages_by_priority.items():
                self.line("priority", name, count)
            self.line("buckets", "T", *labels)
            self.line("domain", "TOTAL", total, *s.totals)
            for d in domains:
                self.line("domain", d.domain, d.total, *d.buckets)
            return None
        oldest = human_duration(s.oldest_age) if s.oldest_age is not None else "-"
        self.console.print(Text(f"{s.messages} messages, {human_size(s.bytes)}, oldest {oldest}"))
        counts = Table(box=box.SIMPLE_HEAD, title="Recipients by state", title_justify="left")
        for name in s.recipients_by_state:
            counts.add_column(name, justify="right")
        counts.add_row(*(str(n) for n in s.recipients_by_state.values()))
        self.console.print(counts)
        prio = Table(box=box.SIMPLE_HEAD, title="Messages by priority", title_justify="left")
        for name in s.messages_by_priority:
            prio.add_column(name, justify="right")
        prio.add_row(*(str(n) for n in s.messages_by_priority.values()))
        self.console.print(prio)
        shape = Table(box=box.SIMPLE_HEAD, title="Pending recipients by domain and age (minutes)",
                      title_justify="left")
        shape.add_column("Domain", overflow="fold")
        for name in ("T", *labels):
            shape.add_column(name, justify="right")
        shape.add_row("TOTAL", str(total), *(str(n) for n in s.totals), end_section=True)
        for d in domains:
            shape.add_row(Text(d.domain or "(none)"), str(d.total), *(str(n) for n in d.buckets))
        if len(domains) < s.domain_count:
            shape.caption = f"{s.domain_count - len(domains)} more domains: --top 0 shows all"
        self.console.print(shape)
        return None

    # -- changes -------------------------------------------------------------------------------

    def change(self, c: Change) -> None:
        if self.as_json:
            return self.json(c)
        verb = {"hold": "held", "release": "released", "requeue": "requeued", "delete": "deleted",
                "flush": "flushed", "priority": "reprioritised"}[c.action]
        text = f"{verb} {_count(c.messages, 'message')} ({_count(c.recipients, 'recipient')})"
        if c.skipped:
            shown = ", ".join(c.skipped[:10]) + (", ..." if len(c.skipped) > 10 else "")
            text += f"; skipped {_count(len(c.skipped), 'message')} being delivered: {shown}"
        click.echo(text)
        return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
