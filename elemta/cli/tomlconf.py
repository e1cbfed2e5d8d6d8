"""The effective configuration written back as TOML, for `elemtactl config show`.

Python 3.11 reads TOML (tomllib) but cannot write it, and the config needs only a small part of
TOML: strings, integers, floats, booleans, arrays of strings, tables of strings or numbers and
the [[listeners]] array. What this writes parses back (tomllib, then config.parse) to the same
Config; tests check that.
"""

from __future__ import annotations

import dataclasses
import math

from elemta.config import Config

# TOML basic strings: these must be escaped (TOML 1.0, "String"); other control characters
# and DEL are written as \\uXXXX.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def dumps(config: Config) -> str:
    lines = [f"# elemta configuration in effect: {config.source or 'built-in defaults'},",
             "# with the default of every key not set there.", ""]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "listeners":
            for listener in value:
                lines += ["[[listeners]]", *_keys(listener), ""]
        elif dataclasses.is_dataclass(value):
            lines += [f"[{field.name}]", *_keys(value), ""]
        # Anything else (dev, source) is not a key of the file.
    return "\n".join(lines)


def as_dict(config: Config) -> dict:
    """The same keys as dumps() writes, as plain JSON-able values."""
    result: dict = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "listeners":
            result["listeners"] = [dataclasses.asdict(listener) for listener in value]
        elif dataclasses.is_dataclass(value):
            result[field.name] = dataclasses.asdict(value)
    return result


def _keys(section: object) -> list[str]:
    return [f"{f.name} = {value(getattr(section, f.name))}" for f in dataclasses.fields(section)]


def value(v: object) -> str:
    """One TOML value."""
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
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(value(item) for item in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{string(str(k))} = {value(item)}" for k, item in v.items()) + " }"
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
