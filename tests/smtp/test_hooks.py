"""The session's side of the plugins (smtp/hooks.py), with a real manager and sample plugins."""

from __future__ import annotations

import dataclasses

import pytest

from elemta.config import PluginSpec
from elemta.plugins import api
from elemta.plugins.manager import Manager
from tests.smtp.test_session import make_session, play


@pytest.fixture()
def session():
    manager = Manager((PluginSpec(use="tests.plugins.sample:Notes", name="notes", timeout=0),))
    manager.start(api.Services(hostname="mx.test", spool_dir="/nonexistent"))
    session, _ = make_session()
    session.services = dataclasses.replace(session.services, plugins=manager)
    yield session
    manager.stop()


def header_of(message) -> bytes:
    return message.body.split(b"\r\n\r\n")[0]


def test_a_second_ehlo_replaces_the_auth_results_of_the_first(session):
    [message] = play(session, [
        (b"EHLO one.example\r\n", ["250"]),
        (b"EHLO two.example\r\n", ["250"]),
        (b"MAIL FROM:<a@relay.example>\r\n", ["250 2.1.0"]),
        (b"RCPT TO:<b@local.example>\r\n", ["250 2.1.5"]),
        (b"DATA\r\n", ["354"]),
        (b"Subject: x\r\n\r\nhi\r\n.\r\n", ["enqueue", "250 2.0.0"]),
    ])
    header = header_of(message)
    assert header.count(b"x-helo=pass") == 1 and b"smtp.helo=two.example" in header


def test_a_refused_recipient_leaves_nothing_in_the_message(session):
    [message] = play(session, [
        (b"EHLO one.example\r\n", ["250"]),
        (b"MAIL FROM:<a@relay.example>\r\n", ["250 2.1.0"]),
        (b"RCPT TO:<refused@local.example>\r\n", ["550 5.7.1"]),
        (b"RCPT TO:<b@local.example>\r\n", ["250 2.1.5"]),
        (b"DATA\r\n", ["354"]),
        (b"Subject: x\r\n\r\nhi\r\n.\r\n", ["enqueue", "250 2.0.0"]),
    ])
    header = header_of(message)
    assert b"X-Rcpt: b@local.example" in header and b"refused@" not in header
