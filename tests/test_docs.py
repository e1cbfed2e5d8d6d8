"""The documentation keeps in step with the code.

man/elemtactl.8 is checked against elemtactl's click command tree: every command and
subcommand, every option, choice and default, every argument form, the exit statuses and the
--json keys. All man pages must pass `mandoc -Tlint`, be installed by setup.py and name each
other in SEE ALSO. For the configuration, every key of every table (those of the arrays of
tables included) has an entry in elemta.toml(5) whose first sentence states the type, the
default (or that it is required), the range and the allowed values its field declares in
elemta/config/keys.py, nothing else; a range or an allowed value conf/elemta.toml's comments
give is the declared one; and the TOML examples of both files (the contents of the tables
such as delivery.tls_policies included) are valid configurations.  tests/test_config.py
checks that conf/elemta.toml sets every key to its default.

The man pages are read through a small roff reader: font macros are stripped, escapes such
as `\\-` and `\\(dq` replaced by their characters, and the text is split by .SH, .SS and .TP.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import shutil
import subprocess
import tomllib
import typing
from functools import cache
from pathlib import Path

import click
import pytest

from elemta import config
from elemta.cli import ctlbase, elemtactl
from elemta.cli.ctl_user import UserListing
from elemta.queue.admin import Change
from elemta.queue.query import MessageDetail, Page, Stats, Trace

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
MAN_PAGES = sorted(p for p in MAN.iterdir() if re.fullmatch(r".+\.[1-9]", p.name))
CTL_PAGE = MAN / "elemtactl.8"
CONF_PAGE = MAN / "elemta.toml.5"
DAEMON_PAGE = MAN / "elemta.8"
SHIPPED = ROOT / "conf" / "elemta.toml"
CTL_DOC = ROOT / "docs" / "elemtactl.md"


# ---- reading roff ----------------------------------------------------------------------------

_ESCAPES = {"-": "-", "e": "\\", "&": "", "c": "", " ": " ", "~": " ", "%": "", "|": "", "^": "", "0": " "}
_CHARS = {"dq": '"', "aq": "'", "em": "--", "en": "-", "bu": "*", "rs": "\\", "ti": "~", "ha": "^",
          "lq": '"', "rq": '"', "oq": "'", "cq": "'", "mc": "u", "mu": "x", "co": "(c)", "at": "@"}
_STRIP_MACROS = {"PP", "LP", "P", "RS", "RE", "EX", "EE", "br", "sp", "nf", "fi", "in", "ad", "na", "UE",
                 "ME", "TH", "ne", "hy", "nh"}
_JOINED = {"BR", "RB", "BI", "IB", "IR", "RI"}  # alternating fonts: the arguments touch
_SPACED = {"B", "I", "SM", "SB", "UR", "MT", "IP", "SH", "SS", "TP", "TQ", "HP"}  # arguments are words


def unescape(text: str) -> str:
    """roff escapes to the characters they print; font changes dropped."""

    def one(match: re.Match) -> str:
        body = match.group(1)
        if body.startswith("("):
            return _CHARS.get(body[1:3], "")
        if body.startswith("["):
            return _CHARS.get(body[1:-1], "")
        if body[0] in "fs":
            return ""
        return _ESCAPES.get(body, body)

    return re.sub(r"\\(\(..|\[[^\]]*\]|f(?:\[[^\]]*\]|\(..|.)|s[-+]?\d|.)", one, text)


def macro_args(rest: str) -> list[str]:
    """A macro line's arguments: split on blanks, "quoted" ones may hold blanks ("" = a quote)."""
    args, i = [], 0
    while i < len(rest):
        if rest[i] in " \t":
            i += 1
            continue
        word = []
        if rest[i] == '"':
            i += 1
            while i < len(rest):
                if rest.startswith('""', i):
                    word.append('"')
                    i += 2
                elif rest[i] == '"':
                    i += 1
                    break
                else:
                    word.append(rest[i])
                    i += 1
        else:
            while i < len(rest) and rest[i] not in " \t":
                if rest[i] == "\\" and i + 1 < len(rest):  # `\ ` is not a separator
                    word.append(rest[i : i + 2])
                    i += 2
                else:
                    word.append(rest[i])
                    i += 1
        args.append("".join(word))
    return args


def macro(line: str) -> tuple[str, str] | None:
    """(name, arguments) of a macro line such as `.BR a b`; None for a text line."""
    if not line.startswith((".", "'")):
        return None
    name, _, rest = line[1:].strip().partition(" ")
    return name, rest


def plain(lines: list[str]) -> str:
    """The text roff lines print, on one line, blanks squeezed."""
    out = []
    for line in lines:
        if line.startswith((".\\\"", "'\\\"")):  # a comment
            continue
        if (found := macro(line)) is not None:
            name, rest = found
            if name in _JOINED:
                out.append("".join(unescape(a) for a in macro_args(rest)))
            elif name in _SPACED:
                out.append(" ".join(unescape(a) for a in macro_args(rest)))
            elif name not in _STRIP_MACROS:
                raise AssertionError(f"roff reader: unknown macro in {line!r}; teach plain() about it")
        else:
            out.append(unescape(line))
    return " ".join(" ".join(out).split())


def mentions(text: str, word: str) -> bool:
    """Whether `word` (an option such as --json, a value) occurs as a word of its own."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


@dataclasses.dataclass
class Part:
    """A .SH section or .SS subsection: its raw lines, and the .TP entries directly in it."""

    title: str
    lines: list[str]

    @property
    def text(self) -> str:
        return plain(self.lines)

    def entries(self) -> dict[str, str]:
        """The .TP entries at the outer level (nested .RS ... .RE lists stay in their entry):
        the tag's text -> the body's text."""
        found: dict[str, list[str]] = {}
        depth, tag, body, i = 0, None, [], 0
        while i < len(self.lines):
            line = self.lines[i]
            name = (macro(line) or ("", ""))[0]
            depth += {"RS": 1, "RE": -1}.get(name, 0)
            if depth == 0 and name == "TP" and i + 1 < len(self.lines):
                if tag is not None:
                    found[tag] = body
                tag, body = plain([self.lines[i + 1]]), []  # the next line is the tag
                i += 2
                continue
            if depth == 0 and tag is not None and name in ("PP", "LP", "P", "SS", "SH"):
                found[tag], tag, body = body, None, []  # a new paragraph ends the list
            elif tag is not None:
                body.append(line)
            i += 1
        if tag is not None:
            found[tag] = body
        return {name: plain(lines) for name, lines in found.items()}


class ManPage:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = path.read_text().splitlines()

    @staticmethod
    def _parts(heading: str, lines: list[str]) -> dict[str, Part]:
        """The parts of `lines` under each `.SH` (or `.SS`) heading, by title."""
        parts: dict[str, Part] = {}
        current = None
        for line in lines:
            found = macro(line)
            if found is not None and found[0] == heading:
                title = unescape(" ".join(macro_args(found[1])))
                current = parts.setdefault(title, Part(title, []))
            elif current is not None:
                current.lines.append(line)
        return parts

    @property
    def sections(self) -> dict[str, Part]:
        return self._parts("SH", self.lines)

    def section(self, name: str) -> Part:
        sections = self.sections
        assert name in sections, f"{self.path.name}: no section {name} (has {', '.join(sections)})"
        return sections[name]

    def subsections(self, section: str) -> dict[str, Part]:
        return self._parts("SS", self.section(section).lines)


@cache
def page(path: Path) -> ManPage:
    return ManPage(path)


# ---- the elemtactl command tree --------------------------------------------------------------


def _walk(command: click.Command, ctx: click.Context, path: tuple[str, ...]):
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, click.Context(sub, info_name=name, parent=ctx), (*path, name))


def command_tree() -> list[tuple[tuple[str, ...], click.Command, click.Context]]:
    """(path, command, context) for elemtactl and every command below it; path () is the root."""
    root = elemtactl.main
    return list(_walk(root, click.Context(root, info_name="elemtactl", **root.context_settings), ()))


TREE = command_tree()
LEAVES = [(path, cmd, ctx) for path, cmd, ctx in TREE if not isinstance(cmd, click.Group)]


def options(cmd: click.Command, ctx: click.Context) -> list[click.Option]:
    return [p for p in cmd.get_params(ctx) if isinstance(p, click.Option)]


def is_help(option: click.Option, ctx: click.Context) -> bool:
    return set(option.opts) <= set(ctx.help_option_names)


def option_cases():
    for path, cmd, ctx in TREE:
        for option in options(cmd, ctx):
            yield pytest.param(path, cmd, ctx, option, id=" ".join((*path, option.opts[-1])) or "elemtactl")


def synopsis_of(path: tuple[str, ...]) -> str:
    """The SYNOPSIS line of one command: from `elemtactl <path>` up to the next `elemtactl`."""
    text = page(CTL_PAGE).section("SYNOPSIS").text
    start = text.find("elemtactl " + " ".join(path) + " ")
    assert start >= 0, f"elemtactl.8 SYNOPSIS: no line for elemtactl {' '.join(path)}"
    end = text.find("elemtactl ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def command_part(path: tuple[str, ...]) -> Part:
    parts = page(CTL_PAGE).subsections("COMMANDS")
    name = " ".join(path)
    assert name in parts, f"elemtactl.8 COMMANDS: no subsection .SS \"{name}\" (has {', '.join(parts)})"
    return parts[name]


# ---- elemtactl(8): commands and options ------------------------------------------------------


@pytest.mark.parametrize("path", [p for p, _, _ in TREE if p], ids=" ".join)
def test_every_command_is_in_the_manpage(path):
    """Each command has a synopsis line (groups: at least one of theirs) and is described:
    a subcommand in its own .SS of COMMANDS, a group in the text of COMMANDS."""
    man = page(CTL_PAGE)
    assert mentions(man.section("SYNOPSIS").text, "elemtactl " + " ".join(path)), path
    command = {p: c for p, c, _ in TREE}[path]
    if isinstance(command, click.Group):
        assert mentions(man.section("COMMANDS").text, " ".join(path)), f"COMMANDS does not name {path}"
    else:
        assert command_part(path).text.strip(), f"COMMANDS: {' '.join(path)} is not described"


def has_own_options(cmd: click.Command, ctx: click.Context) -> bool:
    return any(not is_help(o, ctx) for o in options(cmd, ctx))


def test_the_manpage_describes_no_command_that_does_not_exist():
    """A .SS per command, and per group with options of its own (`user --file`)."""
    real = {" ".join(p) for p, _, _ in LEAVES}
    real |= {" ".join(p) for p, c, x in TREE if p and isinstance(c, click.Group) and has_own_options(c, x)}
    assert set(page(CTL_PAGE).subsections("COMMANDS")) == real


@pytest.mark.parametrize(("path", "cmd", "ctx", "option"), list(option_cases()))
def test_every_option_is_in_the_manpage(path, cmd, ctx, option):
    """Every option, in each of its spellings: global ones and --help in OPTIONS, a command's
    own in its .SS of COMMANDS as a .TP entry; its choices, its shown default and its
    environment variable with it; and one spelling in the command's synopsis line."""
    man = page(CTL_PAGE)
    spellings = [*option.opts, *option.secondary_opts]
    if is_help(option, ctx) or not path:
        where, entries = "OPTIONS", man.section("OPTIONS").entries()
    else:
        where, entries = f"COMMANDS {' '.join(path)}", command_part(path).entries()
    tags = [tag for tag in entries if any(mentions(tag, s) for s in spellings)]
    assert tags, f"elemtactl.8 {where}: no .TP entry for {'/'.join(spellings)}"
    entry = " ".join(f"{tag} {entries[tag]}" for tag in tags)
    for spelling in spellings:
        assert mentions(entry, spelling), f"elemtactl.8 {where}: {spelling} is not named"
    if isinstance(option.type, click.Choice):
        for choice in option.type.choices:
            assert mentions(entry, choice), f"elemtactl.8 {where}: {spellings[-1]} value {choice} is missing"
    if option.show_default and option.default is not None and not option.is_flag:
        assert f"default {option.default}" in entry, f"elemtactl.8 {where}: {spellings[-1]} default {option.default}"
    if option.envvar:
        assert mentions(entry, option.envvar), f"elemtactl.8 {where}: {spellings[-1]} names no {option.envvar}"
        assert option.envvar in man.section("ENVIRONMENT").entries(), f"ENVIRONMENT: no {option.envvar}"
    if path and not is_help(option, ctx):
        synopsis = synopsis_of(path)
        assert any(mentions(synopsis, s) for s in spellings), f"SYNOPSIS of {' '.join(path)}: no {spellings[-1]}"


def make_metavar(param: click.Parameter, ctx: click.Context) -> str:
    """click 8.2 and newer want the context; 8.1 takes no argument."""
    if "ctx" in inspect.signature(param.make_metavar).parameters:
        return param.make_metavar(ctx)
    return param.make_metavar()


@pytest.mark.parametrize(("path", "cmd", "ctx"), LEAVES, ids=[" ".join(p) for p, _, _ in LEAVES])
def test_every_argument_is_in_the_synopsis(path, cmd, ctx):
    """The arguments' forms (`ID... | - | ALL`, `[DOMAIN]`, `ID LEVEL`) appear, in lower case,
    in the command's synopsis line; ALL only where the command takes it; choices of an
    argument (a priority LEVEL) are named in its .SS."""
    synopsis = synopsis_of(path)
    for argument in (p for p in cmd.get_params(ctx) if isinstance(p, click.Argument)):
        metavar = make_metavar(argument, ctx)
        for word in re.findall(r"ALL|[A-Za-z]+|(?<![\w-])-(?![\w-])", metavar):
            assert mentions(synopsis, word if word == "ALL" or word == "-" else word.lower()), (
                f"SYNOPSIS of {' '.join(path)}: {word} (of {metavar}) is missing: {synopsis!r}")
        if isinstance(argument.type, click.Choice):
            for choice in argument.type.choices:
                assert mentions(command_part(path).text, choice), f"{' '.join(path)}: {choice} is missing"
    takes_all = any("ALL" in make_metavar(p, ctx) for p in cmd.get_params(ctx) if isinstance(p, click.Argument))
    assert mentions(synopsis, "ALL") == takes_all, f"SYNOPSIS of {' '.join(path)}: ALL shown wrongly"


def _documented_options(path: Path) -> set[str]:
    return {word for tag in page(path).section("OPTIONS").entries() for word in re.findall(r"--?[\w-]+", tag)}


@pytest.mark.parametrize(("path", "cmd", "ctx"), LEAVES, ids=[" ".join(p) for p, _, _ in LEAVES])
def test_a_command_section_names_no_option_that_does_not_exist(path, cmd, ctx):
    """An option a command lost does not linger in its .SS: every --option there is the
    command's, its group's, a global one, or elemta(8)'s (as in `elemta --check-config`)."""
    known = {s for p, c, x in TREE if path[: len(p)] == p for o in options(c, x) for s in (*o.opts, *o.secondary_opts)}
    known |= {s for o in options(cmd, ctx) for s in (*o.opts, *o.secondary_opts)}
    known |= _documented_options(DAEMON_PAGE)
    for word in re.findall(r"(?<![\w-])--[a-z][\w-]*", command_part(path).text):
        assert word in known, f"elemtactl.8 COMMANDS {' '.join(path)}: {word} is not an option of it"


def test_exit_statuses_are_documented():
    """EXIT STATUS lists exactly 0, 1 and every EX_* status of elemtactl, with its sysexits
    name; the --help text names each too."""
    codes = {name: value for name, value in vars(ctlbase).items() if re.fullmatch(r"EX_[A-Z]+", name)}
    assert codes, "no EX_* constants found in elemtactl (cli/ctlbase.py)"
    entries = page(CTL_PAGE).section("EXIT STATUS").entries()
    assert set(entries) == {"0", "1", *(str(code) for code in codes.values())}
    for name, code in codes.items():
        assert mentions(entries[str(code)], name), f"EXIT STATUS {code}: does not say {name}"
        assert mentions(elemtactl.main.help, str(code)), f"elemtactl --help does not list exit status {code}"


# ---- elemtactl(8) and docs/elemtactl.md: output ----------------------------------------------

# What each command prints as JSON (the queue.query and queue.admin dataclasses, as they are).
JSON_OF = {"queue list": Page, "queue show": MessageDetail, "queue trace": Trace, "queue stats": Stats,
           **{f"queue {name}": Change for name in ("hold", "release", "requeue", "delete", "flush", "priority")},
           "user list": UserListing}


def has_json(cmd: click.Command, ctx: click.Context) -> bool:
    return any("--json" in o.opts for o in options(cmd, ctx))


def json_keys(cls: type) -> set[str]:
    """The keys of a dataclass's JSON form, those of the dataclasses inside it included."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.add(f.name)
        kinds = [hints[f.name]]
        while kinds:
            kind = kinds.pop()
            if dataclasses.is_dataclass(kind):
                keys |= json_keys(kind)
            kinds.extend(typing.get_args(kind))
    return keys


def output_entries(subsection: str) -> dict[str, str]:
    """OUTPUT's entries of one form, by command: a tag such as `queue hold, release` names
    queue hold and queue release."""
    found = {}
    for tag, body in page(CTL_PAGE).subsections("OUTPUT")[subsection].entries().items():
        first, *more = tag.split(", ")
        group = first.split()[0]
        for name in (first, *(f"{group} {m}" for m in more)):
            found[name] = body
    return found


def test_json_keys_match_the_code():
    assert set(JSON_OF) | {"config check", "config show", "plugins", "queue check", "status", "route explain"} == {" ".join(p) for p, c, x in LEAVES if has_json(c, x)}, (
        "a command was added or renamed: add what it prints to JSON_OF")


@pytest.mark.parametrize(("path", "cmd", "ctx"), LEAVES, ids=[" ".join(p) for p, _, _ in LEAVES])
def test_every_command_output_is_described(path, cmd, ctx):
    """Every command's plain lines and JSON (if it has --json) have an entry in OUTPUT; the
    JSON entry names every key of the document, and so does docs/elemtactl.md, which has the
    examples."""
    name = " ".join(path)
    for form in ("Plain lines", "JSON") if has_json(cmd, ctx) else ("Plain lines",):
        assert name in output_entries(form), f"elemtactl.8 OUTPUT {form}: no entry for {name}"
    doc = CTL_DOC.read_text()
    for key in sorted(json_keys(JSON_OF[name]) if name in JSON_OF else ()):
        assert mentions(output_entries("JSON")[name], key), f"elemtactl.8 OUTPUT JSON {name}: no key {key}"
        assert f"`{key}`" in doc or f'"{key}"' in doc, f"docs/elemtactl.md: no JSON key {key} ({name})"


# ---- every man page ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", MAN_PAGES, ids=lambda p: p.name)
def test_manpage_is_mandoc_lint_clean(path):
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed")
    result = subprocess.run(["mandoc", "-Tlint", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stdout and not result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("path", MAN_PAGES, ids=lambda p: p.name)
def test_manpage_is_installed(path):
    """setup.py's data_files puts each page in share/man/manN of its section."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    found = [kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
             for kw in node.keywords if kw.arg == "data_files"]
    assert len(found) == 1, "setup.py: one setup(data_files=...)"
    installed = {file: target for target, files in ast.literal_eval(found[0]) for file in files}
    assert installed.get(f"man/{path.name}") == f"share/man/man{path.suffix[1:]}"


@pytest.mark.parametrize("path", MAN_PAGES, ids=lambda p: p.name)
def test_manpage_header_and_see_also(path):
    """.TH names the page and its section, and SEE ALSO names every other page of man/."""
    man = page(path)
    name, section = path.stem, path.suffix[1:]
    th = macro_args(man.lines[0][len(".TH ") :]) if man.lines[0].startswith(".TH ") else []
    assert th[:2] == [name.upper(), section], f"{path.name}: .TH {th}"
    see_also = man.section("SEE ALSO").text
    for other in MAN_PAGES:
        if other != path:
            assert f"{other.stem}({other.suffix[1:]})" in see_also, f"{path.name}: SEE ALSO lacks {other.name}"


# ---- elemta.toml(5) and conf/elemta.toml against the keys' declarations --------------------
#
# Every key of every table is declared once, in elemta/config/keys.py (config.key(): type,
# default, range or choices, required, doc); these read what elemta.toml(5) and the comments
# of conf/elemta.toml say of it and compare.


def _toml_value(value: object) -> str:
    """A default as elemta.toml(5) writes it: "text", true, 1000, 30.0, [], ["a", "b"], {}."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | tuple | list):
        return json.dumps(list(value) if not isinstance(value, str) else value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _man_part(table: str) -> Part:
    """The part of elemta.toml(5) whose .TP entries are the keys of table."""
    man = page(CONF_PAGE)
    if table == "tls.certificates":
        return man.subsections("[tls]")["[[tls.certificates]]"]
    return man.section({"listeners": "LISTENERS", "plugins": "PLUGINS"}.get(table, f"[{table}]"))


def _keys():
    """("table.key", its field) for every key of every table of the file."""
    for table, cls in config._TABLES.items():
        for f in dataclasses.fields(cls):
            yield f"{table}.{f.name}", f


KEYS = [pytest.param(path, f, id=path) for path, f in _keys()]


def _entry(path: str) -> str:
    table, _, name = path.rpartition(".")
    entry = _man_part(table).entries().get(name)
    assert entry is not None, f"elemta.toml.5: no entry for {path}"
    return entry


def _type_line(path: str) -> str:
    """The first sentence of a key's entry, which gives its type, default, range or choices:
    `Integer, default 20, 1 to 1000000.`"""
    entry, depth = _entry(path), 0
    for i, char in enumerate(entry):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char in ".;:" and entry[i + 1 : i + 2] in ("", " "):  # not in (...), not 30.0
            return entry[: i + 1]
    raise AssertionError(f"elemta.toml.5 {path}: no first sentence in {entry[:100]!r}")


# The type each annotation of keys.py is called in elemta.toml(5) (its Types list).
_MAN_TYPES = {"int": "Integer", "float": "Number", "bool": "Boolean", "str": "String",
              "tuple[str, ...]": "Array of strings", "dict": "Table", "tuple": "Array of tables",
              "int | str": "String or integer", "float | None": "Number"}


@pytest.mark.parametrize(("path", "field"), KEYS)
def test_manpage_states_each_type(path, field):
    assert field.type in _MAN_TYPES, f"{path}: what does elemta.toml(5) call {field.type!r}? Add it to _MAN_TYPES"
    line = _type_line(path)
    assert line.startswith(_MAN_TYPES[field.type] + ","), f"elemta.toml.5 {path}: {line!r}"


@pytest.mark.parametrize(("path", "field"), KEYS)
def test_manpage_states_each_default(path, field):
    """Each key's entry in elemta.toml(5) says `default <the value in elemta.config>`, or
    `required` for a key an entry of its array of tables must set."""
    entry = _entry(path)
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    if field.metadata.get("required"):
        assert _type_line(path).endswith(", required."), f"elemta.toml.5 {path}: say it is required"
    elif default is None:  # plugins.timeout: the plugin class's own
        assert mentions(entry, "default"), f"elemta.toml.5 {path}: say what its default is"
    else:
        expected = _toml_value(default)
        assert re.search(rf"\bdefault {re.escape(expected)}(?!\w|\.\d)", entry), (
            f"elemta.toml.5 {path}: expected 'default {expected}' in {entry[:100]!r}")


_RANGE = re.compile(r"(?<![\w.^-])(\d+(?:\.\d+)?|2\^\d+) to (\d+(?:\.\d+)?|2\^\d+)(?!\w|\.\d|\^)")


def _ranges(text: str) -> list[tuple[float, float]]:
    """The ranges `1 to 1000`, `0.1 to 300`, `1024 to 2^40` written in text."""
    def number(word: str) -> float:
        return 2 ** int(word[2:]) if word.startswith("2^") else float(word)
    return [(number(low), number(high)) for low, high in _RANGE.findall(text)]


@pytest.mark.parametrize(("path", "field"), KEYS)
def test_manpage_states_each_range_as_declared(path, field):
    """The first sentence of a key's entry gives exactly the range its field declares
    (key(range=...)), and none for a key that declares none."""
    declared = [field.metadata["range"]] if "range" in field.metadata else []
    assert _ranges(_type_line(path)) == declared, f"elemta.toml.5 {path}: {_type_line(path)!r}, declared {declared}"


@pytest.mark.parametrize(("path", "field"), [k for k in KEYS if k.id.rpartition(".")[0] not in ("tls.certificates", "plugins")])
def test_conf_states_each_range_as_declared(path, field):
    """A range the comment above a key in conf/elemta.toml gives is the one its field declares.
    (The keys of [[tls.certificates]] and [[plugins]], shown in comments: tests/test_config.py.)"""
    shown = _ranges(_conf_comment_above(path))
    declared = field.metadata.get("range")
    assert all(r == declared for r in shown), f"conf/elemta.toml {path}: {shown}, declared {declared}"


# Keys whose value is one of a list: every key whose field declares its choices
# (config.key(choices=...)), in any table.
ENUMERATED = [(path, f.metadata["choices"]) for path, f in _keys() if "choices" in f.metadata]


def _conf_comment_above(key: str) -> str:
    """The comment lines right above `key = ...` in its table of conf/elemta.toml."""
    table, name = key.split(".")
    header = "[[listeners]]" if table == "listeners" else f"[{table}]"
    lines = SHIPPED.read_text().splitlines()
    start = lines.index(header)
    number = next(n for n in range(start, len(lines)) if re.match(rf"{name}\s*=", lines[n]))
    above = []
    while number > 0 and lines[number - 1].startswith("#"):
        number -= 1
        above.insert(0, lines[number])
    return " ".join(above)


def _run_ends(value: str, values) -> tuple[str, str] | None:
    """For a value of a numbered run ("local3" of local0 ... local7): its first and last, which
    the docs may name instead of each ("local0" to "local7")."""
    stem = re.fullmatch(r"(\D+)\d+", value)
    run = [v for v in values if stem and re.fullmatch(rf"{re.escape(stem.group(1))}\d+", v)]
    return (run[0], run[-1]) if len(run) > 2 else None


def _quoted(text: str) -> set[str]:
    """The "quoted" values of text, a run "local0" to "local7" as each of its values."""
    values = set(re.findall(r'"([^"]*)"', text))
    for stem, first, last in re.findall(r'"(\D+)(\d+)" to "\1(\d+)"', text):
        values |= {f"{stem}{n}" for n in range(int(first), int(last) + 1)}
    return values


@pytest.mark.parametrize(("key", "values"), ENUMERATED, ids=[k for k, _ in ENUMERATED])
def test_allowed_values_are_named(key, values):
    """A key's allowed values are named in conf/elemta.toml; the first sentence of its entry in
    elemta.toml(5) names exactly them, or refers to the entry that does
    (relayhost_tls_policy: "one of the values of tls_policy")."""
    comment = _conf_comment_above(key)
    for value in values:
        ends = _run_ends(value, values)
        named = f'"{value}"' in comment or (ends and all(f'"{end}"' in comment for end in ends))
        assert named, f"conf/elemta.toml {key}: the comment does not name {value!r}"
    line = _type_line(key)
    referred = re.search(r"values of (\w+)", line)
    if referred:
        line = _type_line(f"{key.rpartition('.')[0]}.{referred.group(1)}")
    assert _quoted(line) == set(values), f"elemta.toml.5 {key}: {line!r} does not name exactly {values}"


def _toml_examples():
    """The .EX blocks of elemta.toml(5) that are TOML (every line a [table] or a key = value),
    with the section they are in."""
    key_line = re.compile(r'^(\[\[?[\w.]+\]\]?|"?[\w.@-]+"?\s*=\s*\S.*)$')
    man = page(CONF_PAGE)
    for title, part in man.sections.items():
        block, inside = [], False
        for line in part.lines:
            if line == ".EX":
                block, inside = [], True
            elif line == ".EE":
                inside = False
                text = [unescape(raw) for raw in block]
                if text and all(key_line.match(t) for t in text):
                    yield pytest.param(title, "\n".join(text), id=f"{title} {text[0][:30]}")
            elif inside:
                block.append(line)


def _as_config(section: str, text: str) -> config.Config:
    """A block as a whole file: a block without a [table] goes in its section's table, or
    (outside one) in the table that has all its keys."""
    if not text.startswith("["):
        keys = {line.split("=")[0].strip() for line in text.splitlines()}
        table = section.strip("[]") if section.startswith("[") else next(
            name for name, cls in config._SECTIONS.items() if keys <= {f.name for f in dataclasses.fields(cls)})
        text = f"[{table}]\n{text}"
    return config.parse(tomllib.loads(text))


@pytest.mark.parametrize(("section", "text"), list(_toml_examples()))
def test_manpage_toml_examples_are_valid(section, text):
    """The examples of elemta.toml(5) are valid configurations: the keys of their tables (such
    as delivery.transport's domains) and the values in them included."""
    _as_config(section, text)


def _commented_examples():
    """`# key = value` lines of conf/elemta.toml whose key belongs to the table they are in."""
    table = None
    for number, line in enumerate(SHIPPED.read_text().splitlines(), 1):
        header = re.match(r"^(?:#\s*)?\[\[?([\w.]+)\]\]?$", line)  # a commented one too: #   [[plugins]]
        if header:
            table = header.group(1)
        found = re.match(r"^#\s*(\w+)\s*=\s*(.+)$", line)
        keys = {f.name for f in dataclasses.fields(config._SECTIONS[table])} if table in config._SECTIONS else ()
        if found and found.group(1) in keys:
            yield pytest.param(table, f"{found.group(1)} = {found.group(2)}", id=f"line {number}")


def test_conf_has_commented_examples():
    assert len(list(_commented_examples())) >= 5


@pytest.mark.parametrize(("table", "text"), list(_commented_examples()))
def test_conf_commented_examples_are_valid(table, text):
    """The examples in conf/elemta.toml's comments (`# tls_policies = {...}`) are valid."""
    config.parse(tomllib.loads(f"[{table}]\n{text}"))


def test_every_metric_is_documented_in_monitoring_md_and_elemta_8():
    """A metric elemta exports (a name in metrics.py or monitor.py) that an admin cannot look up
    is one nobody alerts on."""
    root = Path(__file__).resolve().parent.parent
    names = set()
    for module in ("metrics.py", "monitor.py"):
        names |= set(re.findall(r'"(elemta_[a-z_]+)"', (root / "elemta" / module).read_text()))
    assert len(names) > 20
    counters = set(re.findall(r'counter\("(elemta_[a-z_]+)"', (root / "elemta" / "metrics.py").read_text()))
    guide, manual = (root / "docs" / "monitoring.md").read_text(), (root / "man" / "elemta.8").read_text()
    for name in sorted(names):
        shown = name + "_total" if name in counters else name
        assert f"`{shown}`" in guide, f"docs/monitoring.md: {shown}"
        assert f"\n.B {shown}\n" in manual, f"elemta.8 MONITORING: {shown}"


# -- docs/architecture.md: the map of the modules ----------------------------------------------


def architecture_map() -> set[str]:
    """The modules the table of docs/architecture.md names (paths under elemta/). In a cell
    listing several, a bare file name is in the folder of the name before it."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text[text.index("| module | owns | state |"):]
    listed = set()
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        folder = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            name = name.removeprefix("elemta/")
            if "/" in name:
                folder = name.rsplit("/", 1)[0] + "/"
            else:
                name = folder + name
            listed.add(name)
    return listed


def test_the_architecture_map_lists_every_module_and_only_modules():
    package = ROOT / "elemta"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    listed = architecture_map()
    assert sorted(modules - listed) == [], "modules docs/architecture.md does not list"
    assert sorted(listed - modules) == [], "docs/architecture.md lists modules that do not exist"


def test_the_architecture_map_calls_nothing_built_planned():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert not re.search(r"\|\s*planned\s*\|", text)
