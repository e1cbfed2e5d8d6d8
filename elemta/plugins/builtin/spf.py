"""SPF (RFC 7208): may the client send mail for the MAIL FROM domain?

At MAIL FROM this plugin runs check_host() (RFC 7208 §4) for the client's address and the
sender's domain, or for postmaster@<HELO name> when the reverse-path is null (§2.4).  The
evaluation itself is pyspf's (python3-spf 2.0.14); its DNS goes through elemta's shared
cached resolver (services.dns) so that SPF, DKIM, DMARC and delivery share one cache and
one set of nameservers.

Every result becomes an RFC 8601 method result ("spf=pass smtp.mailfrom=...") for the
core's Authentication-Results field (DMARC reads it), a Received-SPF field (§9.1) and
ctx.transaction.notes["spf"].  fail, softfail, temperror and permerror may also refuse the
transaction, each as configured.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Any, ClassVar

import dns.rdatatype
import spf as pyspf

from elemta.plugins import api

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
CHOICES = {
    "on_fail": ("reject", "tag"),
    "on_softfail": ("tag", "reject"),
    "on_temperror": ("defer", "tag"),
    "on_permerror": ("tag", "reject"),
}
RESULT_CACHE_SIZE = 10000  # (ip, sender, helo) results, each kept while its DNS answers are cached
# The record types pyspf asks for (type SPF/99 only in its "harsh" mode, which we don't use).
_RDTYPES = {
    "A": dns.rdatatype.A,
    "AAAA": dns.rdatatype.AAAA,
    "MX": dns.rdatatype.MX,
    "PTR": dns.rdatatype.PTR,
    "TXT": dns.rdatatype.TXT,
}
# RFC 5322 §3.2.3 dot-atom: such values need no quoting in Received-SPF (§9.1) or
# Authentication-Results (RFC 8601 §2.2).
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class _Query(pyspf.query):
    """pyspf's query, with its DNS through elemta's cache instead of pyspf's module-level
    DNSLookup (a process-wide global we must not replace)."""

    def __init__(self, resolver: api.Resolver, deadline: float, clock, **kwargs):
        super().__init__(**kwargs)
        self._resolver = resolver
        self._deadline = deadline
        self._clock = clock
        self.valid_until = float("inf")  # the earliest expiry of the answers used (resolver.now())

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        """Same contract as pyspf's query.dns(): a list of values for (name, qtype), [] for
        none.  CNAMEs are followed by the resolver; failures become TempError."""
        name = str(name).strip().rstrip(".").lower()
        rdtype = _RDTYPES.get(qtype)
        if not name or rdtype is None:
            return []
        if not name.isascii():
            try:
                name = name.encode("idna").decode("ascii")
            except UnicodeError:
                return []  # not a name DNS can hold: nothing there (§4.3)
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # as pyspf: a malformed name has no records
        # RFC 7208 §4.6.4: the receiver MAY bound the whole evaluation; past it, temperror.
        if self._clock() > self._deadline:
            raise pyspf.TempError(f"DNS: SPF evaluation took too long (at {name} {qtype})")
        try:
            _status, records, until = self._resolver.lookup_until(name, rdtype)
            self.valid_until = min(self.valid_until, until)
        except api.DnsError as exc:
            if exc.permanent:  # the name itself is unusable: no records
                return []
            raise pyspf.TempError(f"DNS {exc.text}") from None
        # pyspf's value formats: TXT a list of byte strings, MX (preference, host),
        # A/AAAA the address text, PTR the host name.
        if rdtype == dns.rdatatype.TXT:
            result = [list(strings) for strings in records]
        else:
            result = list(records)
        if not result and not ignore_void:
            # §4.6.4: more than two "void lookups" (NXDOMAIN or no answer) is a permerror.
            self.void_lookups += 1
            if self.void_lookups > pyspf.MAX_VOID_LOOKUPS:
                raise pyspf.PermError(f"Void lookup limit of {pyspf.MAX_VOID_LOOKUPS} exceeded")
        return result


class SpfPlugin(api.Plugin):
    # In the session's thread: its DNS waits end at the resolver's lifetime and at options.timeout.
    default_timeout: ClassVar[float] = 0.0
    options: ClassVar[dict[str, Any]] = {
        "on_fail": "reject",  # "reject" (550 5.7.23) or "tag"
        "on_softfail": "tag",  # "tag" or "reject" (550 5.7.23)
        "on_temperror": "defer",  # "defer" (451 4.4.3) or "tag"
        "on_permerror": "tag",  # "tag" or "reject" (550 5.5.2)
        "skip_networks": [],  # CIDRs of clients not checked
        "timeout": 20.0,  # seconds for the whole evaluation of one message (RFC 7208 §4.6.4: at least 20)
    }

    def __init__(self, name: str):
        super().__init__(name)
        self.actions = {key: CHOICES[key][0] for key in CHOICES}
        self.skip: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.timeout = 10.0
        self.clock = time.monotonic  # tests pass a fake one to run past the timeout
        self._results: dict[tuple[str, str, str], tuple[float, str, api.Verdict]] = {}

    def configure(self, options):
        for key, allowed in CHOICES.items():
            value = options[key]
            if value not in allowed:
                raise api.PluginError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
            self.actions[key] = value
        skip = []
        for cidr in options["skip_networks"]:
            try:
                skip.append(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError:
                raise api.PluginError(f"skip_networks: {cidr!r} is not a network (CIDR)") from None
        self.skip = skip
        timeout = options["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise api.PluginError(f"timeout: must be a number of seconds above 0, not {timeout!r}")
        self.timeout = float(timeout)

    def start(self, services):
        super().start(services)
        if services.dns is None:
            raise api.PluginError("spf needs the DNS resolver (delivery.resolvers)")

    # -- the hook ----------------------------------------------------------------------

    def on_mail_from(self, ctx: api.Context):
        conn, txn = ctx.connection, ctx.transaction
        assert conn is not None and txn is not None, "on_mail_from: in a connection and a transaction"
        if conn.outbound:
            return None  # our own users' mail: sign it, don't check it
        address = api.client_address(conn.ip)
        if address is None:
            return None  # no IP client (local injection): nothing for check_host()
        if any(address in network for network in self.skip):
            return None
        helo, sender = conn.helo or "", txn.sender
        # §2.4: with a null reverse-path the identity checked is postmaster@<HELO name>.
        identity = "mailfrom" if sender else "helo"
        domain = (sender.rpartition("@")[2] if "@" in sender else sender) if sender else helo
        domain = domain.lower().rstrip(".")
        # The result is a function of (ip, sender, helo) and the DNS answers: while all of
        # those answers are still valid in the cache, evaluating again gives the same result,
        # and so the same verdict.
        key, now = (conn.ip, sender, helo), self.require_dns().now()
        cached = self._results.get(key)
        if cached is not None and cached[0] > now:
            _until, result, verdict = cached
        else:
            result, explanation, problem, until = self._check(conn.ip, sender, helo, domain)
            verdict = self._verdict(result, explanation, problem, conn.ip, sender, helo, domain, identity)
            if result != "temperror" and until > now:
                if len(self._results) >= RESULT_CACHE_SIZE:
                    self._results.clear()  # a bound, not an LRU: one evaluation refills an entry
                self._results[key] = (until, result, verdict)
        txn.notes["spf"] = {"result": result, "domain": domain}
        self.log("checked", result=result, domain=domain, identity=identity, ip=conn.ip)
        return verdict

    def _verdict(self, result, explanation, problem, ip, sender, helo, domain, identity) -> api.Verdict:
        extras = {
            "auth_results": (_auth_result(result, sender, helo),),
            "add_headers": (("Received-SPF", _received_spf(
                result, ip, sender, helo, domain, identity, problem, self.require_services().hostname)),),
        }
        action = self.actions.get(f"on_{result}", "tag")
        if action == "reject" and result == "permerror":
            # RFC 7208 §8.7: the domain's record is broken.
            return api.reject(550, "5.5.2", _printable(f"SPF permanent error for {domain}: {problem}"),
                              **extras)
        if action == "reject":
            # RFC 7208 §8.4 and RFC 7372 §3.2: X.7.23 "SPF validation failed".  The text is
            # the domain's exp= explanation (§6.2), else ours rather than pyspf's default.
            if not explanation or explanation == pyspf.EXPLANATIONS.get(result):
                explanation = f"{domain} does not allow {ip} to send its mail"
            return api.reject(550, "5.7.23", _printable(f"SPF check failed: {explanation}"), **extras)
        if action == "defer":
            # RFC 7208 §8.6: a transient DNS error; the client retries later.
            return api.defer(451, "4.4.3", _printable(f"SPF check of {domain} failed temporarily, try again later"),
                             **extras)
        return api.proceed(**extras)

    # -- evaluation ----------------------------------------------------------------------

    def _check(self, ip: str, sender: str, helo: str, domain: str) -> tuple[str, str, str, float]:
        """check_host(): (result, explanation, problem, until when the DNS answers it used
        stay valid on the resolver's clock)."""
        if not _is_domain(domain):
            # §4.3: a malformed or single-label domain gives "none" without any lookup;
            # so does a HELO that is an address literal.
            return "none", "", f"{domain or 'no domain'} is not a domain name", float("inf")
        deadline = self.clock() + self.timeout
        try:
            query = _Query(self.require_dns(), deadline, self.clock, i=ip, s=sender,
                           h=helo or "unknown", receiver=self.require_services().hostname)
            result, _code, explanation = query.check()
        except pyspf.PermError as exc:  # from the query's set-up (a bad client address)
            return "permerror", "", str(exc), float("inf")
        if result not in RESULTS:  # "ambiguous" exists only in pyspf's harsh mode
            result = "permerror"
        return result, explanation or "", getattr(query, "prob", "") or "", query.valid_until


def _received_spf(result, ip, sender, helo, domain, identity, problem, receiver) -> str:
    """RFC 7208 §9.1: result (comment) client-ip=; envelope-from=; helo=; receiver=; ..."""
    comment = _comment(result, domain, ip, problem)
    pairs = [("client-ip", ip), ("envelope-from", sender)]
    if helo:
        pairs.append(("helo", helo))
    pairs.append(("receiver", receiver))
    if result == "permerror" and problem:
        pairs.append(("problem", problem))
    pairs.append(("identity", identity))
    values = "; ".join(f"{key}={_quote(value)}" for key, value in pairs)
    return f"{result} ({_comment_text(receiver)}: {_comment_text(comment)}) {values}"


def _comment(result: str, domain: str, ip: str, problem: str) -> str:
    if result == "pass":
        return f"domain of {domain} designates {ip} as permitted sender"
    if result in ("fail", "softfail"):
        return f"domain of {domain} does not designate {ip} as permitted sender"
    if result == "neutral":
        return f"{ip} is neither permitted nor denied by domain of {domain}"
    if result == "none":
        return f"{domain} does not designate permitted sender hosts"
    if result == "temperror":
        return f"temporary error in processing during lookup of {domain}"
    return f"permanent error in processing domain of {domain}: {problem}"


def _auth_result(result: str, sender: str, helo: str) -> str:
    """RFC 8601 §2.7.2 (and RFC 7208 §9.2): smtp.mailfrom, or smtp.helo for the null sender."""
    if not sender:
        return f"spf={result} smtp.helo={_pvalue(helo or 'unknown')}"
    local, _, domain = sender.rpartition("@")
    # A local-part that is not a dot-atom would need quoting, which the ';'-free form of
    # a method result cannot always carry; the domain alone is then enough (DMARC needs
    # only the domain).
    value = sender if _DOT_ATOM.fullmatch(local) and _DOT_ATOM.fullmatch(domain) else _pvalue(domain)
    return f"spf={result} smtp.mailfrom={value}"


def _pvalue(text: str) -> str:
    text = "".join(c for c in text if c.isprintable() and c not in ';"\\() ')
    return text or "unknown"


def _quote(value: str) -> str:
    """A dot-atom as it is, anything else as a quoted-string (RFC 5322 §3.2.4)."""
    if _DOT_ATOM.fullmatch(value):
        return value
    if not value.isprintable():
        value = "".join(c if c.isprintable() else "?" for c in value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    """Text safe inside an RFC 5322 comment: no parentheses, backslashes or controls."""
    return "".join("?" if c in "()\\" or not c.isprintable() else c for c in text)


def _printable(text: str, limit: int = 300) -> str:
    """One printable ASCII line for an SMTP reply (an exp= text is the domain owner's)."""
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text).strip()[:limit]


def _is_domain(domain: str) -> bool:
    # §4.3: check_host() needs a multi-label domain name with well-formed labels.
    try:
        ascii_name = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return False
    labels = ascii_name.lower().split(".")
    return len(labels) > 1 and all(_LABEL.fullmatch(label) for label in labels)
