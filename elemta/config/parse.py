"""Reading a config file: TOML into the dataclasses of keys.py.

Validation is strict: an unknown key, a wrong type or an impossible value is a problem whose
one line names the key path and what is allowed.  parse() goes on past a problem (the key
keeps its default, the bad table or listener is left out) and raises one ConfigError with
every problem found, so a file with several mistakes is fixed in one pass.  Checks that
relate keys are skipped when one of the keys is itself bad: a made-up second error would
only mislead.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from typing import Any

from elemta import transport
from elemta.config.keys import (
    _SECTIONS,
    AUTH_MECHANISMS,
    DESTINATION_TLS_POLICIES,
    TLS_ROLES,
    Certificate,
    Config,
    Listener,
    PluginSpec,
    _default_listeners,
    split_host_port,
)
from elemta.errors import ConfigError


class _Problems:
    """The problems found so far, and the key paths they are about."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.paths: set[str] = set()

    def add(self, path: str, message: str) -> None:
        self.lines.append(message)
        self.paths.add(path)

    def bad(self, *paths: str) -> bool:
        """True if a problem was found at one of paths or inside it."""
        return any(p == path or p.startswith((path + ".", path + "[")) for p in self.paths for path in paths)

    def trying(self, path: str):
        """A context in which a ConfigError (one problem or several) is recorded, not raised."""
        return _Trying(self, path)


class _Trying:
    def __init__(self, problems: _Problems, path: str) -> None:
        self.problems, self.path = problems, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, ConfigError):
            for line in exc.problems:
                self.problems.add(self.path, line)
            return True
        return False


def _type_name(tp: Any) -> str:
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        tuple: "a list of strings",
        dict: "a table",
    }[tp]


def _coerce(path: str, value: Any, default: Any, problems: _Problems,
            limits: tuple[float, float] | None = None) -> Any:
    """Check value against the type of its default and the range its key declares (limits);
    return it in the dataclass's type.  ConfigError for a bad value; a table or the
    certificates record their entries' problems in problems and keep the good entries, so the
    checks of those still run."""
    if path == "tls.certificates":
        return _certificates(value, problems)
    if path == "monitor.listen" and isinstance(value, str):  # one address, or "" for none
        value = [value] if value else []
    if path == "server.workers":
        if value == "auto":
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f'{path}: expected "auto" or an integer, got {type(value).__name__} {value!r}')
        default = 1
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif kind is dict:
        ok = isinstance(value, dict)
        if ok:
            return _table(path, value, problems)
    else:
        ok = isinstance(value, str)
    if not ok:
        got = type(value).__name__
        raise ConfigError(f"{path}: expected {_type_name(kind)}, got {got} {value!r}")
    if limits is not None:
        low, high = limits
        if not low <= value <= high:
            raise ConfigError(f"{path}: {value} is out of range (allowed {_number(low)} to {_number(high)})")
    return value


def _table(path: str, value: dict, problems: _Problems) -> dict:
    """A table of domain or address keys; values are strings, or numbers for the rate tables."""
    number = path in _NUMBER_TABLES
    result = {}
    for key, item in value.items():
        good = (
            isinstance(item, (int, float)) and not isinstance(item, bool) and item >= 0
            if number else isinstance(item, str)
        )
        if not good:
            want = "a number of 0 or more" if number else "a string"
            problems.add(f"{path}.{key}", f"{path}.{key}: expected {want}, got {type(item).__name__} {item!r}")
            continue
        # Domains and addresses compare case-insensitively; keys are normalised once, here.
        result[key.lower().rstrip(".")] = item
    return result


def _certificates(raw: Any, problems: _Problems) -> tuple[Certificate, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError("tls.certificates: expected an array of tables [[tls.certificates]]")
    result = []
    for index, item in enumerate(raw):
        path = f"tls.certificates[{index}]"
        if _missing(path, Certificate, item, problems):
            continue
        result.append(_section(path, Certificate, item, problems))
    return tuple(result)


_NUMBER_TABLES = {"delivery.domain_concurrency", "delivery.domain_rate"}


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _section(name: str, cls: type, raw: Any, problems: _Problems) -> Any:
    """The dataclass of a table; a bad key is a problem and keeps its default."""
    if not isinstance(raw, dict):
        problems.add(name, f"{name}: expected a table [{name}], got {type(raw).__name__}")
        return cls()
    defaults = cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        path = f"{name}.{key}"
        if key not in known:
            problems.add(path, f"{path}: unknown key (allowed: {', '.join(sorted(known))})")
            continue
        with problems.trying(path):
            values[key] = _coerce(path, value, getattr(defaults, key), problems, known[key].metadata.get("range"))
    return cls(**values)


def _missing(path: str, cls: type, item: dict, problems: _Problems) -> bool:
    """Each key that cls declares required (key(required=True)) and item leaves out or sets
    to "" is a problem; True if there was one."""
    absent = [f for f in dataclasses.fields(cls) if f.metadata.get("required") and item.get(f.name) in (None, "")]
    for f in absent:
        problems.add(path, f"{path}.{f.name}: missing ({f.metadata['doc']})")
    return bool(absent)


def _check_choices(path: str, table: Any, problems: _Problems) -> None:
    """Each key of table (a dataclass) whose field declares its choices holds one of them."""
    for f in dataclasses.fields(table):
        value, allowed = getattr(table, f.name), f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            what = f" is not {f.metadata['what']}" if f.metadata["what"] else ""
            problems.add(f"{path}.{f.name}", f"{path}.{f.name}: {value!r}{what} (allowed: {', '.join(allowed)})")


# plugins.timeout is read apart from the other keys: its default, None (not set: the plugin's
# own), has no TOML type to check a value against.
_TIMEOUT = next(f for f in dataclasses.fields(PluginSpec) if f.name == "timeout")


def _plugins(raw: Any, problems: _Problems) -> tuple[PluginSpec, ...]:
    """The [[plugins]]; one with a problem is left out (and the file refused)."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        problems.add("plugins", "plugins: expected an array of tables [[plugins]]")
        return ()
    result, names = [], set()
    for index, item in enumerate(raw):
        path = f"plugins[{index}]"
        before = len(problems.lines)
        item = dict(item)
        options = item.pop("options", {})
        if not isinstance(options, dict):
            problems.add(path, f"{path}.options: expected a table [plugins.options]")
        if _missing(path, PluginSpec, item, problems):
            continue
        timeout = item.pop("timeout", None)  # absent: the plugin class's own default
        if timeout is not None:
            with problems.trying(f"{path}.timeout"):
                timeout = _coerce(f"{path}.timeout", timeout, 0.0, problems, _TIMEOUT.metadata["range"])
        spec = _section(path, PluginSpec, item, problems)
        if len(problems.lines) > before:
            continue
        default_name = spec.use.rpartition(":")[2].lower()  # "pkg.mod:MyCheck" -> "mycheck"
        spec = dataclasses.replace(spec, name=spec.name or default_name, options=options, timeout=timeout)
        if spec.name in names:
            problems.add(path, f"{path}.name: {spec.name!r} is used twice (give each a name)")
        names.add(spec.name)
        result.append(spec)
    return tuple(result)


def _check_networks(path: str, networks: tuple[str, ...], example: str, problems: _Problems) -> None:
    for index, network in enumerate(networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.add(path, f"{path}[{index}]: {network!r} is not a network (e.g. {example})")


def _listeners(raw: Any, problems: _Problems) -> tuple[Listener, ...]:
    """The [[listeners]]; a bad one is left out (and the file refused)."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        problems.add("listeners", "listeners: expected an array of tables [[listeners]]")
        return _default_listeners()
    if not raw:
        problems.add("listeners", "listeners: at least one [[listeners]] table is needed")
        return _default_listeners()
    result, addresses = [], []
    for index, item in enumerate(raw):
        path = f"listeners[{index}]"
        if _missing(path, Listener, item, problems):
            continue
        before = len(problems.lines)
        listener = _section(path, Listener, item, problems)
        try:
            split_host_port(listener.address)
        except ValueError as exc:
            problems.add(path, f"{path}.address: {listener.address!r}: {exc}")
        _check_choices(path, listener, problems)
        if len(problems.lines) == before:
            result.append(listener)
        if not problems.bad(f"{path}.address"):
            addresses.append(listener.address)  # a listener bad otherwise can still be a duplicate
    seen = set()
    for address in addresses:
        try:
            host, port = split_host_port(address)
        except ValueError:
            continue  # reported above
        key = (host.lower(), port)
        if key in seen:
            problems.add("listeners", f"listeners: address {address} is listed twice")
        seen.add(key)
    return tuple(result)


def _check(config: Config, problems: _Problems) -> None:
    """Checks that need more than one value's type and range; each adds its problem and the
    next one runs.  A check relating two keys is skipped if either is already a problem (its
    value is then the default, not what the file says)."""
    add = problems.add
    for section in _SECTIONS:
        _check_choices(section, getattr(config, section), problems)
    if config.log.target == "file" and not os.path.isabs(config.log.file):
        add("log.file", f"log.file: {config.log.file!r}: target \"file\" needs an absolute path")
    _check_networks("smtp.trusted_networks", config.smtp.trusted_networks, "192.0.2.0/24", problems)
    for key in ("local_domains", "relay_domains"):
        for index, domain in enumerate(getattr(config.smtp, key)):
            if not domain or domain != domain.strip() or "@" in domain or " " in domain:
                add(f"smtp.{key}", f"smtp.{key}[{index}]: {domain!r} is not a domain name")
    if config.delivery.relayhost:
        try:
            transport.split_next_hop(config.delivery.relayhost)
        except ValueError as exc:
            add("delivery.relayhost", f"delivery.relayhost: {exc}")
    for path, text in [("local.transport", config.local.transport),
                       *((f"delivery.transport.{k}", v) for k, v in config.delivery.transport.items())]:
        try:
            transport.parse(text)
        except ValueError as exc:
            add(path, f"{path}: {text!r}: {exc}")
    for key, targets in config.local.aliases.items():
        if not targets.strip() or any(not t.strip() or " " in t.strip() for t in targets.split(",")):
            add("local.aliases", f"local.aliases.{key}: expected addresses separated by commas, got {targets!r}")
    d = config.delivery
    for path, policy in ((f"delivery.tls_policies.{k}", v) for k, v in d.tls_policies.items()):
        if policy not in DESTINATION_TLS_POLICIES:
            add(path, f"{path}: {policy!r} is not a TLS policy (allowed: {', '.join(DESTINATION_TLS_POLICIES)})")
    # A policy that requires what a switch turns off could never deliver: say so now.
    for path, policy in (("delivery.tls_policy", d.tls_policy),
                         ("delivery.relayhost_tls_policy", d.relayhost_tls_policy),
                         *((f"delivery.tls_policies.{k}", v) for k, v in d.tls_policies.items())):
        needs = {"dane-only": ("dane", d.dane), "mta-sts": ("mta_sts", d.mta_sts)}.get(policy)
        if needs is not None and not needs[1]:
            add(path, f"{path}: {policy!r} needs delivery.{needs[0]} = true")
    for key, count in d.domain_concurrency.items():
        if count != int(count) or count < 1:
            add("delivery.domain_concurrency",
                f"delivery.domain_concurrency.{key}: expected a whole number of 1 or more")
    if d.retry_max < d.retry_first and not problems.bad("delivery.retry_max", "delivery.retry_first"):
        add("delivery.retry_max", "delivery.retry_max: must not be less than delivery.retry_first")
    if d.relayhost_auth_file and not d.relayhost and not problems.bad("delivery.relayhost"):
        add("delivery.relayhost_auth_file", "delivery.relayhost_auth_file: set delivery.relayhost too")
    _check_networks("server.proxy_networks", config.server.proxy_networks, "192.0.2.10/32", problems)
    # Indexes name the file's [[listeners]]: only right when none was left out.
    if not problems.bad("listeners"):
        for index, listener in enumerate(config.listeners):
            if (listener.proxy_protocol and not config.server.proxy_networks
                    and not problems.bad("server.proxy_networks")):
                add(f"listeners[{index}]",
                    f"listeners[{index}].proxy_protocol: set server.proxy_networks to the proxies' addresses")
            if listener.role in TLS_ROLES and not config.tls.certificates and not problems.bad("tls.certificates"):
                add(f"listeners[{index}]",
                    f"listeners[{index}].role: {listener.role!r} needs a certificate in [[tls.certificates]]")
    for index, mechanism in enumerate(config.smtp.auth_mechanisms):
        if mechanism not in AUTH_MECHANISMS:
            add("smtp.auth_mechanisms",
                f"smtp.auth_mechanisms[{index}]: {mechanism!r} (allowed: {', '.join(AUTH_MECHANISMS)})")
    for user, senders in config.smtp.sender_logins.items():
        if not senders.strip() or any(not s.strip() or " " in s.strip() for s in senders.split(",")):
            add("smtp.sender_logins",
                f"smtp.sender_logins.{user}: expected addresses, @domains or * separated by commas, "
                f"got {senders!r}")
    _check_monitor(config, problems)
    if not config.server.spool_dir:
        add("server.spool_dir", "server.spool_dir: must name a directory")
    if not config.server.user:
        add("server.user", "server.user: must name a user (\"root\" to keep root, not recommended)")


def _check_monitor(config: Config, problems: _Problems) -> None:
    smtp = set()
    if not problems.bad("listeners"):
        smtp = {split_host_port(listener.address) for listener in config.listeners}
    seen = set()
    for index, address in enumerate(config.monitor.listen):
        path = f"monitor.listen[{index}]"
        try:
            host, port = split_host_port(address)
        except ValueError as exc:
            problems.add("monitor.listen", f"{path}: {address!r}: {exc}")
            continue
        if port and ((host, port) in smtp or (host, port) in seen):
            problems.add("monitor.listen", f"{path}: {address} is also an SMTP listener or listed twice")
        seen.add((host, port))


def parse(data: dict, source: str = "") -> Config:
    """Build a Config from parsed TOML (a dict); ConfigError with every problem found, one
    line each, in the file's order and then the cross-key checks'."""
    problems = _Problems()
    values: dict[str, Any] = {"source": source}
    for key, raw in data.items():
        if key == "listeners":
            values["listeners"] = _listeners(raw, problems)
        elif key == "plugins":
            values["plugins"] = _plugins(raw, problems)
        elif key in _SECTIONS:
            values[key] = _section(key, _SECTIONS[key], raw, problems)
        else:
            allowed = ", ".join(sorted(["listeners", "plugins", *_SECTIONS]))
            problems.add(key, f"{key}: unknown key (allowed: {allowed})")
    config = Config(**values)
    _check(config, problems)
    if problems.lines:
        raise ConfigError(*problems.lines)
    # Domains compare case-insensitively; normalise once here, not per recipient.
    smtp = dataclasses.replace(
        config.smtp,
        local_domains=tuple(d.lower().rstrip(".") for d in config.smtp.local_domains),
        relay_domains=tuple(d.lower().rstrip(".") for d in config.smtp.relay_domains),
    )
    return dataclasses.replace(config, smtp=smtp)


def load(path: str) -> Config:
    """Read and check a config file; ConfigError (one line per problem) on any problem."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (use --config FILE, or --dev)") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, source=path)


def replace(config: Config, **sections: dict) -> Config:
    """Return config with some keys of some sections replaced: replace(c, smtp={...})."""
    changes = {
        name: dataclasses.replace(getattr(config, name), **keys) for name, keys in sections.items()
    }
    return dataclasses.replace(config, **changes)
