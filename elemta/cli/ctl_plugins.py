"""`elemtactl plugins` (the statistics the running daemon writes, plugins/statsfile.py) and
`elemtactl dkim keygen` (a signing key and the DNS record to publish)."""

from __future__ import annotations

import json
import os

import click
from rich import box
from rich.table import Table

from elemta.cli.ctlbase import (
    EX_CANTCREAT,
    EX_USAGE,
    Ctl,
    CtlError,
    json_option,
    pass_ctl,
)
from elemta.cli.render import Output
from elemta.plugins import statsfile

DEFAULT_KEY_DIR = "/etc/elemta/dkim"


@click.command("plugins")
@json_option
@pass_ctl
def plugins(ctl: Ctl, as_json: bool) -> None:
    """Show the loaded plugins with their calls, verdicts, errors, timeouts and time per hook.

    The running daemon writes these every 5 seconds to <spool>/plugins/; the counts of all its
    processes are added up, and start at zero when the daemon starts.
    """
    config = ctl.config
    loaded, sources = statsfile.read_all(config.server.spool_dir)
    configured = [p.name for p in config.plugins if p.enabled]
    out = Output(as_json)
    if as_json:
        click.echo(json.dumps({"configured": configured, "processes": sources, "plugins": loaded}, indent=2))
        return
    if not sources:
        known = f" Configured: {', '.join(configured)}." if configured else ""
        out.note(f"elemta is not running (no statistics from a live process under {config.server.spool_dir}/plugins)."
                 + known)
        return
    if not loaded:
        out.note("No plugins are loaded.")
        return
    rows = []
    for p in loaded:
        for hook, s in p["hooks"].items():
            verdicts = ",".join(f"{k}={v}" for k, v in sorted(s["verdicts"].items()))
            mean = s["seconds"] / s["calls"] * 1000 if s["calls"] else 0.0
            rows.append((p["name"], hook, s["calls"], verdicts or "-", s["errors"], s["timeouts"],
                         f"{mean:.2f}", f"{s['max_seconds'] * 1000:.1f}", p["health"]))
    if not out.terminal:
        for row in rows:
            out.line(*row)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for title in ("Plugin", "Hook", "Calls", "Verdicts", "Errors", "Timeouts", "Mean ms", "Max ms", "Health"):
        numeric = title in ("Calls", "Errors", "Timeouts", "Mean ms", "Max ms")
        table.add_column(title, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(str(x) for x in row))
    out.console.print(table)
    errors = [(p["name"], p["last_error"]) for p in loaded if p.get("last_error")]
    for name, error in errors:
        out.console.print(f"{name}: last error: {error}")


@click.group("dkim")
def dkim() -> None:
    """DKIM signing keys (RFC 6376) for the dkim plugin."""


@dkim.command("keygen")
@click.argument("domain")
@click.argument("selector")
@click.option("--algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True,
              help="rsa-sha256 (every verifier) or ed25519-sha256 (RFC 8463; sign with both).")
@click.option("--bits", type=click.IntRange(1024, 4096), default=2048, show_default=True,
              help="RSA key size (RFC 8301: at least 1024, 2048 recommended).")
@click.option("--key-dir", default=DEFAULT_KEY_DIR, show_default=True, metavar="DIR",
              help="Where the private key is written, as DOMAIN.SELECTOR.key (mode 0640, group: the daemon's).")
@pass_ctl
def keygen(ctl: Ctl, domain: str, selector: str, algorithm: str, bits: int, key_dir: str) -> None:
    """Make a signing key for DOMAIN and SELECTOR and print the DNS TXT record to publish.

    The key file is never overwritten; add it to the dkim plugin's keys option.
    """
    from elemta.plugins.builtin import dkim_keys  # cryptography is slow to import

    domain = domain.strip().lower().rstrip(".")
    selector = selector.strip().lower()
    for what, value in (("domain", domain), ("selector", selector)):
        labels = value.split(".")
        if not value or not all(label and all(c.isalnum() or c in "-_" for c in label) for label in labels):
            raise CtlError(f"{what} {value!r}: expected DNS labels (letters, digits, - and _)", EX_USAGE)
    path = os.path.join(key_dir, f"{domain}.{selector}.key")
    group = ctl.service_gid() if os.geteuid() == 0 else None  # root writes for the daemon's group
    try:
        private, public = dkim_keys.generate(algorithm, bits)
        if not os.path.isdir(key_dir):
            os.makedirs(key_dir, mode=0o750)
            if group is not None:
                os.chown(key_dir, -1, group)
        dkim_keys.write_key(path, private, group)
    except FileExistsError:
        raise CtlError(f"{path}: exists; choose a new selector to rotate keys", EX_CANTCREAT) from None
    except (OSError, ValueError) as exc:
        raise CtlError(f"{path}: {exc}", EX_CANTCREAT) from None
    click.echo(f"; private key written to {path}", err=True)
    click.echo(dkim_keys.txt_record(domain, selector, algorithm, public))
