"""DKIM (RFC 6376): verify the signatures of inbound mail, sign our users' outbound mail.

Outbound mail (an authenticated user or a trusted network, Connection.outbound) is signed with
every key configured for its domain; everything else is verified.  The cryptography is
dkimpy's; this module picks the keys, maps dkimpy's outcomes onto RFC 8601 results and looks
keys up through elemta's shared DNS cache.

Verification only reports: the DMARC plugin decides what a failure means, unless
reject_on_fail is set.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from elemta.plugins import api

# RFC 6376 §5.4.1 lists what SHOULD be signed; these are the fields a reader sees or a
# client acts on.  From is always signed whatever the option says.
SIGN_HEADERS = [
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
    "content-type", "content-transfer-encoding", "in-reply-to", "references", "list-id",
    "list-unsubscribe",
]
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: signers MUST NOT use shorter keys, verifiers MUST NOT accept them
KEY_FIELDS = ("domain", "selector", "key_file")  # one table of options["keys"]

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")  # d= and s= (RFC 6376 §3.5), ASCII only
_TOKEN = re.compile(r"[A-Za-z0-9+_.-]+")  # an RFC 2045 token that needs no quotes
_COMMENT_DROP = re.compile(r"[^A-Za-z0-9 .,:=_/@+-]")

# dkimpy logs each failure it handles itself; our own log line says what happened instead.
_DKIMPY_LOG = logging.getLogger("elemta.plugins.dkim.dkimpy")
_DKIMPY_LOG.addHandler(logging.NullHandler())
_DKIMPY_LOG.propagate = False


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes  # in the form dkimpy's sign() takes for that algorithm
    path: str


class _KeyLookup:
    """dkimpy's dnsfunc (called as dnsfunc(name, timeout=...), returns the TXT text or None),
    answered from the shared cache; remembers why no usable key came back."""

    def __init__(self, dns):
        self.dns = dns
        self.asked = False
        self.problem = ""  # set when the key is missing or unusable: a permerror

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        # timeout is dkimpy's; the shared resolver has its own (delivery.resolvers).
        self.asked = True
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            self.problem = "bad key name"
            return None
        # DnsError propagates out of dkimpy's verify() (it is no DKIMException): temperror.
        records = self.dns.txt(text)
        # RFC 6376 §6.1.2 step 3: with several records we may pick one; take the first that
        # looks like a key record.
        keys = [r for r in records if "p=" in r] or records
        if not keys:
            self.problem = "no key"
            return None
        record = keys[0].encode("utf-8", "replace")
        # RFC 6376 §3.6.1: an empty p= means the key was revoked.
        if re.search(rb"(?:^|;)\s*p\s*=\s*(?:;|$)", record):
            self.problem = "key revoked"
            return record
        try:  # dkimpy parses the record again itself; here only to tell a bad key from a bad signature
            dkim.evaluate_pk(name, record)
        except (dkim.KeyFormatError, binascii.Error):
            self.problem = "bad key record"
        return record


class DkimPlugin(api.Plugin):
    default_timeout: ClassVar[float] = 0.0  # in the session's thread: its key lookups end at the resolver's lifetime
    options: ClassVar[dict[str, Any]] = {
        "verify": True,
        "sign": True,
        "max_signatures": 5,
        "reject_on_fail": False,
        "keys": [],
        "sign_headers": list(SIGN_HEADERS),
    }

    def __init__(self, name: str):
        super().__init__(name)
        self.settings = dict(self.options)
        self.keys: dict[str, list[SigningKey]] = {}  # domain -> its keys, in config order
        self.sign_set: frozenset[bytes] = frozenset()

    # -- configuration -----------------------------------------------------------------------

    def configure(self, options):
        if not 1 <= options["max_signatures"] <= 50:
            raise api.PluginError("max_signatures: must be from 1 to 50")
        seen = set()
        for i, entry in enumerate(options["keys"]):
            where = f"keys[{i}]"
            api.check_table(where, entry, KEY_FIELDS)
            for field in KEY_FIELDS:
                if not isinstance(entry.get(field), str) or not entry[field]:
                    raise api.PluginError(f"{where}.{field}: expected a non-empty string")
            domain = entry["domain"].lower().rstrip(".")
            if not _NAME.fullmatch(domain) or "." not in domain:
                raise api.PluginError(f"{where}.domain: {entry['domain']!r} is not a domain name")
            if not _NAME.fullmatch(entry["selector"]):
                raise api.PluginError(f"{where}.selector: {entry['selector']!r} must be DNS labels "
                                      "joined by dots (RFC 6376 §3.1)")
            if not os.path.isabs(entry["key_file"]):
                raise api.PluginError(f"{where}.key_file: {entry['key_file']!r} must be an absolute path")
            if (domain, entry["selector"].lower()) in seen:
                raise api.PluginError(f"{where}: {entry['selector']}._domainkey.{domain} is configured twice")
            seen.add((domain, entry["selector"].lower()))
        names = []
        for name in options["sign_headers"]:
            if not isinstance(name, str) or not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
                raise api.PluginError(f"sign_headers: {name!r} is not a header field name")
            if name.lower().encode() in dkim.DKIM.SHOULD_NOT:
                # RFC 6376 §5.4.1: fields that change in transit would break the signature.
                raise api.PluginError(f"sign_headers: {name} must not be signed (RFC 6376 §5.4.1)")
            names.append(name.lower().encode())
        self.sign_set = frozenset(names) | {b"from"}  # RFC 6376 §5.4: From MUST be signed
        self.settings = dict(options)

    def start(self, services):
        super().start(services)
        if self.settings["verify"] and services.dns is None:
            raise api.PluginError("verify: needs the DNS resolver, and none was given")
        self.keys = {}
        if self.settings["sign"]:
            for entry in self.settings["keys"]:
                key = self._load_key(entry["domain"].lower().rstrip("."), entry["selector"], entry["key_file"])
                self.keys.setdefault(key.domain, []).append(key)

    def _load_key(self, domain: str, selector: str, path: str) -> SigningKey:
        """Read one key file: PEM (PKCS#1 or PKCS#8) RSA or Ed25519, or the base64 Ed25519 seed
        dkimpy's dknewkey writes.  The algorithm follows from the key."""
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(1 << 20)
        except OSError as exc:
            raise api.PluginError(f"key file {path}: {exc.strerror or exc}") from None
        if mode & 0o006:  # refused, as sshd refuses such a host key
            raise api.PluginError(f"key file {path}: readable or writable by others (mode {mode & 0o7777:04o}); "
                                  f"run chmod o-rwx {path}")
        if b"-----BEGIN" in data:
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except TypeError:
                raise api.PluginError(f"key file {path}: the key is encrypted; store it without a passphrase") from None
            except ValueError as exc:
                raise api.PluginError(f"key file {path}: not a usable private key ({exc})") from None
            except Exception as exc:  # noqa: BLE001 - e.g. UnsupportedAlgorithm
                raise api.PluginError(f"key file {path}: not a usable private key ({type(exc).__name__})") from None
        else:
            try:
                seed = base64.b64decode(data.strip(), validate=True)
            except (binascii.Error, ValueError):
                seed = b""
            if len(seed) != 32:
                raise api.PluginError(f"key file {path}: neither a PEM private key nor a base64 ed25519 seed")
            key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise api.PluginError(f"key file {path}: RSA key of {key.key_size} bits, DKIM needs at "
                                      f"least {MIN_RSA_BITS} (RFC 8301 §3.2)")
            algorithm = b"rsa-sha256"  # RFC 8301 §3.1: never rsa-sha1
            # dkimpy parses a PKCS#1 PEM ("BEGIN RSA PRIVATE KEY").
            private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            algorithm = b"ed25519-sha256"  # RFC 8463 §3
            # dkimpy takes the 32-octet seed in base64 (nacl's SigningKey).
            private = base64.b64encode(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                         serialization.NoEncryption()))
        else:
            raise api.PluginError(f"key file {path}: {type(key).__name__} is neither RSA nor Ed25519")
        signing = SigningKey(domain, selector, algorithm, private, path)
        try:  # one trial signature, so a key dkimpy cannot use stops the start, not a message
            dkim.DKIM(b"From: a@" + domain.encode() + b"\r\n\r\n", logger=_DKIMPY_LOG).sign(
                selector.encode(), domain.encode(), private, signature_algorithm=algorithm,
                include_headers=[b"from"])
        except dkim.DKIMException as exc:
            raise api.PluginError(f"key file {path}: dkimpy cannot sign with it ({exc})") from None
        return signing

    # -- the hook ----------------------------------------------------------------------------

    def on_message(self, ctx: api.Context) -> api.Verdict | None:
        if ctx.message is None:
            return None
        if ctx.connection is not None and ctx.connection.outbound:
            return self._sign(ctx) if self.settings["sign"] else None
        return self._verify(ctx) if self.settings["verify"] else None

    # -- signing (RFC 6376 §5) ---------------------------------------------------------------

    def signing_domain(self, ctx: api.Context) -> str | None:
        """The configured domain to sign as: the From domain or its closest parent with keys
        (d= equal to or a parent of the From domain is what DMARC relaxed alignment needs,
        RFC 7489 §3.1.1), else the same for the envelope sender's domain, else None."""
        assert ctx.message is not None, "on_message: the message is there"
        candidates = list(ctx.message.from_domains())
        if ctx.transaction is not None and ctx.transaction.sender_domain:
            candidates.append(ctx.transaction.sender_domain)
        for domain in candidates:
            keyed = self.keyed_domain(domain)
            if keyed is not None:
                return keyed
        return None

    def keyed_domain(self, domain: str) -> str | None:
        """domain or its closest parent with signing keys, or None."""
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):  # stop before the bare top-level label
            parent = ".".join(labels[i:])
            if parent in self.keys:
                return parent
        return None

    def signature_fields(self, raw: bytes, domain: str) -> bytes:
        """The DKIM-Signature fields (CRLF-ended, to go before the header) for a message elemta
        makes itself, such as a TLS report (RFC 8460 §5.3 wants them signed): as domain or its
        closest parent with keys; b"" when there is no key or signing failed (logged)."""
        keyed = self.keyed_domain(domain)
        if keyed is None:
            return b""
        try:
            message = dkim.DKIM(raw, logger=_DKIMPY_LOG)
        except dkim.DKIMException as exc:
            self.log("not_signed", domain=keyed, reason=_comment(str(exc)))
            return b""
        return b"".join(f"DKIM-Signature: {value}\r\n".encode("ascii")
                        for value, _ in self._signatures(message, keyed, ""))

    def _sign(self, ctx: api.Context) -> api.Verdict | None:
        if not self.keys:
            return None  # signing not set up: nothing worth a log line per message
        assert ctx.message is not None, "on_message: the message is there"
        domain = self.signing_domain(ctx)
        queue_id = ctx.transaction.queue_id if ctx.transaction else ""
        if domain is None:
            self.log("not_signed", qid=queue_id, reason="no key for the From or sender domain")
            return None
        try:
            message = dkim.DKIM(ctx.message.raw, logger=_DKIMPY_LOG)
        except dkim.DKIMException as exc:
            self.log("not_signed", qid=queue_id, domain=domain, reason=_comment(str(exc)))
            return None
        signatures = self._signatures(message, domain, queue_id)
        if not signatures:
            return None
        self.log("signed", qid=queue_id, domain=domain, selectors=",".join(s for _, s in signatures))
        return api.proceed(add_headers=tuple(("DKIM-Signature", value) for value, _ in signatures))

    def _signatures(self, message: dkim.DKIM, domain: str, queue_id: str) -> list[tuple[str, str]]:
        """(DKIM-Signature value, selector) for each of domain's keys that signed."""
        # Sign the listed fields the message has, each instance (RFC 6376 §5.4.2), then From
        # once more: an instance added later (a second From) breaks the signature (§8.15).
        include = [name.lower() for name, _ in message.headers if name.lower() in self.sign_set] + [b"from"]
        out = []
        for key in self.keys[domain]:
            try:
                signed = message.sign(key.selector.encode(), domain.encode(), key.private,
                                      signature_algorithm=key.algorithm, canonicalize=(b"relaxed", b"relaxed"),
                                      include_headers=include)
            except dkim.DKIMException as exc:
                self.log("sign_failed", qid=queue_id, domain=domain, selector=key.selector,
                         reason=_comment(str(exc)))
                continue
            # dkimpy gives b"DKIM-Signature: v=1; ...\r\n", folded with CRLF + space.
            out.append((signed.split(b":", 1)[1].strip().decode("ascii"), key.selector))
        return out

    # -- verifying (RFC 6376 §6) -------------------------------------------------------------

    def _verify(self, ctx: api.Context) -> api.Verdict | None:
        assert ctx.message is not None, "on_message: the message is there"
        queue_id = ctx.transaction.queue_id if ctx.transaction else ""
        if not ctx.message.get_all("dkim-signature"):
            # Unsigned: nothing for dkimpy to do, and its parse of the message is most of
            # what a verification costs.
            if ctx.transaction is not None:
                ctx.transaction.notes["dkim"] = []
            return api.proceed(auth_results=("dkim=none",))
        try:
            message = dkim.DKIM(ctx.message.raw, logger=_DKIMPY_LOG, minkey=MIN_RSA_BITS)
            signatures = [value for name, value in message.headers if name.lower() == b"dkim-signature"]
        except dkim.DKIMException:
            message = None  # the header section does not parse; report each signature we see
            signatures = [v.encode("utf-8", "replace") for v in ctx.message.get_all("dkim-signature")]
        checked = signatures[: self.settings["max_signatures"]]
        if len(signatures) > len(checked):
            # RFC 6376 §6.1: a verifier may limit the signatures it checks.
            self.log("signatures_skipped", qid=queue_id, count=len(signatures) - len(checked))
        results = []
        for idx, value in enumerate(checked):
            tags = _tags(value)
            domain, selector = tags.get("d", "").lower(), tags.get("s", "")
            if message is None:
                result, comment = "permerror", "message header does not parse"
            else:
                result, comment = self._check(message, idx, domain, selector, tags)
            results.append({"domain": domain, "selector": selector, "result": result, "comment": comment,
                            "b": tags.get("b", "")[:8]})
        if ctx.transaction is not None:
            ctx.transaction.notes["dkim"] = [
                {"domain": r["domain"], "selector": r["selector"], "result": r["result"]} for r in results]
        if not results:
            return api.proceed(auth_results=("dkim=none",))
        self.log("verified", qid=queue_id,
                 results=",".join(f"{r['result']}:{r['selector']}._domainkey.{r['domain']}" for r in results))
        auth = tuple(_auth_result(**r) for r in results)
        if self.settings["reject_on_fail"] and all(r["result"] == "fail" for r in results):
            # RFC 7372 §3.1: 5.7.20, no passing DKIM signature found.
            return api.reject(550, "5.7.20", "No passing DKIM signature found", auth_results=auth)
        return api.proceed(auth_results=auth)

    def _check(self, message, idx: int, domain: str, selector: str, tags: dict) -> tuple[str, str]:
        """One signature's RFC 8601 result and a short comment."""
        if not _NAME.fullmatch(domain) or not _NAME.fullmatch(selector):
            return "permerror", "malformed d= or s="
        if tags.get("a", "").lower() == "rsa-sha1":
            return "permerror", "rsa-sha1 is not accepted (RFC 8301)"  # RFC 8301 §3.1
        lookup = _KeyLookup(self.require_dns())
        try:
            ok = message.verify(idx, dnsfunc=lookup)
        except api.DnsError as exc:
            if exc.permanent:
                return "permerror", "bad key name"
            return "temperror", "key lookup failed"  # RFC 6376 §6.1.2: TEMPFAIL, try again later
        except dkim.KeyFormatError as exc:
            return "permerror", _comment(str(exc))  # e.g. an RSA key under 1024 bits
        except dkim.ValidationError as exc:
            if not lookup.asked:
                # RFC 8601 §2.7.1: a signature with syntax errors is "neutral" (missing tags,
                # bad base64, i= outside d=, expired...); dkimpy checks them before the key.
                return "neutral", _comment(str(exc))
            if "body hash" in str(exc):
                return "fail", "body hash did not verify"  # RFC 6376 §6.1.3
            return "fail", _comment(str(exc))
        except dkim.MessageFormatError as exc:  # a tag list or c= that does not parse
            return "neutral", _comment(str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd signature must not lose the others
            self.log("verify_error", domain=domain, selector=selector, error=type(exc).__name__)
            return "permerror", "signature could not be processed"
        if ok:
            return "pass", ""
        if lookup.problem:
            return "permerror", _comment(lookup.problem)  # RFC 6376 §6.1.2: PERMFAIL
        return "fail", "signature did not verify"


def _tags(value: bytes) -> dict[str, str]:
    """A signature's tag=value list (RFC 6376 §3.2), first of each tag kept; only to name the
    signature in the results (dkimpy checks the syntax itself).  Values are stripped; b=
    loses its folding whitespace too (§3.5)."""
    tags: dict[str, str] = {}
    for part in value.decode("ascii", "replace").split(";"):
        name, eq, text = part.partition("=")
        if eq:
            name = name.strip()
            tags.setdefault(name, re.sub(r"\s+", "", text) if name == "b" else text.strip())
    return tags


def _comment(text: str) -> str:
    """Text safe inside an RFC 8601 comment: no parentheses, ';', quotes or line breaks."""
    text = text.replace("b'", "").replace("'", "")
    return re.sub(r"\s+", " ", _COMMENT_DROP.sub("", text)).strip()[:80]


def _auth_result(result: str, comment: str, domain: str, selector: str, b: str) -> str:
    """dkim=<result> [(comment)] header.d=<d> header.s=<s> [header.b=<b>] (RFC 8601 §2.7.1,
    RFC 6008 §4 for header.b).  d= and s= that are no DNS names (then the result is never
    pass) are replaced by "invalid", a reserved name (RFC 2606) that aligns with nothing."""
    parts = [f"dkim={result}"]
    if comment:
        parts.append(f"({comment})")
    parts.append(f"header.d={domain if _NAME.fullmatch(domain) else 'invalid'}")
    parts.append(f"header.s={selector if _NAME.fullmatch(selector) else 'invalid'}")
    b = re.sub(r"[^A-Za-z0-9+/=]", "", b)
    if b:
        parts.append(f"header.b={b}" if _TOKEN.fullmatch(b) else f'header.b="{b}"')
    return " ".join(parts)
