"""The effective configuration written back as TOML, for `elemtactl config show`.

Python 3.11 reads TOML (tomllib) but cannot write it, and the config needs only a part of TOML:
tables of keys whose values are strings, numbers, booleans and arrays; the arrays of tables
[[listeners]], [[tls.certificates]] and [[plugins]]; and a plugin's [plugins.options], which
may hold any TOML value, tables and arrays of tables within it too.  Tables go out as
[section] headers after the plain keys of their parent (a table's keys must come before its
sub-tables), an array of tables as one [[header]] per element.  Each key of elemta's own
tables comes with its one-line doc (config.key(doc=...)) as a comment above it.  What this
writes parses back (tomllib, then config.parse) to the same Config; tests check that.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import re

from elemta.config import _DOCS, Config

# TOML basic strings: these must be escaped (TOML 1.0, "String"); other control characters
# and DEL are written as \\uXXXX.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # TOML 1.0 "Keys": anything else is quoted

# Fields of Config that are not keys of the file.
_NOT_IN_FILE = ("dev", "source")


def dumps(config: Config) -> str:
    lines = [f"# elemta configuration in effect: {config.source or 'built-in defaults'},",
             "# with the default of every key not set there.", ""]
    plain = _plain(config)
    assert isinstance(plain, dict)  # a dataclass becomes a dict
    lines += _table((), plain)
    return "\n".join(lines) + "\n"


def as_dict(config: Config) -> dict:
    """The same keys as dumps() writes, as plain JSON-able values (a plugin's timeout that is
    not set is null: the plugin's own default)."""
    plain = _plain(config, keep_none=True, dates_as_text=True)
    assert isinstance(plain, dict)  # a dataclass becomes a dict
    return plain


def _plain(v: object, keep_none: bool = False, dates_as_text: bool = False) -> object:
    """Dataclasses as dicts (without Config's dev and source, and, for TOML, which has no null,
    without keys that are None), tuples as lists, the rest as it is."""
    again = functools.partial(_plain, keep_none=keep_none, dates_as_text=dates_as_text)
    if dataclasses.is_dataclass(v):
        fields = (f.name for f in dataclasses.fields(v) if not (isinstance(v, Config) and f.name in _NOT_IN_FILE))
        return {name: again(getattr(v, name)) for name in fields if keep_none or getattr(v, name) is not None}
    if isinstance(v, dict):
        return {k: again(item) for k, item in v.items() if keep_none or item is not None}
    if isinstance(v, (tuple, list)):
        return [again(item) for item in v]
    if dates_as_text and isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    return v


def _is_table_array(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(item, dict) for item in v)


def _table(path: tuple[str, ...], table: dict) -> list[str]:
    """The plain keys of a table (empty tables and arrays inline), then each sub-table under its
    [header] and each array of tables as [[header]] tables, in the order of their keys; each
    key, header or not, after its doc.  The path names the table; () is the file's top level."""
    lines = []
    for k, v in table.items():
        if not (isinstance(v, dict) and v) and not _is_table_array(v):
            lines += [*_doc((*path, k)), f"{key(k)} = {value(v)}"]
    for k, v in table.items():
        name = (*path, k)
        header = ".".join(key(part) for part in name)
        if isinstance(v, dict) and v:
            inner = _table(name, v)
            if lines:
                lines.append("")
            # A table of tables only needs no header of its own: [a.b] makes a.
            lines += [*_doc(name), *(inner if inner[0].startswith("[") else [f"[{header}]", *inner])]
        elif _is_table_array(v):
            for item in v:
                if lines:
                    lines.append("")
                lines += [*_doc(name), f"[[{header}]]", *_table(name, item)]
    return lines


def _doc(path: tuple[str, ...]) -> list[str]:
    """The comment line of a key's one-line doc; none for a key that is not elemta's own (a
    domain of delivery.transport, a plugin's option)."""
    doc = _DOCS.get(".".join(path))
    return [f"# {doc}"] if doc is not None else []


def key(k: str) -> str:
    """A key, bare where TOML allows it, else quoted."""
    return k if _BARE_KEY.fullmatch(k) else string(k)


def value(v: object) -> str:
    """One TOML value (a table or an array of tables inline)."""
    if isinstance(v, bool):  # before int: bool is an int
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # always has a '.' or an exponent, so TOML reads a float back
    if isinstance(v, str):
        return string(v)
    if isinstance(v, (datetime.date, datetime.time)):  # datetime is a date too
        return v.isoformat()  # RFC 3339 forms, as TOML's dates and times are written
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(value(item) for item in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{key(str(k))} = {value(item)}" for k, item in v.items()) + " }"
    raise TypeError(f"no TOML form for {type(v).__name__} {v!r}")


def string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
