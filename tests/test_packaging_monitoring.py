"""packaging/monitoring: the Prometheus alert rules and the Grafana dashboard name only metrics
elemta exports, and the rules pass promtool's checks and their unit tests.

The exported names are not copied into this test but asked of the code, in a subprocess (the
multiprocess storage of prometheus_client is chosen when it is first imported, so this pytest
process, where other tests may have imported it already, is the wrong place):

- metrics.py: `metrics.enable()` on a temporary directory defines every counter and histogram;
  each one's `describe()` gives its name and type, and its label names. A counter is exported
  as NAME_total, a histogram as NAME_bucket (with `le`), NAME_sum and NAME_count, a gauge as
  NAME (prometheus_client's multiprocess exposition, which elemta serves, has no _created).
- monitor.py: the collectors that read the queue and the health at scrape time are run against
  a real, empty queue database and a status as the supervisor writes it; the samples they
  return give the names and label names exactly as scraped.

A cross-check catches a family the subprocess did not produce: every whole string literal
"elemta_..." in the two modules must be an exported name.

Metric names are taken from PromQL with a small lexer rather than a full parser: Grafana's
variables and string literals are blanked, then the label matchers in {...}, the ranges in [...]
and the label lists of by/without/on/ignoring/group_left/group_right; what is left that looks
like an identifier, is not followed by "(" (a function or aggregation) and is not a keyword
(and, or, unless, bool, offset, ...) is a metric name. Every such name must be exported, except
the few non-elemta ones a rule is documented to use (`up` in ElemtaDown). Label names are
checked too: those in a selector's matchers against that metric's labels, those of by (...)
and {{legend}} against the labels of the metrics in the expression (plus job and instance,
which Prometheus adds). To be sure the PromQL itself parses, every dashboard expression (with
Grafana's variables replaced) is also put in a recording rule for `promtool check rules`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "packaging" / "monitoring"
RULES = HERE / "elemta-alerts.yml"
RULE_TESTS = HERE / "elemta-alerts.test.yml"
DASHBOARD = HERE / "grafana-dashboard.json"

# Alerts issue 17 asks for (more may be added).
REQUIRED_ALERTS = {"ElemtaDown", "ElemtaNotReady", "ElemtaQueueGrowing", "ElemtaOldestMessageOld",
                   "ElemtaDeliveryFailureRatio", "ElemtaDiskNearlyFull"}
# Metrics that are not elemta's, allowed in one rule each, as documented in the rule file and
# README.md: Prometheus' own `up` of the scrape job.
FOREIGN = {"ElemtaDown": {"up"}}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}

_EXPORTED = r'''
import atexit, json, os, shutil, sys, tempfile
tmp = tempfile.mkdtemp()
atexit.register(shutil.rmtree, tmp, True)
from elemta import metrics
metrics.enable(os.path.join(tmp, "metrics"))
from elemta import config, monitor
from elemta.queue import db, schema

names = {}
for value in metrics.defined().values():
    labels = list(getattr(value, "_labelnames", ()))
    for family in value.describe():
        if family.type == "counter":
            names[family.name + "_total"] = labels
        elif family.type == "histogram":
            names[family.name + "_bucket"] = labels + ["le"]
            names[family.name + "_sum"] = names[family.name + "_count"] = labels
        elif family.type == "gauge":
            names[family.name] = labels
        else:
            sys.exit("unexpected metric type " + family.type)
spool = os.path.join(tmp, "spool")
os.makedirs(spool)
conf = config.parse({"server": {"spool_dir": spool}})
connection = db.connect(conf.queue_path)
schema.migrate(connection)
connection.close()
status = {"pid": os.getpid(), "started": 1.0, "children": [], "listeners": [], "workers": 1}
collectors = [monitor.QueueCollector(conf.queue_path),
              monitor.HealthCollector(monitor.Health(conf, lambda: status))]
for collector in collectors:
    for family in collector.collect():
        for sample in family.samples:
            names.setdefault(sample.name, [])
            names[sample.name] = sorted(set(names[sample.name]) | set(sample.labels))
json.dump(names, sys.stdout)
'''


@cache
def exported() -> dict[str, frozenset[str]]:
    """Every sample name elemta's /metrics can carry, with its label names."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", _EXPORTED], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return {name: frozenset(labels) for name, labels in json.loads(done.stdout).items()}


def test_the_exported_names_are_complete():
    names = exported()
    literals = set()
    for module in ("metrics.py", "monitor.py"):
        literals |= set(re.findall(r"""["'](elemta_[a-z0-9_]+)["']""", (ROOT / "elemta" / module).read_text()))
    families = set(names) | {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in names}
    assert literals and literals <= families, sorted(literals - families)
    # The ones the rules and the dashboard need, with their types' suffixes.
    for name in ("elemta_ready", "elemta_spool_free_bytes", "elemta_spool_min_free_bytes",
                 "elemta_queue_messages", "elemta_delivery_attempts_total",
                 "elemta_delivery_delay_seconds_bucket", "elemta_smtp_connections_total"):
        assert name in names, name
    assert names["elemta_delivery_attempts_total"] == {"result", "destination"}
    assert "le" in names["elemta_delivery_delay_seconds_bucket"]


# ---- PromQL ---------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "atan2", "inf", "nan"}


def _blank(expr: str) -> str:
    """expr with Grafana's variables removed and string literals emptied."""
    return _STRING.sub('""', _GRAFANA_VARIABLE.sub("", expr))


def metric_names(expr: str) -> set[str]:
    text = _blank(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(1)
        if word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def label_problems(expr: str, known: dict[str, frozenset[str]], legend: str = "") -> list[str]:
    """Label names in expr (and its legend) that none of its metrics carries."""
    text = _blank(expr)
    problems = []
    names = [n for n in metric_names(expr) if n in known]
    available = set(TARGET_LABELS)
    for name in names:
        available |= known[name]
    for metric, body in _SELECTOR.findall(text):
        if metric in known:
            wrong = {m for m in _MATCHER.findall(body)} - known[metric] - TARGET_LABELS - {"__name__"}
            problems += [f"{metric} has no label {label}" for label in sorted(wrong)]
    for _, labels in _GROUPING.findall(text):
        for label in filter(None, (part.strip() for part in labels.split(","))):
            if label not in available:
                problems.append(f"no metric of the expression has the label {label}")
    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
        if label not in available:
            problems.append(f"the legend's {{{{{label}}}}} is no label of the expression's metrics")
    return problems


def test_the_promql_lexer():
    assert metric_names('sum by (job, instance) (rate(elemta_x_total{result=~"a|b"}[5m])) > 0.2 '
                        "and on (job) increase(elemta_y_total[15m]) >= 50") == {"elemta_x_total", "elemta_y_total"}
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(elemta_d_bucket{job=~"$job"}[$__rate_interval])))') \
        == {"elemta_d_bucket"}
    assert metric_names("time() - elemta_start_time_seconds offset 5m") == {"elemta_start_time_seconds"}
    assert metric_names('up{job="elemta"} == 0 or absent(node_filesystem_avail_bytes)') \
        == {"up", "node_filesystem_avail_bytes"}
    assert metric_names("2 * elemta_b unless elemta_c") == {"elemta_b", "elemta_c"}
    known = {"elemta_a_total": frozenset({"result"})}
    assert label_problems('sum by (result) (rate(elemta_a_total{result="x"}[5m]))', known, "{{result}}") == []
    assert len(label_problems('sum by (reslt) (elemta_a_total{reslut="x"})', known, "{{rsult}}")) == 3


def expression_problems(expr: str, allowed_foreign: set[str] = frozenset(), legend: str = "") -> list[str]:
    known = exported()
    names = metric_names(expr)
    problems = [f"{name} is not exported by elemta" for name in sorted(names - set(known) - allowed_foreign)]
    if not names & (set(known) | set(allowed_foreign)):
        problems.append("names no metric")
    return problems + label_problems(expr, known, legend)


# ---- the alert rules ----------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: Debian's prometheus package has it (run-tests.sh installs it)"
    return path


def test_promtool_checks_the_rules():
    done = subprocess.run([promtool(), "check", "rules", RULES.name], cwd=HERE, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_runs_the_rules_unit_tests():
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=HERE, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


@cache
def yaml_file(path: Path):
    # PyYAML: Debian's python3-yaml, which python3-spf depends on, so run-tests.sh's first run
    # (Debian's packages) always has it; the virtualenv of the second may not.
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict]:
    return [rule for group in yaml_file(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def test_the_alerts_asked_for_are_there_with_severity_and_a_runbook():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, rule["alert"]
        assert rule.get("for"), rule["alert"]


def test_the_alerts_name_only_exported_metrics():
    problems = {}
    for rule in alert_rules():
        found = expression_problems(rule["expr"], FOREIGN.get(rule["alert"], set()))
        if found:
            problems[rule["alert"]] = found
    assert not problems, problems
    assert metric_names(next(r["expr"] for r in alert_rules() if r["alert"] == "ElemtaDown")) == {"up"}
    # What would be caught: a misspelt name, a foreign metric where none is allowed, a label
    # the metric does not have.
    assert expression_problems("elemta_redy == 0")
    assert expression_problems('up{job="elemta"} == 0')
    assert expression_problems('elemta_queue_oldest_message_age_seconds{priority="low"} > 3600')


def test_every_alert_is_tested_firing_and_not_firing():
    firing, quiet = set(), set()
    for case in yaml_file(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", ()):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "never seen firing"
    assert names - quiet == set(), "never seen not firing"


# ---- the dashboard -------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict):
    """(where, expr, legend) of every panel's target (rows' panels included) and every query
    variable; label_values(selector, label) gives its selector and the label as legend."""

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", ()))

    for panel in panels(board["panels"]):
        for target in panel.get("targets", ()):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"], target.get("legendFormat", "")
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query)
            assert match, f"variable {variable['name']}: {query}"
            yield f"variable {variable['name']}", match.group(1), f"{{{{{match.group(2)}}}}}"


def dashboard_problems(board: dict) -> dict[str, list[str]]:
    problems = {}
    for where, expr, legend in queries(board):
        found = expression_problems(expr, legend=legend)
        if found:
            problems[where] = found
    return problems


def test_the_dashboard_is_a_grafana_dashboard_with_a_datasource_variable():
    board = dashboard()
    assert board["title"] and board["uid"] and 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids, titles = set(), set()
    for panel in board["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["title"] not in titles
        titles.add(panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"], target["expr"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_the_dashboard_names_only_exported_metrics():
    assert dashboard_problems(dashboard()) == {}


def test_the_dashboard_shows_what_issue_17_asks_for():
    used = set()
    for _, expr, _ in queries(dashboard()):
        used |= metric_names(expr)
    wanted = {"elemta_smtp_connections_total", "elemta_smtp_replies_total", "elemta_smtp_rejections_total",
              "elemta_smtp_messages_total", "elemta_smtp_received_bytes_total", "elemta_queue_messages",
              "elemta_queue_recipients", "elemta_queue_oldest_message_age_seconds",
              "elemta_delivery_attempts_total", "elemta_delivery_delay_seconds_bucket",
              "elemta_tls_handshakes_total", "elemta_smtp_auth_total", "elemta_plugin_calls_total",
              "elemta_plugin_errors_total", "elemta_plugin_call_seconds_bucket",
              "elemta_queue_commit_batch_messages_bucket", "elemta_queue_commit_seconds_bucket",
              "elemta_dns_cache_lookups_total", "elemta_reports_sent_total", "elemta_ready",
              "elemta_spool_free_bytes", "elemta_spool_min_free_bytes"}
    assert wanted - used == set()


def test_a_misspelt_metric_or_label_in_the_dashboard_is_caught():
    board = dashboard()
    panel = next(p for p in board["panels"] if p.get("targets"))
    good = panel["targets"][0]["expr"]
    for bad in (re.sub(r"elemta_(\w+)", r"elemta_\1x", good, count=1),  # a name elemta does not export
                re.sub(r"elemta_\w+", "node_load1", good, count=1),  # not elemta's at all
                good.replace('job=~"$job"', 'jbo=~"$job"')):  # a label no metric has
        panel["targets"][0]["expr"] = bad
        assert dashboard_problems(board), bad
    variable = next(v for v in board["templating"]["list"] if v["type"] == "query")
    panel["targets"][0]["expr"] = good
    variable["query"]["query"] = "label_values(elemta_infoo, job)"
    assert list(dashboard_problems(board)) == [f"variable {variable['name']}"]


def test_promtool_parses_every_dashboard_expression(tmp_path):
    """Each expression as a recording rule: `promtool check rules` parses its PromQL."""
    values = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$job": "elemta",
              "$instance": ".*"}
    rules = []
    for number, (where, expr, _) in enumerate(queries(dashboard())):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, (where, expr)
        rules.append({"record": f"dashboard:expr_{number}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
