"""DMARC (RFC 7489): does an authenticated identifier align with the From domain?

At on_message, after the spf and dkim plugins, this plugin finds the RFC5322.From domain,
discovers the domain owner's policy in DNS (§6.6.3), checks whether a passing SPF or DKIM
result is aligned with that domain (§3.1) and applies the policy to a failing message
(§6.6.4): reject, quarantine or nothing.  The SPF and DKIM results are read from
ctx.auth_results, the RFC 8601 method results that earlier plugins returned.

Organizational domains (§3.2) come from the Public Suffix List, loaded once at start().
"""

from __future__ import annotations

import random
import re
from collections.abc import Set
from dataclasses import dataclass
from typing import Any, ClassVar

from elemta.plugins import api

PSL_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"
POLICIES = ("none", "quarantine", "reject")
# §6.3 pct: a message not sampled gets the next policy down.
WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)*")
_URI = re.compile(r"[a-z][a-z0-9+.-]*:\S+", re.IGNORECASE)  # RFC 3986 §3.1 scheme ":" ...


def _ascii(domain: str) -> str:
    """The A-label form (DNS and the PSL file's rules are compared in it)."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain  # fails the host name check later


class PublicSuffixList:
    """The rules of https://publicsuffix.org/list/ as sets; None rules: the last two labels."""

    def __init__(self, rules: set[str] | None, wildcards: Set[str] = frozenset(),
                 exceptions: Set[str] = frozenset()):
        self.rules = rules
        self.wildcards = wildcards  # "*.ck" is kept as "ck"
        self.exceptions = exceptions  # "!www.ck" is kept as "www.ck"
        self._org: dict[str, str] = {}  # domain -> organizational domain, asked for every message

    @classmethod
    def load(cls, path: str) -> PublicSuffixList:
        rules, wildcards, exceptions = set(), set(), set()
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                # A rule is the line up to its first white space; "//" starts a comment.
                # The ICANN and PRIVATE sections are both rules for us.
                words = line.split()
                if not words or words[0].startswith("//"):
                    continue
                rule = words[0]
                if rule.startswith("!"):
                    exceptions.add(_ascii(rule[1:]))
                elif rule.startswith("*."):
                    wildcards.add(_ascii(rule[2:]))
                else:
                    rules.add(_ascii(rule))
        return cls(rules, wildcards, exceptions)

    def public_suffix_labels(self, labels: list[str]) -> int:
        """How many of the last labels are the public suffix (at least one: the "*" rule)."""
        # From the longest candidate down, so the first match is the longest matching rule;
        # an exception rule wins over the wildcard it carves out of.
        assert self.rules is not None, "without a list the caller takes the last label"
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate in self.exceptions:
                return len(labels) - i - 1
            if candidate in self.rules or (i + 1 < len(labels) and ".".join(labels[i + 1:]) in self.wildcards):
                return len(labels) - i
        return 1

    def organizational_domain(self, domain: str) -> str:
        """RFC 7489 §3.2: the public suffix plus one label (the domain itself if it is one)."""
        org = self._org.get(domain)
        if org is None:
            labels = _ascii(domain).split(".")
            suffix = 1 if self.rules is None else self.public_suffix_labels(labels)
            org = ".".join(labels[-(suffix + 1):])
            if len(self._org) >= 10000:
                self._org.clear()  # a bound, not an LRU: refilling costs little
            self._org[domain] = org
        return org


@dataclass(frozen=True)
class Policy:
    """A DMARC record's tags that matter here (§6.3); the reporting tags are not used."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


def is_dmarc_record(text: str) -> bool:
    # §6.4: "v=DMARC1" must be the first tag, the value exactly so; others are discarded.
    first = text.split(";", 1)[0]
    name, equals, value = first.partition("=")
    return bool(equals) and name.strip().lower() == "v" and value.strip() == "DMARC1"


def parse_record(text: str) -> Policy | None:
    """The policy of a DMARC record, or None when it has none (§6.6.3 step 6)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())  # unknown tags are ignored
    p, sp = tags.get("p", "").lower(), tags.get("sp", "").lower()
    if p not in POLICIES or (sp and sp not in POLICIES):
        # §6.6.3 step 6: no valid p (or a bad sp): with a usable rua it is p=none.
        if any(_URI.fullmatch(uri.strip()) for uri in tags.get("rua", "").split(",")):
            return Policy("none", "none")
        return None
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    pct = tags.get("pct", "100")
    return Policy(
        p, sp or p,
        adkim if adkim in ("r", "s") else "r",
        aspf if aspf in ("r", "s") else "r",
        int(pct) if pct.isascii() and pct.isdigit() and len(pct) <= 3 and int(pct) <= 100 else 100,
    )


def parse_auth_result(text: str) -> tuple[str, str, dict[str, str]]:
    """RFC 8601 §2.2 resinfo: (method, result, {ptype.property: value}), comments dropped."""
    if "(" in text:
        text = _uncommented(text)
    words = text.split()
    if not words:
        return "", "", {}
    method, _, result = words[0].partition("=")
    props: dict[str, str] = {}
    for word in words[1:]:
        key, equals, value = word.partition("=")
        if equals:
            props.setdefault(key.lower(), value.strip('"'))
    return method.partition("/")[0].lower(), result.lower(), props


def _uncommented(text: str) -> str:
    """text without its (comments), which may nest (RFC 5322 §3.2.2)."""
    plain, depth = [], 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            plain.append(char)
    return "".join(plain)


class DmarcPlugin(api.Plugin):
    default_timeout: ClassVar[float] = 0.0  # in the session's thread: its policy lookups end at the resolver's lifetime
    options: ClassVar[dict[str, Any]] = {
        "public_suffix_list": PSL_PATH,  # Public Suffix List file
        "override": {},  # From domain -> "none", "quarantine" or "reject", instead of its policy
        "enforce": True,  # false: only add the result, never reject or quarantine
        "on_temperror": "defer",  # "defer" (451 4.4.3) or "tag" when the policy lookup fails
        "reject_bad_from": False,  # reject a message without exactly one From domain
    }

    def __init__(self, name: str):
        super().__init__(name)
        self.psl_path = PSL_PATH
        self.psl = PublicSuffixList(None)
        self.override: dict[str, str] = {}
        self.enforce = True
        self.on_temperror = "defer"
        self.reject_bad_from = False
        self.rng = random.Random()  # pct sampling; tests put a predictable one here
        self._found: dict[str, tuple[float, tuple[Policy, str] | None]] = {}  # discover(), per From domain

    def configure(self, options):
        path = options["public_suffix_list"]
        if not isinstance(path, str) or not path:
            raise api.PluginError("public_suffix_list: must be the path of a file")
        self.psl_path = path
        override = {}
        for domain, policy in options["override"].items():
            if not isinstance(policy, str) or policy.lower() not in POLICIES:
                raise api.PluginError(f"override: {domain} = {policy!r} is not one of {', '.join(POLICIES)}")
            override[_ascii(str(domain))] = policy.lower()
        self.override = override
        if options["on_temperror"] not in ("defer", "tag"):
            raise api.PluginError(f"on_temperror: {options['on_temperror']!r} is not one of defer, tag")
        self.on_temperror = options["on_temperror"]
        for key in ("enforce", "reject_bad_from"):
            if not isinstance(options[key], bool):
                raise api.PluginError(f"{key}: must be true or false")
        self.enforce = options["enforce"]
        self.reject_bad_from = options["reject_bad_from"]

    def start(self, services):
        super().start(services)
        if services.dns is None:
            raise api.PluginError("dmarc needs the DNS resolver (delivery.resolvers)")
        try:
            self.psl = PublicSuffixList.load(self.psl_path)
        except FileNotFoundError:
            # Without the list, "last two labels" is right for most domains (not for
            # co.uk and the like); say so once.
            self.psl = PublicSuffixList(None)
            self.log("psl_missing", path=self.psl_path, fallback="last two labels")
        except (OSError, UnicodeError) as exc:
            raise api.PluginError(f"public_suffix_list: cannot read {self.psl_path}: {exc}") from None

    def organizational_domain(self, domain: str) -> str:
        return self.psl.organizational_domain(domain)

    # -- the hook ----------------------------------------------------------------------

    def on_message(self, ctx: api.Context):
        if ctx.connection is not None and ctx.connection.outbound:
            return None  # our users' own mail
        if ctx.message is None:
            return None
        notes = ctx.transaction.notes if ctx.transaction is not None else {}
        domains = sorted(set(ctx.message.from_domains()))
        if len(domains) != 1 or not _HOSTNAME.fullmatch(_ascii(domains[0])):
            # §6.6.1: without exactly one From domain DMARC cannot be applied; the receiver
            # decides what to do with such a message.
            why = {0: "no From domain", 1: "bad From domain"}.get(len(domains), "several From domains")
            notes["dmarc"] = {"result": "permerror", "domain": None, "policy": None, "disposition": "none"}
            self.log("checked", result="permerror", problem=why)
            extras = {"auth_results": (f"dmarc=permerror ({why})",)}
            if self.reject_bad_from:
                return api.reject(550, "5.7.1", "Message must have exactly one From domain (RFC 7489 6.6.1)",
                                  **extras)
            return api.proceed(**extras)
        from_domain = _ascii(domains[0])

        try:
            found = self.discover(from_domain)
        except api.DnsError as exc:
            notes["dmarc"] = {"result": "temperror", "domain": from_domain, "policy": None, "disposition": "none"}
            self.log("checked", result="temperror", domain=from_domain, problem=exc.text)
            extras = {"auth_results": (f"dmarc=temperror header.from={from_domain}",)}
            if self.on_temperror == "defer":
                # RFC 7489 §6.6.3 leaves a DNS failure to the receiver; RFC 3463 X.4.3 names it.
                return api.defer(451, "4.4.3", f"DMARC policy lookup for {from_domain} failed, try again later",
                                 **extras)
            return api.proceed(**extras)
        if found is None:
            # No policy published: DMARC is not applied (§6.6.3 steps 3, 5 and 6).
            notes["dmarc"] = {"result": "none", "domain": from_domain, "policy": None, "disposition": "none"}
            self.log("checked", result="none", domain=from_domain)
            return api.proceed(auth_results=(f"dmarc=none header.from={from_domain}",))
        policy, policy_domain = found

        passed = self.aligned(ctx.auth_results, from_domain, policy)
        # §6.3 sp: a record found at the organizational domain (not the From domain
        # itself) asks for sp for its subdomains.
        requested = policy.sp if policy_domain != from_domain else policy.p
        disposition = "none"
        if not passed:
            if from_domain in self.override:
                disposition = self.override[from_domain]  # local policy, as is
            else:
                disposition = requested
                # §6.6.4 and §6.3 pct: the policy applies to pct% of failing messages,
                # the others get the next policy down.
                if policy.pct < 100 and self.rng.random() * 100 >= policy.pct:
                    disposition = WEAKER[disposition]
            if not self.enforce:
                disposition = "none"
        result = "pass" if passed else "fail"
        notes["dmarc"] = {"result": result, "domain": from_domain, "policy": requested, "disposition": disposition}
        self.log("checked", result=result, domain=from_domain, policy=requested, disposition=disposition)
        extras = {"auth_results": (
            f"dmarc={result} (p={policy.p} sp={policy.sp} dis={disposition}) header.from={from_domain}",)}
        if disposition == "reject":
            return api.reject(550, "5.7.1", f"DMARC policy of {from_domain} rejects this message", **extras)
        if disposition == "quarantine":
            return api.quarantine("dmarc", **extras)
        return api.proceed(**extras)

    # -- policy discovery and alignment ----------------------------------------------------

    def discover(self, from_domain: str) -> tuple[Policy, str] | None:
        """§6.6.3: (policy, domain it was found at), or None; DnsError on a transient failure.
        Kept per From domain while the DNS answers it came from are valid."""
        cached = self._found.get(from_domain)
        if cached is not None and cached[0] > self.require_dns().now():
            return cached[1]
        records, until = self._records(from_domain)
        found_at = from_domain
        if not records:
            # Step 3: nothing at the From domain: ask its organizational domain.
            org = self.organizational_domain(from_domain)
            if org != from_domain:
                (records, org_until), found_at = self._records(org), org
                until = min(until, org_until)
        policy = parse_record(records[0]) if len(records) == 1 else None  # step 5: none, or several
        found = None if policy is None else (policy, found_at)
        if len(self._found) >= 10000:
            self._found.clear()  # a bound, not an LRU: one discovery refills an entry
        self._found[from_domain] = (until, found)
        return found

    def _records(self, domain: str) -> tuple[list[str], float]:
        """The DMARC records at domain, and until when that answer is valid."""
        try:
            texts, until = self.require_dns().txt_until(f"_dmarc.{domain}")
        except api.DnsError as exc:
            if exc.permanent:  # not a name DNS can hold: nothing published there
                return [], float("inf")
            raise
        return [text for text in texts if is_dmarc_record(text)], until

    def aligned(self, auth_results: list[str], from_domain: str, policy: Policy) -> bool:
        """§3.1: a passing SPF or DKIM result whose domain aligns with the From domain."""
        for text in auth_results:
            method, result, props = parse_auth_result(text)
            if result != "pass":
                continue
            if method == "spf":
                # §3.1.2: the MAIL FROM domain, or the HELO one for the null sender.
                identity = props.get("smtp.mailfrom") or props.get("smtp.helo") or ""
                if self._same(identity.rpartition("@")[2], from_domain, policy.aspf):
                    return True
            elif method == "dkim" and self._same(props.get("header.d", ""), from_domain, policy.adkim):
                return True  # §3.1.1: the signature's d= domain
        return False

    def _same(self, domain: str, from_domain: str, mode: str) -> bool:
        domain = _ascii(domain)
        if not domain:
            return False
        if mode == "s":  # strict: exactly the same name
            return domain == from_domain
        # relaxed: the same organizational domain
        return self.organizational_domain(domain) == self.organizational_domain(from_domain)
