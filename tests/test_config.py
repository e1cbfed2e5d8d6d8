"""Configuration: defaults, the shipped conf/elemta.toml, bad configs as data, `--check-config`.

Bad configs live in tests/config_cases/<case>/ as `elemta.toml` plus `expected-error`, one
regex per line, one line per problem the file has: each problem (one line, in order) must
match its regex (re.search), and there must be exactly as many problems as regexes.  Each case
is checked twice: through config.load() and through the real command line (`python3 -m elemta
--check-config`) run as a subprocess, which must exit 78 with the same problems on stderr, one
`elemta: ` line each.  Add a case by adding a directory; no code changes.
"""

from __future__ import annotations

import dataclasses
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
MANPAGE = ROOT / "man" / "elemta.toml.5"
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


def _man_section(text: str, section: str) -> str:
    start = text.index(f".SH [{section}]\n")
    end = text.find("\n.SH ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_manpage_documents_every_key_and_range():
    """man/elemta.toml.5 has a .TP entry per key, with config._RANGES's range in it."""
    text = MANPAGE.read_text()
    for name, cls in config._SECTIONS.items():
        section = _man_section(text, name)
        for f in dataclasses.fields(cls):
            entry = re.search(rf"^\.TP\n\.B {f.name}\n(.*?)(?=^\.TP$|^\.SH |\Z)", section, re.MULTILINE | re.DOTALL)
            assert entry, f"elemta.toml.5: no entry for {name}.{f.name}"
            if f"{name}.{f.name}" in config._RANGES:
                low, high = config._RANGES[f"{name}.{f.name}"]
                assert f"{int(low)} to {int(high)}" in entry.group(1), f"{name}.{f.name}: range"
    listeners = text[text.index(".SH LISTENERS\n") :]
    for f in dataclasses.fields(config.Listener):
        assert f"\n.TP\n.B {f.name}\n" in listeners


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
    for name, cls in config._SECTIONS.items():
        for f in dataclasses.fields(cls):
            path, default = f"{name}.{f.name}", getattr(cls(), f.name)
            if "range" in f.metadata:
                low, high = f.metadata["range"]
                assert default == "auto" or low <= default <= high, path
            if "choices" in f.metadata:
                assert default in f.metadata["choices"], path


@pytest.mark.parametrize("path", sorted(config._CHOICES))
def test_a_value_outside_a_key_s_choices_is_refused(path, tmp_path):
    section, name = path.split(".")
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: 'nonsense'( is not [\w ]+)? \(allowed: "):
        config.load(write(tmp_path, f'[{section}]\n{name} = "nonsense"\n'))
