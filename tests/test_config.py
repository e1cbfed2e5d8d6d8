"""Configuration: the keys' declarations, defaults, the shipped conf/elemta.toml, bad configs as
data, `--check-config`.

Every key of every table is declared once, in elemta/config/keys.py (config.key(): type,
default, range or choices, required, one-line doc).  Here: each declaration is complete, the
checks enforce each range and choice it declares, and conf/elemta.toml shows every key at its
default.  tests/test_docs.py checks elemta.toml(5) against the same declarations.

Bad configs live in tests/config_cases/<case>/ as `elemta.toml` plus `expected-error`, one
regex per line, one line per problem the file has: each problem (one line, in order) must
match its regex (re.search), and there must be exactly as many problems as regexes.  Each case
is checked twice: through config.load() and through the real command line (`python3 -m elemta
--check-config`) run as a subprocess, which must exit 78 with the same problems on stderr, one
`elemta: ` line each.  Add a case by adding a directory; no code changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from elemta import config
from elemta.errors import ConfigError
from tests.support import as_nobody

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the checkout: `python3 -m elemta` must find the package from here
CASES = TESTS / "config_cases"
SHIPPED = ROOT / "conf" / "elemta.toml"
EX_CONFIG = 78
EX_USAGE_ARGPARSE = 2  # argparse's own exit status for usage errors

CASE_DIRS = sorted(p for p in CASES.iterdir() if p.is_dir())


def run_elemta(*args: str) -> subprocess.CompletedProcess:
    """The real console entry, as `python3 -m elemta ...` from the checkout root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        [sys.executable, "-m", "elemta", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def run_elemtactl(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("ELEMTA_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "elemta.cli.elemtactl", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def one_line_error(stderr: str) -> str:
    """The message of `elemta: <message>\\n`; fails unless stderr is exactly that one line."""
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line: {stderr!r}"
    assert stderr.startswith("elemta: "), stderr
    return stderr[len("elemta: ") : -1]


def error_lines(stderr: str) -> list[str]:
    """The messages of `elemta: <message>\\n` lines; fails unless every line is one."""
    assert stderr.endswith("\n"), stderr
    lines = stderr[:-1].split("\n")
    assert all(line.startswith("elemta: ") for line in lines), stderr
    return [line[len("elemta: "):] for line in lines]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "elemta.toml"
    path.write_text(text)
    return str(path)


# ---- defaults and the shipped file -----------------------------------------------------------


def test_empty_file_gives_the_defaults(tmp_path):
    path = write(tmp_path, "")
    assert config.load(path) == config.Config(source=path)


def test_defaults_listen_on_25_and_587():
    listeners = config.Config().listeners
    assert [(lst.host, lst.port, lst.role) for lst in listeners] == [
        ("0.0.0.0", 25, "mx"),
        ("0.0.0.0", 587, "submission"),
    ]


def test_shipped_conf_parses_to_exactly_the_defaults():
    assert config.load(str(SHIPPED)) == config.Config(source=str(SHIPPED))


def test_shipped_conf_names_every_key():
    """Every dataclass field appears in conf/elemta.toml, and nothing else does."""
    with open(SHIPPED, "rb") as handle:
        data = tomllib.load(handle)
    assert set(data) == {"listeners", *config._SECTIONS}
    for name, cls in config._SECTIONS.items():
        assert set(data[name]) == {f.name for f in dataclasses.fields(cls)}, name
    listener_keys = {f.name for f in dataclasses.fields(config.Listener)}
    assert data["listeners"], "the default [[listeners]] are written out"
    for item in data["listeners"]:
        assert set(item) == listener_keys


def test_shipped_conf_has_a_comment_above_every_key():
    lines = SHIPPED.read_text().splitlines()
    key_line = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
    for number, line in enumerate(lines):
        if key_line.match(line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#"), f"conf/elemta.toml:{number + 1}: no comment above {line!r}"


def _toml(value: object) -> object:
    """A default as tomllib reads it back: tuples are lists."""
    return list(value) if isinstance(value, tuple) else value


def test_shipped_conf_sets_every_key_to_its_default():
    """Each key of each table, and each key of the default [[listeners]], is set to the default
    its field declares."""
    with open(SHIPPED, "rb") as handle:
        data = tomllib.load(handle)
    for name, cls in config._SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert data[name].get(f.name) == _toml(getattr(cls(), f.name)), f"conf/elemta.toml: {name}.{f.name}"
    assert data["listeners"] == [{f.name: _toml(getattr(listener, f.name)) for f in dataclasses.fields(listener)}
                                 for listener in config.Config().listeners]


# The arrays of tables the file has no entry of: their keys are shown in commented examples.
COMMENTED_TABLES = ("tls.certificates", "plugins")


@pytest.mark.parametrize("table", COMMENTED_TABLES)
def test_shipped_conf_shows_every_key_of_the_commented_tables(table):
    """The commented example of [[tls.certificates]] and of [[plugins]] sets every key of the
    table: to its default, or with `# default <value>` after it if it shows another value.  A
    required key, or one whose default is not a value (plugins.timeout), may show any."""
    lines = SHIPPED.read_text().splitlines()
    start = lines.index(f"#   [[{table}]]")
    example = {}
    for line in lines[start + 1:]:
        if re.match(r"^#\s+#", line):
            continue  # the comment after a key, continued
        found = re.match(r"^#\s+(\w+) = (.*?)\s*(?:#\s*(.*))?$", line)
        if not found:
            break
        example[found.group(1)] = (tomllib.loads(f"v = {found.group(2)}")["v"], found.group(3) or "")
    cls = config._TABLES[table]
    assert list(example) == [f.name for f in dataclasses.fields(cls)], f"conf/elemta.toml [[{table}]]: {list(example)}"
    for f in dataclasses.fields(cls):
        value, comment = example[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.metadata.get("required") or default is None:
            continue
        shown = value == _toml(default) or re.search(rf"\bdefault {re.escape(json.dumps(default))}", comment)
        assert shown, f"conf/elemta.toml [[{table}]] {f.name}: not its default {default!r}, nor says it"


def test_every_key_has_a_one_line_doc():
    """Every key of every table declares its doc with its field (config.key(doc=...)): one line,
    which `elemtactl config show` prints above the key and a missing required key's problem
    quotes."""
    for table, cls in config._TABLES.items():
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc")
            assert isinstance(doc, str) and doc.strip(), f"{table}.{f.name}: no doc (declare it with config.key)"
            assert "\n" not in doc and doc == doc.strip() and len(doc) <= 90, f"{table}.{f.name}: {doc!r}"
            assert config._DOCS[f"{table}.{f.name}"] == doc


# ---- valid configs ---------------------------------------------------------------------------


def test_integer_accepted_where_a_number_is_expected(tmp_path):
    loaded = config.load(write(tmp_path, "[server]\ngrace_period = 5\n"))
    assert loaded.server.grace_period == 5.0 and isinstance(loaded.server.grace_period, float)


def test_domains_are_lower_cased_without_trailing_dot(tmp_path):
    loaded = config.load(
        write(tmp_path, '[smtp]\nlocal_domains = ["Example.ORG."]\nrelay_domains = [".Sub.Example.NET"]\n')
    )
    assert loaded.smtp.local_domains == ("example.org",)
    assert loaded.smtp.relay_domains == (".sub.example.net",)


def test_listeners_replace_the_defaults(tmp_path):
    loaded = config.load(write(tmp_path, '[[listeners]]\naddress = "[::1]:2525"\nrole = "submission"\n'))
    assert loaded.listeners == (config.Listener("[::1]:2525", "submission"),)
    assert (loaded.listeners[0].host, loaded.listeners[0].port) == ("::1", 2525)


def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=re.escape(path) + ": no such file"):
        config.load(path)


# ---- bad configs, as data --------------------------------------------------------------------


def test_every_case_directory_is_complete():
    assert len(CASE_DIRS) >= 10
    for case in CASE_DIRS:
        assert sorted(p.name for p in case.iterdir()) == ["elemta.toml", "expected-error"], case.name


def _expected(case: Path) -> list[str]:
    return (case / "expected-error").read_text().strip().split("\n")


@pytest.mark.parametrize("case", CASE_DIRS, ids=lambda p: p.name)
def test_bad_config_case(case):
    path = str(case / "elemta.toml")
    expected = _expected(case)

    with pytest.raises(ConfigError) as caught:
        config.load(path)
    problems = caught.value.problems
    assert all("\n" not in problem for problem in problems), f"{case.name}: not one line each: {problems!r}"
    assert len(problems) == len(expected), f"{case.name}: {problems!r}, expected {len(expected)}"
    for problem, pattern in zip(problems, expected, strict=True):
        assert re.search(pattern, problem), f"{case.name}: {problem!r} does not match {pattern!r}"
    assert str(caught.value) == "\n".join(problems)

    result = run_elemta("--check-config", "--config", path)
    assert result.returncode == EX_CONFIG, (case.name, result.returncode, result.stderr)
    assert result.stdout == ""
    assert error_lines(result.stderr) == problems


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["shipped", "empty"])
def test_check_config_on_a_valid_file_exits_0(tmp_path, which):
    path = str(SHIPPED) if which == "shipped" else write(tmp_path, "")
    if os.geteuid() == 0:
        # Not as root: root's check also asks that server.user ("elemta") exists, which it need
        # not on a test machine (tests/test_privileges.py checks that message).  As nobody, on
        # a copy of the file that nobody may read.
        readable = tempfile.mkdtemp(prefix="elemta-config-", dir="/tmp")
        try:
            os.chmod(readable, 0o755)
            path = shutil.copy(path, readable)
            os.chmod(path, 0o644)
            command, env = as_nobody([sys.executable, "-m", "elemta", "--check-config", "--config", path])
            result = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True, timeout=60,
                                    check=False)
        finally:
            shutil.rmtree(readable)
    else:
        result = run_elemta("--check-config", "--config", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"elemta: configuration {path} is valid\n"
    assert result.stderr == ""


def test_check_config_on_a_missing_file_exits_78_naming_it(tmp_path):
    path = str(tmp_path / "absent.toml")
    result = run_elemta("--check-config", "--config", path)
    assert result.returncode == EX_CONFIG
    assert one_line_error(result.stderr).startswith(f"{path}: no such file")


def test_a_missing_certificate_is_found_by_both_checks(tmp_path):
    """Issue 16, defect 7: `elemta --check-config` and `elemtactl config check` said the
    configuration was valid, and the daemon then refused to start (exit 78)."""
    path = write(tmp_path, f'[server]\nspool_dir = "{tmp_path}/spool"\nuser = "root"\n'
                           f'[[tls.certificates]]\ncert_file = "{tmp_path}/missing.pem"\n')
    problem = f"tls.certificates[0]: {tmp_path}/missing.pem: no such file"
    result = run_elemta("--check-config", "--config", path)
    assert (result.returncode, result.stdout) == (EX_CONFIG, "")
    assert error_lines(result.stderr) == [problem]
    ctl = run_elemtactl("--config", path, "config", "check")
    assert (ctl.returncode, ctl.stdout, ctl.stderr) == (EX_CONFIG, "", f"elemtactl: {problem}\n")


def test_the_start_up_checks_report_every_problem(tmp_path):
    """What start-up reads besides the file: each check runs, whatever the one before found."""
    path = write(tmp_path, f'[server]\nspool_dir = "{tmp_path}/spool"\nuser = "root"\n'
                           f'[local]\nrecipients_file = "{tmp_path}/missing-recipients"\n'
                           f'[[tls.certificates]]\ncert_file = "{tmp_path}/missing.pem"\n')
    for result, prefix in ((run_elemta("--check-config", "--config", path), "elemta: "),
                           (run_elemtactl("--config", path, "config", "check"), "elemtactl: ")):
        assert (result.returncode, result.stdout) == (EX_CONFIG, "")
        lines = result.stderr.splitlines()
        assert len(lines) == 2 and all(line.startswith(prefix) for line in lines), lines
        assert lines[0] == f"{prefix}tls.certificates[0]: {tmp_path}/missing.pem: no such file"
        assert lines[1].startswith(f"{prefix}local.recipients_file: "), lines


def test_elemtactl_config_check_reports_every_problem(tmp_path):
    case = CASES / "three-errors"
    ctl = run_elemtactl("--config", str(case / "elemta.toml"), "config", "check")
    assert (ctl.returncode, ctl.stdout) == (EX_CONFIG, "")
    lines = ctl.stderr.splitlines()
    assert len(lines) == len(_expected(case)) and all(line.startswith("elemtactl: ") for line in lines)
    for line, pattern in zip(lines, _expected(case), strict=True):
        assert re.search(pattern, line[len("elemtactl: "):]), (line, pattern)


@pytest.mark.parametrize("port", ["70000", "-1", "twenty-five"])
def test_bad_port_is_a_usage_error(port):
    result = run_elemta("--check-config", "--config", str(SHIPPED), "--port", port)
    assert result.returncode == EX_USAGE_ARGPARSE, result.stderr
    assert "--port" in result.stderr.splitlines()[-1]
    assert result.stdout == ""


# ---- split_host_port -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, expected",
    [
        ("[::1]:25", ("::1", 25)),
        ("[::]:587", ("::", 587)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
        ("0.0.0.0:25", ("0.0.0.0", 25)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("mail.example.org:2525", ("mail.example.org", 2525)),
        ("localhost:25", ("localhost", 25)),
    ],
)
def test_split_host_port(address, expected):
    assert config.split_host_port(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "",
        "0.0.0.0",
        "0.0.0.0:",
        ":25",
        "0.0.0.0:65536",
        "0.0.0.0:-1",
        "0.0.0.0:+25",
        "0.0.0.0: 25",
        "0.0.0.0:2x",
        "::1:25",
        "::1",
        "[::1]",
        "[::1]25",
        "[::1]:",
        "[]:25",
    ],
)
def test_split_host_port_refuses(address):
    with pytest.raises(ValueError):
        config.split_host_port(address)


def test_a_plugin_timeout_is_the_plugin_classs_own_unless_configured(tmp_path):
    loaded = config.load(write(tmp_path, '[[plugins]]\nuse = "spf"\n[[plugins]]\nuse = "dkim"\ntimeout = 5\n'))
    assert [(p.name, p.timeout) for p in loaded.plugins] == [("spf", None), ("dkim", 5.0)]


@pytest.mark.parametrize("text, problem", [
    # retry_first keeps its default (300) while wrong: retry_max = 60 is not compared with it.
    ('[delivery]\nretry_first = "1h"\nretry_max = 60\n', r"^delivery\.retry_first: expected a number"),
    ('[delivery]\nrelayhost = 25\nrelayhost_auth_file = "/etc/elemta/relay"\n', r"^delivery\.relayhost: expected a string"),
    ('[server]\nproxy_networks = "10.0.0.1"\n[[listeners]]\naddress = "127.0.0.1:25"\nproxy_protocol = true\n',
     r"^server\.proxy_networks: expected a list"),
    ('[[listeners]]\naddress = 25\n[[listeners]]\naddress = "0.0.0.0:25"\n', r"^listeners\[0\]\.address: expected a string"),
])
def test_a_bad_key_makes_up_no_second_problem(tmp_path, text, problem):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert len(caught.value.problems) == 1, caught.value.problems
    assert re.search(problem, str(caught.value))


def test_each_key_declares_its_rules_once_and_its_default_keeps_them():
    # The ranges and choices live on the fields (config.key); the checks read them from there.
    assert config._RANGES and config._CHOICES
    for name, cls in config._TABLES.items():
        for f in dataclasses.fields(cls):
            path, default = f"{name}.{f.name}", getattr(cls(), f.name)
            if "range" in f.metadata:
                low, high = f.metadata["range"]
                assert default in ("auto", None) or low <= default <= high, path
            if "choices" in f.metadata:
                assert default in f.metadata["choices"], path


def _setting(table: str, name: str, value: str) -> tuple[str, str]:
    """A file that sets one key of table to value (TOML), with what an entry of an array of
    tables needs besides, and the key's path in the problems."""
    if table == "listeners":
        return f'[[listeners]]\naddress = "127.0.0.1:2525"\n{name} = {value}\n', f"listeners[0].{name}"
    if table == "plugins":
        return f'[[plugins]]\nuse = "spf"\n{name} = {value}\n', f"plugins[0].{name}"
    return f"[{table}]\n{name} = {value}\n", f"{table}.{name}"


FIELDS = [(table, f) for table, cls in config._TABLES.items() for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("table", "field", "end"), [
    pytest.param(table, f, end, id=f"{table}.{f.name} {end}") for table, f in FIELDS if "range" in f.metadata
    for end in ("below", "above")])
def test_a_value_outside_a_key_s_range_is_refused(table, field, end, tmp_path):
    """The checks enforce the range each field declares, in every table."""
    low, high = field.metadata["range"]
    value = low - 1 if end == "below" else high + 1
    text, path = _setting(table, field.name, str(value))
    allowed = " to ".join(str(int(n)) if n == int(n) else str(n) for n in (low, high))
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert re.fullmatch(rf"{re.escape(path)}: \S+ is out of range \(allowed {allowed}\)", caught.value.problems[0])
    text, _ = _setting(table, field.name, str(high))
    try:  # the end itself is allowed (delivery.retry_first's is more than retry_max's default)
        config.load(write(tmp_path, text))
    except ConfigError as exc:
        assert not any(problem.startswith(f"{path}:") for problem in exc.problems), exc.problems


@pytest.mark.parametrize(("table", "field"), [
    pytest.param(table, f, id=f"{table}.{f.name}") for table, f in FIELDS if "choices" in f.metadata])
def test_a_value_outside_a_key_s_choices_is_refused(table, field, tmp_path):
    text, path = _setting(table, field.name, '"nonsense"')
    allowed = re.escape(", ".join(field.metadata["choices"]))
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: 'nonsense'( is not [\w ]+)? \(allowed: {allowed}\)$"):
        config.load(write(tmp_path, text))


@pytest.mark.parametrize(("table", "field"), [
    pytest.param(table, f, id=f"{table}.{f.name}") for table, f in FIELDS if f.metadata.get("required")])
def test_a_required_key_left_out_is_refused_with_its_doc(table, field, tmp_path):
    others = {"listeners": 'role = "mx"', "tls.certificates": 'key_file = "/k.pem"', "plugins": 'name = "x"'}
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, f"[[{table}]]\n{others[table]}\n"))
    assert caught.value.problems == [f"{table}[0].{field.name}: missing ({field.metadata['doc']})"]
