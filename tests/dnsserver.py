"""A small authoritative DNS server on 127.0.0.1 for tests (UDP and TCP, one port).

Built on dnslib's DNSServer: it binds whatever (address, port) it is given, so port 0
gives an ephemeral UDP port, which the TCP listener then binds too. Records can be
changed while the server runs; every query is counted so tests can see caching.
"""

from __future__ import annotations

import threading
from typing import Self

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSError
from dnslib.server import BaseResolver, DNSLogger, DNSServer

NEGATIVE_TTL = 60  # SOA TTL and MINIMUM, the negative-caching TTL (RFC 2308 §5)
FAILURES = ("servfail", "timeout", "refused")
_RDATA = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "TXT": TXT}
_MAX_CNAMES = 8


def _norm(name: str) -> str:
    return str(name).lower().rstrip(".")


def _rdata(rtype: str, value):
    if rtype == "MX":
        preference, exchange = value
        return MX(exchange, preference)
    if rtype not in _RDATA:
        raise ValueError(f"unsupported record type {rtype!r}")
    return _RDATA[rtype](value)


class _Answerer(BaseResolver):
    """dnslib calls resolve() from its handler threads."""

    def __init__(self, server: DnsServer):
        self.server = server

    def resolve(self, request, handler):  # dnslib's signature; handler unused
        return self.server._reply(request)


class DnsServer:
    """records: name -> [(rtype, value, ttl), ...]; see _rdata for the value of each type."""

    def __init__(self, records: dict | None = None):
        self._lock = threading.Lock()
        self._records: dict[str, list[tuple[str, object, int]]] = {}
        self._failures: dict[str, str] = {}
        self._log: list[tuple[str, str]] = []
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []
        self._port: int | None = None
        for name, rrs in (records or {}).items():
            for rtype, value, *ttl in rrs:
                self.add(name, rtype, value, *ttl)

    # -- records and behaviour -------------------------------------------------

    def add(self, name: str, rtype: str, value, ttl: int = 300) -> None:
        rtype = rtype.upper()
        rdata = _rdata(rtype, value)  # fail in the test, not in a handler thread
        with self._lock:
            self._records.setdefault(_norm(name), []).append((rtype, rdata, ttl))

    def remove(self, name: str) -> None:
        with self._lock:
            self._records.pop(_norm(name), None)

    def fail(self, name: str, how: str | None) -> None:
        """Answer queries for name with SERVFAIL, REFUSED or not at all; None: answer again."""
        if how is not None and how not in FAILURES:
            raise ValueError(f"how must be one of {FAILURES} or None, not {how!r}")
        with self._lock:
            if how is None:
                self._failures.pop(_norm(name), None)
            else:
                self._failures[_norm(name)] = how

    def queries(self, name: str | None = None, rtype: str | None = None) -> int:
        with self._lock:
            return sum(
                1 for qname, qtype in self._log
                if (name is None or qname == _norm(name))
                and (rtype is None or qtype == rtype.upper())
            )

    # -- answering ---------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        # A name with nothing of its own but names below it exists (an empty
        # non-terminal): NODATA, not NXDOMAIN (RFC 8020 §2).
        return name in self._records or any(k.endswith("." + name) for k in self._records)

    def _zone(self, name: str) -> str:
        """The apex for the SOA: the shortest ancestor-or-self in records, else the root."""
        labels = name.split(".") if name else []
        for i in range(len(labels) - 1, -1, -1):
            candidate = ".".join(labels[i:])
            if candidate in self._records:
                return candidate
        return ""

    def _reply(self, request):
        qname = _norm(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        reply = request.reply()
        # dnslib copies the query's AD flag into the reply; a server that validates nothing
        # must never set it (RFC 4035 §3.2.3), or DANE would believe unsigned answers.
        reply.header.ad = 0
        with self._lock:
            self._log.append((qname, qtype))
            how = self._failures.get(qname)
            if how == "timeout":
                # dnslib's handler catches DNSError and sends nothing back.
                raise DNSError(f"test server: not answering {qname}")
            if how is not None:
                reply.header.rcode = RCODE.SERVFAIL if how == "servfail" else RCODE.REFUSED
                return reply
            name, owner = qname, request.q.qname
            for _ in range(_MAX_CNAMES):
                rrs = self._records.get(name, [])
                found = [r for r in rrs if r[0] == qtype]
                cnames = [r for r in rrs if r[0] == "CNAME"]
                if not found and cnames and qtype != "CNAME":
                    # RFC 1034 §3.6.2: answer with the alias and continue at its target.
                    _, rdata, ttl = cnames[0]
                    reply.add_answer(RR(owner, QTYPE.CNAME, rdata=rdata, ttl=ttl))
                    name, owner = _norm(rdata.label), rdata.label
                    continue
                for rtype, rdata, ttl in found:
                    reply.add_answer(RR(owner, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
                break
            if not found:
                # RFC 2308 §3: negative answers carry the zone's SOA in the authority section.
                if not self._exists(name):
                    reply.header.rcode = RCODE.NXDOMAIN
                apex = self._zone(name) + "."  # "." when no zone in records holds it
                soa = SOA("ns." + apex.lstrip("."), "hostmaster." + apex.lstrip("."),
                          (1, 3600, 600, 86400, NEGATIVE_TTL))
                reply.add_auth(RR(apex, QTYPE.SOA, rdata=soa, ttl=NEGATIVE_TTL))
        return reply

    # -- running -----------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._port is None:
            raise RuntimeError("DnsServer is not started")
        return ("127.0.0.1", self._port)

    @property
    def nameserver(self) -> str:
        host, port = self.address
        return f"{host}:{port}"

    def start(self) -> Self:
        answerer = _Answerer(self)
        quiet = DNSLogger("-request,-reply,-truncated,-error", prefix=False)
        # The UDP port is picked by the kernel; the same TCP port is usually free
        # too, but another process may hold it, so try a few UDP ports.
        for _ in range(20):
            udp = DNSServer(answerer, address="127.0.0.1", port=0, logger=quiet)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(answerer, address="127.0.0.1", port=port, tcp=True, logger=quiet)
            except OSError:
                udp.server.server_close()
                continue
            break
        else:
            raise OSError("no port free for both UDP and TCP on 127.0.0.1")
        self._port = port
        self._servers = [udp, tcp]
        # serve_forever checks for shutdown() once per poll_interval (default 0.5 s).
        self._threads = [
            threading.Thread(target=s.server.serve_forever, kwargs={"poll_interval": 0.02},
                             name=f"dns-{port}", daemon=True)
            for s in self._servers
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.server.shutdown()  # returns once serve_forever has left its loop
            server.server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers, self._threads = [], []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
