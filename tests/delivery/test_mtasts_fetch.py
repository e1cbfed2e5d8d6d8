"""delivery/mtasts_fetch.py against a real HTTPS server on loopback with a test CA (trustme)."""

import socket

import pytest

from elemta.delivery import mtasts
from elemta.delivery.mtasts_fetch import FetchError, fetch_policy
from tests.policyserver import POLICY, PolicyServer


@pytest.fixture
def server(ca):
    s = PolicyServer(ca)
    yield s
    s.stop()


def test_the_policy_is_fetched_from_the_well_known_path(server, ca_file):
    body = fetch_policy("Example.TEST.", ["127.0.0.1"], port=server.port, ca_file=ca_file)
    assert body == POLICY
    assert server.paths == ["/.well-known/mta-sts.txt"]
    assert mtasts.parse_policy(body).allows("mx.example.test")


@pytest.mark.parametrize("reply, why", [
    ((301, "text/plain", b"", {"Location": "https://elsewhere.test/"}), "HTTP 301"),  # never followed
    ((404, "text/plain", b"no", {}), "HTTP 404"),
    ((200, "text/html", POLICY, {}), "media type text/html, not text/plain"),
    ((200, "", POLICY, {}), "not text/plain"),
    ((200, "text/plain", POLICY + b"x" * mtasts.MAX_POLICY_SIZE, {}), "larger than"),
])
def test_anything_but_a_small_text_plain_200_is_no_policy(server, ca_file, reply, why):
    server.reply = reply
    with pytest.raises(FetchError, match=why):
        fetch_policy("example.test", ["127.0.0.1"], port=server.port, ca_file=ca_file)


def test_a_certificate_for_another_name_is_refused(ca, ca_file):
    other = PolicyServer(ca, name="mta-sts.other.test")
    try:
        with pytest.raises(FetchError, match="certificate not valid for mta-sts.example.test"):
            fetch_policy("example.test", ["127.0.0.1"], port=other.port, ca_file=ca_file)
        assert other.paths == []  # nothing was asked of a server that is not the policy host
    finally:
        other.stop()


def test_a_certificate_from_an_unknown_ca_is_refused(server):
    with pytest.raises(FetchError, match="certificate not valid"):
        fetch_policy("example.test", ["127.0.0.1"], port=server.port, ca_file=None)


def test_each_address_is_tried_and_every_failure_is_said(server, ca_file):
    with socket.socket() as closed:  # a port nobody listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
        with pytest.raises(FetchError, match=r"127\.0\.0\.1: ConnectionRefusedError"):
            fetch_policy("example.test", ["127.0.0.1"], port=dead, ca_file=ca_file, timeout=5)
    assert fetch_policy("example.test", ["127.0.0.2", "127.0.0.1"], port=server.port, ca_file=ca_file,
                        timeout=5) == POLICY


def test_no_address_is_a_failure():
    with pytest.raises(FetchError, match="mta-sts.example.test has no address"):
        fetch_policy("example.test", [])
