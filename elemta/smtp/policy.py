"""Relay control: may this client, on this listener, send mail to this recipient?

One pure function, so every rule and every open-relay trick is a row in a table of tests.
The recipient arrives already parsed by smtp/address.py, and that parse is half of the
defence: whatever the client wrote, an Address has exactly one domain, the one mail for it is
routed by (delivery/router.py takes it from the text after the last '@', which is this
domain). What is left of the old tricks only ever lands in the local part, and the local part
never chooses a next hop: elemta does not interpret '%' (the "percent hack"), '!' (UUCP
paths) or '@' inside a quoted local part, and drops source routes (RFC 5321 §4.1.1.3,
Appendix C: "MUST accept ... SHOULD ignore"), keeping only the final mailbox. So
<"bob@remote"@ours>, <bob%remote@ours>, <remote!bob@ours> and <@ours:bob@remote> are judged
by the domain that routing will really use: ours for the first three (local mail, which the
recipients table may still refuse), remote for the last (no relaying).
"""

from __future__ import annotations

from dataclasses import dataclass

from elemta.config import SUBMISSION_ROLES
from elemta.smtp.address import Address

# Listener roles whose clients are the site's own users: they must authenticate (unless
# smtp.auth_required is off) and may then send anywhere. "submissions" is the implicit-TLS
# port (RFC 8314 §3.3), the same policy as STARTTLS submission.


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # For the log: dev, authenticated, trusted_network, postmaster, auth_not_required,
    # local_domain, relay_domain (allowed); auth_required, address_literal, not_local (refused).
    reason: str


def may_relay(
    rcpt: Address,
    *,
    role: str,
    authenticated: bool,
    trusted: bool,
    accept_all: bool,
    auth_required: bool,
    local_domains: frozenset[str],
    relay_domains: frozenset[str],
) -> Decision:
    """The relay decision for one RCPT.

    local_domains and relay_domains are expected as config.parse() leaves them: lower case,
    no trailing dot; a relay_domains entry ".example.org" covers every subdomain of
    example.org but not example.org itself. Domains compare in their A-label (xn--) form,
    the one Address.domain holds and routing uses.
    """
    if accept_all:
        return Decision(True, "dev")  # elemta --dev: nothing leaves the machine unasked
    if authenticated:
        return Decision(True, "authenticated")
    if trusted:
        return Decision(True, "trusted_network")
    if not rcpt.domain:
        # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain MUST be accepted; parse_path
        # gives no other recipient without a domain, but only that one is let through here.
        if rcpt.local == "postmaster":
            return Decision(True, "postmaster")
        return Decision(False, "not_local")
    if role in SUBMISSION_ROLES:
        # The site's users' port: without authentication, nothing at all (not even local
        # mail, which belongs on port 25). With smtp.auth_required = false it is an open
        # relay by the admin's choice (docs/smtp.md says so): for a port only the site's own
        # machines can reach.
        return Decision(not auth_required, "auth_required" if auth_required else "auth_not_required")
    domain = rcpt.domain.lower().rstrip(".")
    if domain.startswith("["):
        # An address literal (RFC 5321 §4.1.3). elemta takes no mail for its own IP
        # addresses (they would be local mail under a name no config can list, and
        # <user@[192.0.2.1]> to someone else's address is plain relaying), so a literal is
        # never local, never a relay domain, even if an entry happened to spell it.
        return Decision(False, "address_literal")
    if domain in local_domains:
        return Decision(True, "local_domain")
    if domain in relay_domains or _covered_by_parent(domain, relay_domains):
        return Decision(True, "relay_domain")
    return Decision(False, "not_local")


def _covered_by_parent(domain: str, relay_domains: frozenset[str]) -> bool:
    """True if ".parent" is listed for some proper parent of domain (a.b.c: .b.c, .c).

    Walking the recipient's own labels matches only at label boundaries, so ".example.org"
    covers "mx.example.org" but never "badexample.org" (which a plain endswith("example.org")
    would let through).
    """
    labels = domain.split(".")
    return any("." + ".".join(labels[i:]) in relay_domains for i in range(1, len(labels)))


def sender_allowed(user: str, sender: str, logins: dict) -> bool:
    """May user put sender in MAIL FROM?  smtp.sender_logins lists addresses, "@domain" and
    "*" per user (keys lower-cased by config); a user not listed may use its own login."""
    allowed = logins.get(user.lower())
    sender = sender.lower()
    if allowed is None:
        return "@" in user and sender == user.lower()
    for item in (a.strip().lower() for a in allowed.split(",")):
        if item == "*" or item == sender or (item.startswith("@") and sender.endswith(item)):
            return True
    return False
