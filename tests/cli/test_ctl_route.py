"""elemtactl route explain, against a real DNS server on loopback and a cached MTA-STS policy."""

import json
import shutil
import subprocess

import pytest

from elemta.cli.elemtactl import main
from elemta.delivery.mtasts import Cached, Policy
from elemta.delivery.mtasts_cache import PolicyCache
from tests.dnssec import DnssecTestbed
from tests.dnsserver import DnsServer
from tests.support import ROOT, cli_runner

RECORDS = {
    "example.test": [("MX", (10, "mx1.example.test")), ("MX", (20, "mx2.elsewhere.test"))],
    "mx1.example.test": [("A", "192.0.2.1")],
    "mx2.elsewhere.test": [("A", "192.0.2.2")],
    "_mta-sts.example.test": [("TXT", "v=STSv1; id=20261205;")],
    "plain.test": [("MX", (10, "mx.plain.test"))],
    "mx.plain.test": [("A", "192.0.2.3")],
}


@pytest.fixture
def dns_server():
    with DnsServer(RECORDS) as server:
        yield server


@pytest.fixture
def conf(tmp_path, dns_server):
    def write(extra=""):
        (tmp_path / "spool").mkdir(exist_ok=True)
        path = tmp_path / "elemta.toml"
        path.write_text(f'[server]\nspool_dir = "{tmp_path / "spool"}"\n\n[smtp]\nlocal_domains = ["here.test"]\n\n'
                        f'[delivery]\nresolvers = ["{dns_server.nameserver}"]\ndns_timeout = 5\n{extra}')
        return str(path)
    return write


def explain(config, target):
    result = cli_runner().invoke(main, ["--config", config, "route", "explain", target, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def cache_policy(tmp_path, mode: str) -> None:
    """example.test's MTA-STS policy in the spool's cache, naming mx1 only (id 20261205)."""
    cache = PolicyCache(str(tmp_path / "spool"))
    cache.put("example.test", Cached(Policy(mode, 86400, ("mx1.example.test",)), "20261205", 4e9))
    cache.close()


def test_an_enforced_mta_sts_policy_says_which_hosts_get_mail_and_how(conf, tmp_path):
    config = conf()
    cache_policy(tmp_path, "enforce")
    r = explain(config, "example.test")
    assert (r["route"], r["kind"]) == ("mx", "smtp")
    assert r["destination"] == {"key": ["mx1.example.test", "mx2.elsewhere.test"], "port": 25,
                                "concurrency": 20, "rate": 0.0}
    sts = r["mta_sts"]
    assert (sts["record"], sts["applies"], sts["fetch_at_next_delivery"]) == ("id=20261205", "enforce", False)
    assert sts["cached"]["expires"] == 4e9 + 86400
    assert [(h["host"], h["addresses"], h["tls"]) for h in r["hosts"]] == [
        ("mx1.example.test", ["192.0.2.1"], "verify"), ("mx2.elsewhere.test", ["192.0.2.2"], "skipped")]


def test_a_policy_in_mode_testing_is_shown_delivering_as_may(conf, tmp_path):
    config = conf()
    cache_policy(tmp_path, "testing")
    r = explain(config, "example.test")
    assert r["mta_sts"]["applies"] == "testing"
    assert [(h["tls"], h["why"].split(":")[0:2]) for h in r["hosts"]] == [
        ("may", ["MTA-STS", " mode testing"]), ("may", ["MTA-STS", " mode testing"])]
    assert "not name" in r["hosts"][1]["why"]


def test_without_a_cached_policy_mx_delivery_is_opportunistic_and_the_next_delivery_fetches(conf):
    r = explain(conf(), "example.test")
    assert r["mta_sts"]["applies"] is None and r["mta_sts"]["fetch_at_next_delivery"] is True
    assert {h["tls"] for h in r["hosts"]} == {"may"}
    r = explain(conf(), "plain.test")
    assert r["mta_sts"]["record"] == "none" and r["mta_sts"]["fetch_at_next_delivery"] is False


def test_the_domains_own_tls_policy_and_mta_sts_off_are_said(conf):
    r = explain(conf('tls_policies = { "example.test" = "verify" }\n'), "example.test")
    assert r["mta_sts"] == {"applies": None, "why": "the domain's TLS policy (verify) is fixed by the config"}
    assert {h["tls"] for h in r["hosts"]} == {"verify"}
    r = explain(conf("mta_sts = false\n"), "example.test")
    assert r["mta_sts"]["why"] == "delivery.mta_sts is off"


def test_a_domain_that_requires_mta_sts_without_a_policy_is_shown_waiting(conf):
    r = explain(conf('tls_policies = { "example.test" = "mta-sts", "plain.test" = "mta-sts" }\n'), "plain.test")
    assert r["tls_policy"] == "mta-sts" and r["mta_sts"]["record"] == "none"
    assert [(h["tls"], h["why"]) for h in r["hosts"]] == [
        ("skipped", "MTA-STS required (mta-sts): plain.test: no policy cached")]


@pytest.mark.parametrize("extra, target, route, kind", [
    ('relayhost = "[192.0.2.9]:2525"\n', "example.test", "relayhost", "smtp"),
    ('transport = { "example.test" = "smtp:[192.0.2.8]:2526" }\n', "example.test", "transport", "smtp"),
    ("", "here.test", "local", "lmtp"),
    ("", "[192.0.2.7]", "literal", "smtp"),
])
def test_every_kind_of_route_is_named(conf, extra, target, route, kind):
    r = explain(conf(extra), target)
    assert (r["route"], r["kind"]) == (route, kind)
    assert "mta_sts" not in r  # MTA-STS is for MX delivery only


def test_a_domain_that_does_not_exist_is_explained_not_failed(conf):
    r = explain(conf(), "nowhere.test")
    assert (r["route"], r["status"]) == ("error", "5.1.2")
    assert "does not exist" in r["why"]


def test_the_console_script_prints_one_line_per_fact(conf):
    done = subprocess.run([str(ROOT / "bin" / "elemtactl"), "--config", conf(), "route", "explain", "example.test"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "example.test: mx: MX records of example.test, best first"
    assert lines[1] == "  destination: mx1.example.test, mx2.elsewhere.test port 25: 20 at a time, no rate limit"
    assert lines[2] == "  TLS policy: dane"
    assert lines[3] == "  DANE: not applied: the MX records of example.test are not authenticated (DNSSEC)"
    assert lines[4].startswith("  MTA-STS: record id=20261205; no policy cached; applies: nothing")
    assert lines[5] == ("  mx1.example.test [192.0.2.1]: TLS may: "
                        "STARTTLS when offered, certificate not checked (opportunistic)")


def test_a_target_that_is_no_domain_is_a_usage_error(conf):
    result = cli_runner().invoke(main, ["--config", conf(), "route", "explain", "@"])
    assert result.exit_code == 64 and "neither a domain nor an address" in result.stderr


@pytest.mark.skipif(not all(shutil.which(p) for p in ("nsd", "unbound", "ldns-signzone")),
                    reason="nsd, unbound and ldnsutils are not installed (run-tests.sh installs them)")
def test_dane_records_are_shown_per_host_from_a_validating_resolver(tmp_path):
    digest = "ab" * 32
    zones = {"dane.test": ["@ IN MX 10 mx", "mx IN A 127.0.0.1", f"_25._tcp.mx IN TLSA 3 1 1 {digest}"],
             "nodane.test": ["@ IN MX 10 mx", "mx IN A 127.0.0.1"]}
    (tmp_path / "dnssec").mkdir()
    with DnssecTestbed(tmp_path / "dnssec", zones, signed=set(zones)) as bed:
        (tmp_path / "spool").mkdir()
        config = tmp_path / "elemta.toml"
        config.write_text(f'[server]\nspool_dir = "{tmp_path / "spool"}"\n\n'
                          f'[delivery]\nresolvers = ["{bed.nameserver}"]\ndns_timeout = 5\n'
                          'tls_policies = { "nodane.test" = "dane-only" }\n')
        r = explain(str(config), "dane.test")
        assert r["dane"] == {"applies": True, "why": "the MX records of dane.test are authenticated"}
        (host,) = r["hosts"]
        assert (host["tls"], host["tlsa"]) == ("dane", [f"3 1 1 {digest}"])
        assert r["tls_policy"] == "dane"
        r = explain(str(config), "nodane.test")
        assert (r["tls_policy"], r["dane"]["applies"]) == ("dane-only", True)
        assert r["mta_sts"] == {"applies": None, "why": "the domain's TLS policy is dane-only"}
        (host,) = r["hosts"]
        assert (host["tls"], host["why"]) == ("skipped", "DANE required (dane-only): mx.nodane.test has no "
                                              "authenticated TLSA records")
