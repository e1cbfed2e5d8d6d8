"""A DNSSEC testbed on loopback for the DANE tests: nsd serves test zones (signed with
ldns-signzone, or not), unbound validates them with the signed zone's DS as its trust anchor
and answers with the AD bit, as a site's own validating resolver does.  Debian's nsd, unbound
and ldnsutils (run-tests.sh installs them); every file in a temporary directory, every port an
ephemeral one on 127.0.0.1, both daemons stopped by their PIDs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Self

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from elemta.delivery import dane_openssl
from tests.support import wait_for

# For the tests of DANE in real handshakes: Debian's nsd, unbound and ldnsutils (run-tests.sh
# installs them) and OpenSSL's DANE through Python's ssl objects.
needs_dane = pytest.mark.skipif(
    not all(shutil.which(p) for p in ("nsd", "unbound", "ldns-signzone")) or not dane_openssl.available(),
    reason="nsd, unbound and ldnsutils (run-tests.sh installs them) and OpenSSL's DANE are needed")


def spki_sha256(leaf) -> str:
    """The "3 1 1" TLSA data of a trustme leaf certificate: SHA-256 of its public key (SPKI)."""
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()

SOA = "@ IN SOA ns.{zone}. admin.{zone}. 1 3600 600 86400 300\n@ IN NS ns.{zone}.\nns IN A 127.0.0.1\n"


def _gone(pid: int) -> bool:
    """The process has ended (and, if it is our child, unbound, it is reaped)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass  # not our child (nsd daemonizes): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1, for nsd and unbound to bind.  It is chosen
    below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768 up by default): a
    port from that range can be taken by any client's connection between this check and the
    servers' bind, which a busy machine (a benchmark beside the tests) does."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port for the DNSSEC testbed below the ephemeral range")


class DnssecTestbed:
    """zones: name -> zone-file lines (relative names); signed: which of them to sign.
    `after_signing` edits a signed zone's text (e.g. changes a record without signing it again:
    a bogus answer)."""

    def __init__(self, directory: Path, zones: dict[str, list[str]], signed: set[str],
                 after_signing: dict[str, tuple[str, str]] | None = None):
        self.dir = directory
        self.zones, self.signed = zones, signed
        self.after_signing = after_signing or {}
        self.auth_port, self.port = _free_port(), _free_port()
        self.zone_files: dict[str, str] = {}  # zone -> the file nsd serves (signed or not)
        self._pids: list[int] = []

    @property
    def nameserver(self) -> str:
        """The validating resolver, as delivery.resolvers takes it."""
        return f"127.0.0.1:{self.port}"

    def _run(self, *args: str) -> str:
        return subprocess.run(args, cwd=self.dir, capture_output=True, text=True, timeout=60, check=True).stdout

    def start(self) -> Self:
        anchors = []
        for zone, lines in self.zones.items():
            text = f"$ORIGIN {zone}.\n$TTL 300\n" + SOA.format(zone=zone) + "\n".join(lines) + "\n"
            path = self.dir / f"{zone}.zone"
            path.write_text(text)
            if zone in self.signed:
                ksk = self._run("ldns-keygen", "-a", "ECDSAP256SHA256", "-k", zone).strip()
                zsk = self._run("ldns-keygen", "-a", "ECDSAP256SHA256", zone).strip()
                self._run("ldns-signzone", path.name, ksk, zsk)
                signed = self.dir / f"{zone}.zone.signed"
                if zone in self.after_signing:
                    old, new = self.after_signing[zone]
                    signed.write_text(signed.read_text().replace(old, new))
                path = signed
                anchors.append((self.dir / f"{ksk}.ds").read_text().split(";")[0].replace("\t", " ").strip())
            self.zone_files[zone] = path.name
        d = self.dir
        (d / "nsd.conf").write_text(
            f"server:\n  ip-address: 127.0.0.1@{self.auth_port}\n  port: {self.auth_port}\n  database: \"\"\n"
            f"  username: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n"
            f"  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  zonesdir: \"{d}\"\n"
            "remote-control:\n  control-enable: no\n"
            + "".join(f"zone:\n  name: {z}\n  zonefile: {f}\n" for z, f in self.zone_files.items()))
        (d / "unbound.conf").write_text(
            f"server:\n  interface: 127.0.0.1@{self.port}\n  port: {self.port}\n  do-daemonize: no\n"
            f"  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n"
            f"  logfile: \"{d}/unbound.log\"\n  use-syslog: no\n  do-not-query-localhost: no\n"
            # test. is one of unbound's default local zones (RFC 6761): answered NXDOMAIN unless undone.
            "  local-zone: \"test.\" nodefault\n  domain-insecure: \".\"\n"
            "  module-config: \"validator iterator\"\n  access-control: 127.0.0.0/8 allow\n"
            + "".join(f"  trust-anchor: \"{a}\"\n" for a in anchors)
            + "remote-control:\n  control-enable: no\n"
            + "".join(f"stub-zone:\n  name: \"{z}\"\n  stub-addr: 127.0.0.1@{self.auth_port}\n" for z in self.zones))
        subprocess.run(["nsd", "-c", str(d / "nsd.conf"), "-P", str(d / "nsd.pid")], check=True, timeout=30)
        self._pids.append(self._wait_for_pid(d / "nsd.pid"))
        unbound = subprocess.Popen(["unbound", "-c", str(d / "unbound.conf")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        self._pids.append(unbound.pid)
        self._wait_until_answering()
        return self

    def _wait_for_pid(self, path: Path) -> int:
        def pid() -> int | None:
            text = path.read_text().strip() if path.exists() else ""
            return int(text) if text.isdigit() else None
        return wait_for(pid, timeout=15, what=f"a PID in {path}")

    def _wait_until_answering(self) -> None:
        zone = next(iter(self.zones))

        def answers() -> bool:
            try:
                dns.query.udp(dns.message.make_query(zone, dns.rdatatype.SOA), "127.0.0.1", port=self.port,
                              timeout=0.5)
            except (OSError, dns.exception.Timeout):
                return False
            return True
        wait_for(answers, timeout=15, what=f"unbound to answer (see {self.dir / 'unbound.log'})")

    def ad(self, name: str, rdtype: str) -> bool:
        """Whether the resolver marks the answer authenticated."""
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        query.flags |= dns.flags.AD
        return bool(dns.query.udp(query, "127.0.0.1", port=self.port, timeout=5).flags & dns.flags.AD)

    def stop(self) -> None:
        for pid in reversed(self._pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            wait_for(lambda pid=pid: _gone(pid), timeout=10, what=f"process {pid} to stop")
        self._pids.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
