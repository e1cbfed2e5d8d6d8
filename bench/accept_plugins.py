"""What the plugins cost: elemta's acceptance with no plugins and with spf + dkim (verify) +
dmarc + greylist (the client whitelisted), against a DNS server on loopback, in the same run.

smtp-source sends `--count` messages of 5 KB over 10 sessions (connections reused) to a fresh
elemta (delivery held, as in accept.py) for each run; runs alternate between the modes and the
medians are reported: msgs/s, the plugins' throughput as a share of the plain one, elemta's CPU
per 1,000 messages, and how many queries reached the DNS server (the cache answers the rest).
Mode `signed` sends a DKIM-signed message (RSA 2048, the plugin verifies it) instead of a plain
one (smtp-source -F).  The client is not in smtp.trusted_networks, so every check runs.
The plugins have their default timeouts (the built-ins run in the session's thread) unless
`--timeout S` puts them in pool threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the checkout, for tests.dnsserver and elemta

import accept
from accept import RCPT, SENDER, log, smtp_source, wait_count

from tests.dnsserver import DnsServer

DOMAIN = SENDER.rpartition("@")[2]
MODES = ("none", "plugins")  # "signed" needs an smtp-source with -F (not this one)
PLUGINS = """
[[plugins]]
use = "spf"
@TIMEOUT@
[[plugins]]
use = "dkim"
@TIMEOUT@
[[plugins]]
use = "dmarc"
@TIMEOUT@
[[plugins]]
use = "greylist"
@TIMEOUT@
[plugins.options]
whitelist = ["127.0.0.0/8"]
"""


class Elemta(accept.Elemta):
    def __init__(self, dns: str, plugins: bool, timeout: float | None = None, **kw):
        super().__init__(**kw)
        self.dns, self.plugins, self.timeout = dns, plugins, timeout

    def config_text(self, spool: str) -> str:
        text = super().config_text(spool)
        text = text.replace("[smtp]\n", "[smtp]\ntrusted_networks = []\n", 1)
        text = text.replace("[delivery]\n", f'[delivery]\nresolvers = ["{self.dns}"]\n', 1)
        text += "\n[limits]\nip_connections_per_minute = 0\nip_messages_per_hour = 0\nip_recipients_per_hour = 0\n"
        text += "ip_bytes_per_hour = 0\nsender_messages_per_hour = 0\n"
        timeout = "" if self.timeout is None else f"timeout = {self.timeout}"
        return text + (PLUGINS.replace("@TIMEOUT@", timeout) if self.plugins else "")


def signed_message(size: int, server: DnsServer, workdir: str) -> str:
    """A file for smtp-source -F: a message of about size bytes signed for DOMAIN."""
    import dkim

    from elemta.plugins.builtin import dkim_keys
    private, public = dkim_keys.generate("rsa", 2048)
    server.add(f"bench._domainkey.{DOMAIN}", "TXT", dkim_keys.record_strings("rsa", public))
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, (size - 600) // len(line))
    message = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: bench\r\n"
               f"Message-ID: <bench@{DOMAIN}>\r\n\r\n").encode() + body
    signature = dkim.sign(message, b"bench", DOMAIN.encode(), private,
                          include_headers=[b"from", b"to", b"subject", b"message-id"])
    path = os.path.join(workdir, "signed.eml")
    with open(path, "wb") as f:
        f.write(signature + message)
    return path


def one_run(mode: str, server: DnsServer, args, message_file: str) -> dict:
    elemta = Elemta(server.nameserver, plugins=mode != "none", timeout=args.timeout, log_level="warning")
    elemta.begin_round()
    try:
        before_queries, base = server.queries(), elemta.stored()
        cpu0 = elemta.cpu()
        extra = ("-F", message_file) if mode == "signed" else ()
        result = smtp_source(elemta.port, args.count, args.size, args.sessions, True, 600, extra=extra)
        wait_count(elemta, base + args.count, 60)
        cpu = elemta.cpu() - cpu0
        stored = elemta.stored() - base
    finally:
        failures = elemta.end_round()
    return {"mode": mode, "msgs_per_s": args.count / result["wall"], "cpu_ms_per_msg": cpu / args.count * 1000,
            "stored": stored, "dns_queries": server.queries() - before_queries, "exit": result["exit"],
            "stderr": result["stderr"][:3], "failures": failures}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=10000, metavar="N")
    p.add_argument("--size", type=int, default=5120, metavar="B")
    p.add_argument("--sessions", type=int, default=10, metavar="S")
    p.add_argument("--repeat", type=int, default=3, metavar="R")
    p.add_argument("--modes", default=",".join(MODES), metavar="M,M")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="the plugins' timeout; default: none set, so the built-ins run in the session's "
                        "thread (their default); above 0 runs them in pool threads")
    p.add_argument("--quick", action="store_true", help="1,000 messages, one run per mode")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.repeat = 1000, 1
    modes = args.modes.split(",")
    records = {DOMAIN: [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", 300)],
               f"_dmarc.{DOMAIN}": [("TXT", "v=DMARC1; p=reject", 300)]}
    runs = []
    with DnsServer(records) as server, tempfile.TemporaryDirectory() as workdir:
        message_file = signed_message(args.size, server, workdir)
        for r in range(args.repeat):
            for mode in modes:
                run = one_run(mode, server, args, message_file)
                log(f"run {r + 1} {mode}: {run['msgs_per_s']:.0f} msgs/s, {run['cpu_ms_per_msg']:.3f} ms CPU/msg, "
                    f"{run['dns_queries']} DNS queries, stored {run['stored']}/{args.count}")
                runs.append(run)
    summary = {}
    for mode in modes:
        mine = [x for x in runs if x["mode"] == mode]
        summary[mode] = {"msgs_per_s": statistics.median(x["msgs_per_s"] for x in mine),
                         "cpu_ms_per_msg": statistics.median(x["cpu_ms_per_msg"] for x in mine),
                         "dns_queries": max(x["dns_queries"] for x in mine),
                         "lost": sum(args.count - x["stored"] for x in mine)}
    base = summary.get("none", {}).get("msgs_per_s")
    print(f"\n{'mode':<8} {'msgs/s':>8} {'ratio':>6} {'CPU ms/msg':>10} {'DNS queries':>11} {'lost':>5}")
    for mode, s in summary.items():
        ratio = f"{s['msgs_per_s'] / base:.2f}" if base else "-"
        print(f"{mode:<8} {s['msgs_per_s']:>8.0f} {ratio:>6} {s['cpu_ms_per_msg']:>10.3f} {s['dns_queries']:>11} {s['lost']:>5}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=2)
    return 1 if any(s["lost"] for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
