"""Local recipients and aliases: who exists in smtp.local_domains, and where their mail goes.

Both sides use one table: the SMTP session asks `accepts()` at RCPT time, so mail for an
unknown local user is refused with 550 5.1.1 during the dialogue (no bounce to a forged
sender later: no backscatter), and delivery asks `expand()` to turn an alias into its targets.

Rules, in order, for an address in a local domain:
  1. postmaster@<any local domain> always exists (RFC 5321 §4.5.1); it goes to
     local.postmaster when set.
  2. local.aliases: "user@domain" or a bare "user" (any local domain) -> targets; targets that
     are aliases themselves are expanded too (up to MAX_DEPTH levels, loops stop there).
  3. local.recipients (+ recipients_file): the address, or "@domain" for all of a domain.
  4. local.aliases "@domain": the catch-all of that domain.
With no recipients listed at all, every address of the local domains exists.
"""

from __future__ import annotations

from collections.abc import Iterable

from elemta.config import Config
from elemta.errors import ConfigError

MAX_DEPTH = 10


class LocalRecipients:
    def __init__(
        self,
        domains: Iterable[str],
        recipients: Iterable[str] = (),
        aliases: dict[str, str] | None = None,
        postmaster: str = "",
    ) -> None:
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        self._recipients = frozenset(_norm(r) for r in recipients if r.strip())
        self._aliases = {
            _norm(key): tuple(t.strip() for t in targets.split(",") if t.strip())
            for key, targets in (aliases or {}).items()
        }
        self.postmaster = postmaster.strip()
        self._open = not self._recipients  # nothing listed: every local address exists

    @classmethod
    def from_config(cls, config: Config) -> LocalRecipients:
        local = config.local
        listed = list(local.recipients)
        if local.recipients_file:
            listed += read_recipients_file(local.recipients_file)
        return cls(config.smtp.local_domains, listed, local.aliases, local.postmaster)

    def is_local(self, address: str) -> bool:
        return _domain(address) in self.domains

    def accepts(self, address: str) -> bool:
        """True if `address` is a valid recipient; addresses outside local domains are not ours to judge."""
        if not self.is_local(address):
            return True
        return bool(self._targets(address))

    def exists(self, address: str) -> bool:
        """True if `address` has a mailbox of its own here (a listed recipient, not only an alias)."""
        key = _norm(address)
        return self.is_local(address) and (key.startswith("postmaster@") or self._listed(key))

    def expand(self, address: str) -> tuple[str, ...]:
        """Final addresses for `address` (itself when it is no alias); () if it does not exist.

        An alias that names itself among its targets keeps a copy ("bob" -> "bob, archive");
        an alias met again further down its own chain is a loop and adds nothing; one reached
        by two different paths is expanded on both (the results are de-duplicated).
        """
        if not self.is_local(address):
            return (address,)
        result: list[str] = []
        self._expand(address, (), result)
        return tuple(result)

    def key(self, address: str) -> str:
        """What makes two final recipients one mailbox, for dropping duplicates of a message.

        In a local domain the local part compares as this table compares it (without case);
        elsewhere only the domain is case-insensitive (RFC 5321 §2.4: the remote decides).
        """
        if self.is_local(address):
            return _norm(address)
        local_part, at, domain = address.strip().rpartition("@")
        return f"{local_part}@{domain.lower().rstrip('.')}" if at else address.strip()

    def _expand(self, address: str, path: tuple[str, ...], result: list[str]) -> None:
        key = _norm(address)
        if key in path:
            return  # a loop: this branch adds nothing (a loop without an exit leaves nobody)
        if len(path) >= MAX_DEPTH:  # an absurdly long chain: deliver where it got to
            _add(result, address)
            return
        for target in self._targets(address):
            # Itself among its targets: its own mailbox, not its alias again.
            if _norm(target) == key or not self.is_local(target) or self._targets(target) == (target,):
                _add(result, target)
            else:
                self._expand(target, (*path, key), result)

    def _targets(self, address: str) -> tuple[str, ...]:
        key = _norm(address)
        local_part, domain = key.rsplit("@", 1)
        if local_part == "postmaster":
            return (self.postmaster,) if self.postmaster and _norm(self.postmaster) != key else (address,)
        for alias in (key, local_part):
            if alias in self._aliases:
                return self._aliases[alias]
        if self._listed(key):
            return (address,)
        return self._aliases.get(f"@{domain}", ())

    def _listed(self, key: str) -> bool:
        """A mailbox of its own: listed, its whole domain listed, or nothing listed at all."""
        return self._open or key in self._recipients or "@" + key.rsplit("@", 1)[1] in self._recipients


def read_recipients_file(path: str) -> list[str]:
    """One address per line; blank lines and '#' comments are skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"local.recipients_file: {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _add(result: list[str], address: str) -> None:
    if _norm(address) not in {_norm(r) for r in result}:
        result.append(address)


def _norm(address: str) -> str:
    # Local parts are case-sensitive in theory (RFC 5321 §2.4) and case-insensitive in every
    # mailbox server in practice; a table that treated "Alice" and "alice" as two users
    # would refuse mail that the mailbox server would take.
    return address.strip().lower().rstrip(".")


def _domain(address: str) -> str:
    at = address.rfind("@")
    return address[at + 1:].lower().rstrip(".") if at >= 0 else ""
