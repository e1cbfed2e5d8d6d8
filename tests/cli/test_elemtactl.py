"""elemtactl through click's CliRunner, on a real queue (tests/queue/sample.py) and config file."""

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import tomllib

import pytest
from rich.console import Console

from elemta import __version__
from elemta import config as cfg
from elemta.cli import ctlbase, tomlconf
from elemta.cli.elemtactl import main
from elemta.cli.render import Output
from elemta.queue.admin import QueueAdmin
from elemta.queue.store import Store
from tests.queue import sample
from tests.queue.sample import HOUR
from tests.support import ROOT, as_nobody, cli_runner

ELEMTACTL = ROOT / "bin" / "elemtactl"
NOWHERE = "0000000000000"

MESSAGE_KEYS = {"queue_id", "created", "age", "size", "sender", "priority", "recipients", "next_attempt", "last_error"}
CHANGE_KEYS = {"action", "messages", "recipients", "skipped", "not_found"}


@pytest.fixture
def q(tmp_path):
    # The CLI reads the real clock: the sample's last message arrives one hour before now.
    built = sample.build(str(tmp_path / "spool" / "queue.db"), start=time.time() - 5 * HOUR)
    yield built
    built.close()


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "elemta.toml"
    path.write_text(f'[server]\nspool_dir = "{tmp_path / "spool"}"\n\n[delivery]\nhold = true\n')
    return str(path)


@pytest.fixture
def run(conf):
    def invoke(*args, input=None, env=None, config=conf):
        runner = cli_runner()
        return runner.invoke(main, [*(["--config", config] if config else []), *args], input=input, env=env)

    return invoke


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def fails(result, code):
    """The command failed with `code` and said why in exactly one line on stderr."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("elemtactl"), result.stderr
    return result.stderr


def ids_of(result):
    return [line.split("\t")[0] for line in result.stdout.splitlines()]


def states(q, queue_id):
    with QueueAdmin(q.path) as a:
        return {r.address: r.state for r in a.show(queue_id).recipients}


# -- basics ------------------------------------------------------------------------------------


def test_version_and_help(run):
    assert ok(run("--version", config=None)).stdout == f"elemtactl {__version__}\n"
    text = ok(run("--help", config=None)).stdout
    assert "queue" in text and "config" in text and "64 usage" in text
    assert "--older-than" in ok(run("queue", "list", "--help")).stdout


def test_the_launcher_runs_from_the_checkout(q, conf):
    done = subprocess.run([str(ELEMTACTL), "--config", conf, "queue", "list"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == q.pending


# -- queue list ---------------------------------------------------------------------------------


def test_list_piped_is_one_plain_line_per_message(q, run):
    result = ok(run("queue", "list"))
    assert "\x1b" not in result.stdout
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [fields[0] for fields in lines] == q.pending
    deferred = lines[0]
    assert len(deferred) == 8
    assert abs(int(deferred[1]) - 4 * 3600) < 60
    assert deferred[2:6] == [str(len(sample.BODY)), "alice@example.com", "normal",
                             "bob@example.org:deferred,carol@example.net:delivered"]
    assert deferred[6].endswith("Z") and deferred[7] == "451 4.7.1 greylisted"
    assert lines[-1][3:5] == ["<>", "low"]  # the bounce
    assert lines[-1][6:] == ["-", "-"]


@pytest.mark.parametrize(("args", "expected"), [
    (["--state", "held"], ["held"]),
    (["--state", "active"], ["active"]),
    (["--domain", "example.net"], ["queued"]),
    (["--sender", "<>"], ["held"]),
    (["--sender", "@example.com"], ["deferred", "active", "queued"]),
    (["--recipient", "FRANK@example.net"], ["queued"]),
    (["--older-than", "150m"], ["deferred", "active"]),
    (["--older-than", "3h30m"], ["deferred"]),
    (["--older-than", "9000"], ["deferred", "active"]),
    (["--older-than", "1d"], []),
    (["--priority", "high"], ["queued"]),
    (["--priority", "normal", "--state", "deferred"], ["deferred"]),
])
def test_list_filters(q, run, args, expected):
    assert ids_of(ok(run("queue", "list", *args))) == [getattr(q, name) for name in expected]


def test_list_json_and_its_pages(q, run):
    first = json.loads(ok(run("queue", "list", "--json", "--limit", "3")).stdout)
    assert set(first) == {"messages", "next_after"}
    assert [m["queue_id"] for m in first["messages"]] == q.pending[:3]
    assert first["next_after"] == q.pending[2]
    m = first["messages"][0]
    assert set(m) == MESSAGE_KEYS
    assert m["recipients"] == [{"address": "bob@example.org", "state": "deferred"},
                               {"address": "carol@example.net", "state": "delivered"}]
    assert (m["sender"], m["priority"], m["last_error"], m["size"]) == (
        "alice@example.com", "normal", "451 4.7.1 greylisted", len(sample.BODY))
    assert m["next_attempt"] == pytest.approx(q.clock() - 4 * HOUR + 600 + 10 * HOUR)
    rest = json.loads(ok(run("queue", "list", "--json", "--limit", "3", "--after", first["next_after"].lower())).stdout)
    assert ([m["queue_id"] for m in rest["messages"]], rest["next_after"]) == ([q.held], None)


def test_an_empty_result_is_one_line_that_a_pipe_never_reads_as_data(q, run, tmp_path):
    result = ok(run("queue", "list", "--priority", "critical"))
    assert (result.stdout, result.stderr) == ("", "No messages match.\n")
    empty = tmp_path / "empty"
    with Store(str(empty / "queue.db")):
        pass
    config = tmp_path / "empty.toml"
    config.write_text(f'[server]\nspool_dir = "{empty}"\n')
    result = ok(run("queue", "list", config=str(config)))
    assert (result.stdout, result.stderr) == ("", "The queue is empty.\n")
    assert json.loads(ok(run("queue", "list", "--json", config=str(config))).stdout) == {
        "messages": [], "next_after": None}


def test_a_terminal_gets_a_table():
    from elemta.queue.query import MessageSummary, Page, RecipientState

    page = Page((MessageSummary("1GA4KQB3S0000", 0.0, 7500, 2048, "", "high",
                                (RecipientState("[bob]@example.org", "deferred"),), 100.0, "451 " + "x" * 100),),
                "1GA4KQB3S0000")
    buffer = io.StringIO()
    Output(terminal=True, console=Console(file=buffer, width=200, color_system=None)).page(page, 50.0, "empty")
    text = buffer.getvalue()
    for expected in ("ID", "Last error", "1GA4KQB3S0000", "2h05m", "2.0 KiB", "<>", "[bob]@example.org (deferred)",
                     "in 50s", "…", "more: add --after 1GA4KQB3S0000"):
        assert expected in text


# -- show, trace --------------------------------------------------------------------------------


def test_show_plain(q, run):
    lines = [line.split("\t") for line in ok(run("queue", "show", q.queued)).stdout.splitlines()]
    fields = {f[0]: f[1:] for f in lines if f[0] not in ("header", "recipient")}
    assert fields["sender"] == ["eve@example.com"]
    assert fields["envid"] == ["ENV-1"] and fields["ret"] == ["HDRS"] and fields["body"] == ["stored"]
    assert ["header", "Subject", "quarterly report"] in lines
    assert ["recipient", "Frank@Example.NET", "queued", "0", fields["created"][0], "-", "rfc822;frank@example.net",
            "SUCCESS,FAILURE", "-"] in lines


def test_show_json(q, run):
    d = json.loads(ok(run("queue", "show", "--json", q.queued)).stdout)
    assert set(d) == {"queue_id", "created", "age", "size", "sender", "priority", "client_ip", "client_helo",
                      "listener", "envid", "ret", "body_type", "smtputf8", "requiretls", "done_at", "body_available", "headers",
                      "recipients"}
    assert d["headers"][-1] == ["Subject", "quarterly report"]
    assert set(d["recipients"][0]) == {"address", "state", "attempts", "next_attempt", "last_error", "orcpt",
                                       "notify", "updated", "expanded_from"}
    assert d["recipients"][0]["notify"] == ["SUCCESS", "FAILURE"]
    assert (d["priority"], d["smtputf8"], d["body_type"]) == ("high", False, "8BITMIME")


def test_show_body_is_the_stored_message_byte_for_byte(q, run):
    assert ok(run("queue", "show", "--body", q.queued)).stdout_bytes == sample.BODY


def test_a_final_message_has_no_body_any_more(q, run):
    assert ok(run("queue", "show", q.done)).stdout.count("body\tdropped") == 1
    assert "dropped" in fails(run("queue", "show", "--body", q.done), 66)
    fails(run("queue", "show", "--body", "--json", q.queued), 64)


def test_trace(q, run):
    lines = [line.split("\t") for line in ok(run("queue", "trace", q.deferred)).stdout.splitlines()]
    assert [f[:2] for f in lines] == [["recipient", "bob@example.org"], ["attempt", "bob@example.org"],
                                      ["attempt", "bob@example.org"], ["recipient", "carol@example.net"],
                                      ["attempt", "carol@example.net"]]
    assert lines[1][3:] == ["deferred", "mx.example.org", "192.0.2.26", "25", "TLSv1.3", "1.25",
                            "451 4.7.1 greylisted"]
    t = json.loads(ok(run("queue", "trace", "--json", q.deferred)).stdout)
    assert set(t) == {"queue_id", "created", "sender", "recipients"}
    bob = t["recipients"][0]
    assert set(bob) == {"address", "state", "attempts", "next_attempt", "last_error", "tries"}
    assert set(bob["tries"][0]) == {"at", "outcome", "host", "ip", "port", "tls", "reply", "duration"}
    assert (bob["attempts"], len(bob["tries"]), bob["next_attempt"] > time.time()) == (2, 2, True)


def test_unknown_and_malformed_ids(q, run):
    assert fails(run("queue", "show", NOWHERE), 66) == f"elemtactl: no such message: {NOWHERE}\n"
    assert "not a queue ID" in fails(run("queue", "trace", "nope"), 64)


# -- changes ------------------------------------------------------------------------------------


def test_hold_release_requeue_delete_by_id(q, run):
    assert ok(run("queue", "hold", q.queued, q.active)).stdout == (
        f"held 1 message (2 recipients); skipped 1 message being delivered: {q.active}\n")
    assert set(states(q, q.queued).values()) == {"held"}
    assert ok(run("queue", "release", q.queued.lower())).stdout == "released 1 message (2 recipients)\n"
    assert set(states(q, q.queued).values()) == {"queued"}
    assert ok(run("queue", "requeue", q.deferred)).stdout == "requeued 1 message (1 recipient)\n"
    assert states(q, q.deferred)["bob@example.org"] == "queued"
    change = json.loads(ok(run("queue", "delete", "--json", q.held)).stdout)
    assert change == {"action": "delete", "messages": 1, "recipients": 1, "skipped": [], "not_found": []}


def test_unknown_ids_are_reported_after_the_others_are_changed(q, run):
    result = run("queue", "hold", "--json", q.queued, NOWHERE)
    assert fails(result, 66) == f"elemtactl: no such message: {NOWHERE}\n"
    assert json.loads(result.stdout)["not_found"] == [NOWHERE]
    assert set(states(q, q.queued).values()) == {"held"}


def test_ids_from_stdin_so_list_output_can_be_piped_back(q, run):
    listed = ok(run("queue", "list", "--sender", "@example.com")).stdout
    assert ok(run("queue", "hold", "-", input="# comment\n\n" + listed)).stdout.startswith("held 2 messages")
    assert ids_of(ok(run("queue", "list", "--state", "held"))) == [q.deferred, q.queued, q.held]


@pytest.mark.parametrize(("args", "message"), [
    (["hold", "ALL"], "add --yes"),
    (["delete", "ALL", "1GA4KQB3S0000"], "ALL stands alone"),
    (["requeue", "ALL"], "not allowed"),
    (["hold", "all"], "ALL, in upper case"),
    (["release", "not-an-id"], "not a queue ID"),
    (["hold"], "Missing argument"),
])
def test_change_usage_errors(q, run, args, message):
    assert message in fails(run("queue", *args), 64)
    assert set(states(q, q.queued).values()) == {"queued"}


def test_all_with_yes_or_a_confirmation(q, run, monkeypatch):
    assert ok(run("queue", "hold", "ALL", "--yes")).stdout == (
        f"held 2 messages (3 recipients); skipped 1 message being delivered: {q.active}\n")
    monkeypatch.setattr(ctlbase, "_interactive", lambda: True)
    declined = run("queue", "release", "ALL", input="n\n")
    assert declined.exit_code == 64
    # The question, then the one-line error.  CliRunner echoes the answer as a terminal would:
    # click 8.1 on stdout, 8.2 and newer after the question on stderr.
    assert re.search(r"\[y/N\]:( n\n)?elemtactl queue release: not confirmed: nothing to release\n\Z",
                     declined.stderr), declined.stderr
    assert set(states(q, q.queued).values()) == {"held"}
    result = ok(run("queue", "release", "ALL", input="y\n"))
    assert "Release every message" in result.stderr
    assert result.stdout.endswith("released 3 messages (4 recipients)\n")  # after the echoed answer


def test_flush_and_priority(q, run):
    assert json.loads(ok(run("queue", "flush", "--json", "example.org")).stdout) == {
        "action": "flush", "messages": 1, "recipients": 1, "skipped": [], "not_found": []}
    assert ok(run("queue", "flush")).stdout == "flushed 0 messages (0 recipients)\n"
    assert ok(run("queue", "priority", q.held, "CRITICAL")).stdout == "reprioritised 1 message (1 recipient)\n"
    assert ids_of(ok(run("queue", "list", "--priority", "critical"))) == [q.held]
    assert "'urgent' is not one of" in fails(run("queue", "priority", q.held, "urgent"), 64)
    fails(run("queue", "priority", NOWHERE, "low"), 66)


# -- stats --------------------------------------------------------------------------------------


def test_stats(q, run):
    lines = [line.split("\t") for line in ok(run("queue", "stats")).stdout.splitlines()]
    assert ["messages", "4"] in lines and ["state", "held", "1"] in lines and ["priority", "high", "1"] in lines
    assert ["buckets", "T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"] in lines
    assert ["domain", "TOTAL", "5", "0", "0", "0", "0", "1", "2", "2", "0", "0", "0"] in lines
    assert ["domain", "example.org", "4", "0", "0", "0", "0", "1", "1", "2", "0", "0", "0"] in lines
    s = json.loads(ok(run("queue", "stats", "--json", "--top", "1")).stdout)
    assert set(s) == {"messages", "bytes", "oldest_age", "recipients_by_state", "messages_by_priority",
                      "bucket_minutes", "totals", "domain_count", "domains"}
    assert (s["domain_count"], s["domains"]) == (2, [{"domain": "example.org", "total": 4,
                                                      "buckets": [0, 0, 0, 0, 1, 1, 2, 0, 0, 0]}])
    assert s["recipients_by_state"]["delivered"] == 2


# -- config -------------------------------------------------------------------------------------


def test_config_check(run, conf, tmp_path):
    assert ok(run("config", "check")).stdout == f"OK: {conf}\n"
    assert json.loads(ok(run("config", "check", "--json")).stdout) == {"valid": True, "file": conf}
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = 0\n")
    assert "smtp.max_recipients" in fails(run("config", "check", config=str(bad)), 78)
    bad.write_text("[smtp]\nmax_recipients = 0\nmax_errors = 0\n")
    result = run("config", "check", "--json", config=str(bad))
    assert result.exit_code == 78 and not result.stderr
    verdict = json.loads(result.stdout)
    assert (verdict["valid"], verdict["file"]) == (False, str(bad))
    assert [p.split(":")[0] for p in verdict["problems"]] == ["smtp.max_recipients", "smtp.max_errors"]
    assert "no such file" in fails(run("config", "check", config=str(tmp_path / "missing.toml")), 78)
    unreadable_table = tmp_path / "table.toml"
    unreadable_table.write_text(f'[local]\nrecipients_file = "{tmp_path / "none.txt"}"\n')
    assert "local.recipients_file" in fails(run("config", "check", config=str(unreadable_table)), 78)


def test_config_show_is_toml_that_reads_back_as_the_same_config(run, tmp_path):
    path = tmp_path / "full.toml"
    path.write_text('[smtp]\nlocal_domains = ["Example.ORG"]\n\n[delivery]\nretry_jitter = 0.25\n'
                    '[delivery.transport]\n"example.net" = "smtp:[192.0.2.1]:2525"\n'
                    '[local.aliases]\n"abuse" = "a@example.org, \\"b\\"@example.org"\n')
    loaded = cfg.load(str(path))
    text = ok(run("config", "show", config=str(path))).stdout
    assert cfg.parse(tomllib.loads(text), source=str(path)) == loaded
    assert '"example.net" = "smtp:[192.0.2.1]:2525"' in text
    assert json.loads(ok(run("config", "show", "--json", config=str(path))).stdout) == json.loads(
        json.dumps(tomlconf.as_dict(loaded)))


FULL_CONFIG = """\
[[listeners]]
address = "127.0.0.1:2525"
[[listeners]]
address = "[::1]:4650"
role = "submissions"
proxy_protocol = true

[server]
proxy_networks = ["192.0.2.0/24"]

[smtp]
local_domains = ["Example.ORG"]
sender_logins = { "bob" = "bob@example.org, @example.net" }

[tls]
min_version = "TLSv1.3"
[[tls.certificates]]
cert_file = "/etc/elemta/mx.pem"
key_file = "/etc/elemta/mx.key"
[[tls.certificates]]
cert_file = "/etc/elemta/other.pem"

[delivery]
tls_policies = { "example.com" = "verify", "bank.example" = "encrypt" }
domain_rate = { "gmail.com" = 1.5 }

[[plugins]]
use = "spf"
timeout = 5
[plugins.options]
reject_fail = true
nested = { a = 1, "b c" = [1, 2.5], d = { e = "f" } }
since = 2026-01-02T03:04:05Z
day = 2026-01-02
[[plugins]]
use = "dkim"
name = "signer"
fail_closed = true
[plugins.options]
sign = true
[[plugins.options.keys]]
domain = "example.com"
selector = "s1"
key_file = "/etc/elemta/dkim/s1.key"
[[plugins.options.keys]]
domain = "example.org"
selector = "s2"
key_file = "/etc/elemta/dkim/s2.key"
[plugins.options.only.tables]
x = []
[[plugins]]
use = "greylist"
enabled = false
"""


@pytest.mark.parametrize("text", [FULL_CONFIG, ""], ids=["full", "defaults"])
def test_config_show_with_every_kind_of_table_reads_back_as_the_same_config(run, tmp_path, text):
    """Arrays of tables ([[listeners]], [[tls.certificates]], [[plugins]]), sub-tables, a
    plugin's options of any depth and TOML dates: elemtactl config show, given back with
    --config, is the same configuration."""
    path = tmp_path / "full.toml"
    path.write_text(text)
    loaded = cfg.load(str(path))
    shown = tmp_path / "shown.toml"
    shown.write_text(ok(run("config", "show", config=str(path))).stdout)
    assert dataclasses.replace(cfg.load(str(shown)), source=loaded.source) == loaded
    as_json = json.loads(ok(run("config", "show", "--json", config=str(path))).stdout)
    assert as_json == json.loads(json.dumps(tomlconf.as_dict(loaded)))
    assert [p["name"] for p in as_json["plugins"]] == [p.name for p in loaded.plugins]
    assert as_json["tls"]["certificates"] == [dataclasses.asdict(c) for c in loaded.tls.certificates]
    if text:
        assert [p.name for p in loaded.plugins] == ["spf", "signer", "greylist"]
        assert loaded.plugins[1].options["keys"][1]["selector"] == "s2"
        assert as_json["plugins"][0]["options"]["since"] == "2026-01-02T03:04:05+00:00"
        assert as_json["plugins"][1]["timeout"] is None  # not set: the plugin's own default


def test_config_show_puts_each_key_s_doc_above_it(run, tmp_path):
    """Each key of elemta's own tables comes with its one-line doc, as its field declares it
    (config.key(doc=...)), in the comment line above it; a plugin's options have none."""
    path = tmp_path / "full.toml"
    path.write_text(FULL_CONFIG)
    lines = ok(run("config", "show", config=str(path))).stdout.splitlines()
    table, shown = "", set()
    for number, line in enumerate(lines):
        header = re.fullmatch(r"\[\[?([^\]]+)\]\]?", line)
        found = re.match(r"([\w-]+) = ", line)
        if header:
            table = header.group(1)
        key = table if header else f"{table}.{found.group(1)}" if found else None
        if key in cfg._DOCS:  # a key, or a key written as a [table] or [[table]] (tls.certificates)
            assert lines[number - 1] == f"# {cfg._DOCS[key]}", (key, lines[number - 1])
            shown.add(key)
        elif found:  # a key of a table such as smtp.sender_logins or of a plugin's options, or plugins = []
            assert (table, found.group(1)) == ("", "plugins") or any(
                table == k or table.startswith(k + ".") for k in cfg._DOCS), (table, line)
    assert shown == set(cfg._DOCS)


def test_toml_values_round_trip():
    for value in ("", 'a"b\\c\n\t\x01\x7fé', 0, -5, 2**40, 0.1, 1e-05, 300.0, True, False, (), ("a", "b"), {},
                  {"x.y": "z", "n": 2.5}):
        assert tomllib.loads(f"k = {tomlconf.value(value)}")["k"] == (list(value) if isinstance(value, tuple)
                                                                     else value)


def test_config_from_the_environment(q, conf):
    result = cli_runner().invoke(main, ["queue", "list"], env={"ELEMTA_CONFIG": conf})
    assert ids_of(ok(result)) == q.pending


def test_dev_reads_the_dev_spool_of_this_directory(tmp_path, monkeypatch):
    built = sample.build(str(tmp_path / "dev-spool" / "queue.db"))
    try:
        monkeypatch.chdir(tmp_path)
        result = cli_runner().invoke(main, ["--dev", "queue", "list"])
        assert ids_of(ok(result)) == built.pending
    finally:
        built.close()


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["queue", "list", "--nope"],
    ["queue", "list", "--state", "stuck"],
    ["queue", "list", "--older-than", "2x"],
    ["queue", "list", "--older-than", "-5m"],
    ["queue", "list", "--limit", "-1"],
    ["queue", "list", "--after", "bad"],
    ["queue", "frobnicate"],
    ["--nope"],
])
def test_usage_errors_exit_64_in_one_line(q, run, args):
    assert fails(run(*args), 64).startswith("elemtactl")


def test_a_missing_queue_is_unavailable(run, tmp_path):
    assert "spool directory" in fails(run("queue", "list"), 69)
    (tmp_path / "spool").mkdir()
    assert "no queue database" in fails(run("queue", "stats"), 69)
    assert "no queue database" in fails(run("queue", "hold", "ALL", "--yes"), 69)
    assert not (tmp_path / "spool" / "queue.db").exists()


def test_a_bad_config_exits_78_before_the_queue_is_opened(run, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\nnope = 1\n")
    assert "queue.nope: unknown key" in fails(run("queue", "list", config=str(bad)), 78)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_no_permission_exits_77(q, tmp_path):
    """As a user who may not enter the spool directory, the way an admin without access runs it."""
    readable = tempfile.mkdtemp(prefix="elemtactl-test-")  # the config, readable by that user
    try:
        os.chmod(readable, 0o755)
        config = os.path.join(readable, "elemta.toml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(f'[server]\nspool_dir = "{tmp_path / "spool"}"\n')
        os.chmod(config, 0o644)
        command, env = [str(ELEMTACTL), "--config", config, "queue", "list"], None
        if os.geteuid() == 0:  # root reads everything: be nobody, for whom the test's tmp_path is closed
            command, env = as_nobody(command)
        else:
            os.chmod(tmp_path / "spool", 0)
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, env=env)
    finally:
        os.chmod(tmp_path / "spool", 0o755)
        shutil.rmtree(readable)
    assert done.returncode == 77, done.stderr
    assert done.stderr.startswith("elemtactl: ") and "permission denied" in done.stderr
    assert done.stderr.count("\n") == 1
