"""Several SMTP workers count together: connection caps, [limits] and the AUTH lockout hold
exactly as with one worker, whichever worker the kernel hands each connection to, also after
a worker was killed and started again.

The real daemon on loopback with 2 and 4 workers. Clients pick their source address among
127.0.0.0/8, so each test is a client of its own. The log says which worker (PID) took each
connection, so every test also checks that its connections were in fact spread.
"""

from __future__ import annotations

import os
import re
import select
import signal
import smtplib
import socket
import ssl

import pytest

from elemta.passwords import PasswordFile
from tests.support import Daemon, RawClient, wait_for

trustme = pytest.importorskip("trustme")

PASSWORD = "correct horse battery"
CAPS = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.test.example"
workers = @WORKERS@
max_connections = 30
max_connections_per_ip = 12
reserved_connections = 0

[smtp]
local_domains = ["example.com"]
trusted_networks = []

[limits]
ip_connections_per_minute = 0

[queue]
min_free_space = 0

[delivery]
hold = true
"""

LIMITS = """
[[listeners]]
address = "127.0.0.1:0"
role = "mx"

[[listeners]]
address = "127.0.0.2:0"
role = "submission"

[server]
spool_dir = "@SPOOL@"
hostname = "mx.test.example"
workers = @WORKERS@

[smtp]
local_domains = ["example.com"]
trusted_networks = []
auth_file = "@SPOOL@/../passwd"
auth_mechanisms = ["PLAIN"]
auth_max_failures = 3
auth_lockout = 600

[[tls.certificates]]
cert_file = "@SPOOL@/../mx.pem"

[limits]
ip_connections_per_minute = 6
ip_messages_per_hour = 4
ip_recipients_per_hour = 5
sender_messages_per_hour = 3
user_messages_per_hour = 3
user_recipients_per_hour = 4

[queue]
min_free_space = 0

[delivery]
hold = true
"""


class Client(RawClient):
    def __init__(self, port: int, source: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self._buf = b""
        self.greeting = self.reply()


def served_by(daemon: Daemon, source: str) -> list[int]:
    """The PIDs of the workers that took each connection from source, in order."""
    pattern = re.compile(rf"elemta\[(\d+)\]: NOQUEUE connect ip={re.escape(source)} ")
    return [int(pid) for pid in pattern.findall(daemon.log_text())]


# Twelve connections all go to one of two workers once in 2,048 tries (the kernel hashes each
# to a worker): such a trial tests nothing across workers, so it is made again from a new
# address, up to ATTEMPTS times.
ATTEMPTS = 4


def spread(daemon: Daemon, source: str, at_least: int) -> bool:
    """Whether the connections from source (at least this many, waited for) met several workers."""
    wait_for(lambda: len(served_by(daemon, source)) >= at_least, 10, what="the connect lines")
    return len(set(served_by(daemon, source))) > 1


def spread_clients(daemon: Daemon, first_source: str, count: int) -> tuple[str, list[Client]]:
    """count clients from one address, their connections spread over several workers: the
    address, then the clients.  The address is first_source or one of the next ATTEMPTS - 1."""
    base, _, last = first_source.rpartition(".")
    for attempt in range(ATTEMPTS):
        source = f"{base}.{int(last) + attempt}"
        clients = [Client(daemon.port, source) for _ in range(count)]
        if spread(daemon, source, count):
            return source, clients
        for c in clients:
            c.sock.close()
    pytest.fail(f"{ATTEMPTS} times every connection went to one worker: nothing was tested")


def refused(port: int, source: str) -> str:
    """The reply of a connection the server refuses before any session ("421 4.7.0 ...")."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode()


def smtp_workers(daemon: Daemon, workers: int) -> list[int]:
    pattern = re.compile(r"elemta\[(\d+)\]: NOQUEUE started ")
    wait_for(lambda: len(set(pattern.findall(daemon.log_text()))) >= workers, 15, what=f"{workers} workers")
    return sorted({int(pid) for pid in pattern.findall(daemon.log_text())})


@pytest.fixture(scope="module", params=[2, 4], ids=["2-workers", "4-workers"])
def caps(request, tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("caps"), CAPS.replace("@WORKERS@", str(request.param))).start()
    smtp_workers(daemon, request.param)
    daemon.workers = request.param
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture(scope="module", params=[2, 4], ids=["2-workers", "4-workers"])
def limited(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("limits")  # the daemon's directory: the spool's parent
    ca = trustme.CA()
    ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(base / "mx.pem"))
    PasswordFile(str(base / "passwd")).set("bob", PASSWORD)
    for n in range(4):
        PasswordFile(str(base / "passwd")).set(f"user{n}@example.org", PASSWORD)
    daemon = Daemon(base, LIMITS.replace("@WORKERS@", str(request.param))).start()
    smtp_workers(daemon, request.param)
    daemon.ca = ca
    yield daemon
    assert daemon.stop() == 0
    # Each test above may have met one worker only (a few connections); all of them together
    # certainly did not, or nothing here tested several workers.
    assert len(set(re.findall(r"elemta\[(\d+)\]: NOQUEUE connect ", daemon.log_text()))) > 1


# ---- connection caps ------------------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(3))
def test_the_per_address_cap_is_exact(caps, trial):
    source, clients = spread_clients(caps, f"127.0.1.{10 + ATTEMPTS * trial}", 12)
    try:
        assert all(c.greeting[0] == 220 for c in clients)
        assert refused(caps.port, source).startswith("421 4.7.0 "), "the 13th was let in"
        clients.pop().sock.close()  # one leaves: one more may come, and only one
        wait_for(lambda: not refused(caps.port, source).startswith("421"), 10, what="a slot freed")
    finally:
        for c in clients:
            c.sock.close()


@pytest.mark.parametrize("workers", [2, 4])
def test_the_total_cap_is_exact(tmp_path, workers):
    daemon = Daemon(tmp_path, CAPS.replace("@WORKERS@", str(workers))).start()
    try:
        smtp_workers(daemon, workers)
        sources = [f"127.0.2.{n}" for n in range(1, 31)]
        clients = [Client(daemon.port, source) for source in sources]  # 30 addresses, one each
        assert all(c.greeting[0] == 220 for c in clients)
        assert refused(daemon.port, "127.0.2.99").startswith("421 4.7.0 ")
        wait_for(lambda: sum(len(served_by(daemon, s)) for s in sources) == 30, 10, what="the connect lines")
        assert len({pid for source in sources for pid in served_by(daemon, source)}) > 1
        clients.pop().sock.close()
        wait_for(lambda: refused(daemon.port, "127.0.2.98").startswith("220"), 10, what="a slot back")
        for c in clients:
            c.sock.close()
    finally:
        assert daemon.stop() == 0


def test_a_killed_worker_is_restarted_and_the_caps_still_hold(caps):
    workers = smtp_workers(caps, caps.workers)
    source, clients = spread_clients(caps, "127.0.3.1", 12)  # every connect line written before the kill
    try:
        victim = served_by(caps, source)[0]
        lost = served_by(caps, source).count(victim)
        os.kill(victim, signal.SIGKILL)  # its sessions die with it: their slots come free
        wait_for(lambda: f"pid={victim} " in caps.log_text() and "worker_died" in caps.log_text(), 15,
                 what="the supervisor to see the worker die")
        wait_for(lambda: len(closed(clients)) == lost, 10, what="the dead worker's sessions to close")
        wait_for(lambda: len(smtp_workers(caps, len(workers))) > len(workers), 15, what="a new worker")
        # Exactly the lost slots come back, on whichever workers the kernel picks.
        more = [Client(caps.port, source) for _ in range(lost)]
        clients += more
        assert all(c.greeting[0] == 220 for c in more)
        assert refused(caps.port, source).startswith("421 4.7.0 ")
    finally:
        for c in clients:
            c.sock.close()


def closed(clients: list[Client]) -> list[Client]:
    """The clients whose server side has gone (nothing else makes them readable now)."""
    readable, _, _ = select.select([c.sock for c in clients], [], [], 0)
    return [c for c in clients if c.sock in readable]


# ---- [limits] ------------------------------------------------------------------------------------


def new_session(daemon: Daemon, source: str) -> Client:
    c = Client(daemon.ports["mx"], source)
    assert c.greeting[0] == 220 and c.cmd("EHLO c.example")[0] == 250
    return c


def test_connections_per_minute(limited):
    source = "127.0.4.1"
    for _ in range(6):
        with new_session(limited, source) as c:
            c.cmd("QUIT")
    assert refused(limited.ports["mx"], source).startswith("421 4.7.0 ")


def test_messages_per_hour_from_one_address(limited):
    source = "127.0.4.2"
    for n in range(4):  # a connection of its own for each: the kernel spreads them
        with new_session(limited, source) as c:
            assert c.cmd(f"MAIL FROM:<m{n}@example.org>")[0] == 250
    with new_session(limited, source) as c:
        assert c.cmd("MAIL FROM:<m9@example.org>")[:1] == (450,)


def test_recipients_per_hour_from_one_address(limited):
    source = "127.0.4.3"
    with new_session(limited, source) as c:
        assert c.cmd("MAIL FROM:<r0@example.org>")[0] == 250
        for n in range(3):
            assert c.cmd(f"RCPT TO:<u{n}@example.com>")[0] == 250
    with new_session(limited, source) as c:
        assert c.cmd("MAIL FROM:<r1@example.org>")[0] == 250
        for n in range(3, 5):
            assert c.cmd(f"RCPT TO:<u{n}@example.com>")[0] == 250
        code, text = c.cmd("RCPT TO:<u9@example.com>")
        assert code == 452 and "recipients per hour from your address" in text


def test_messages_per_hour_from_one_sender(limited):
    for n in range(3):  # three addresses, one sender
        with new_session(limited, f"127.0.5.{n + 1}") as c:
            assert c.cmd("MAIL FROM:<same@example.org>")[0] == 250
    with new_session(limited, "127.0.5.9") as c:
        code, text = c.cmd("MAIL FROM:<same@example.org>")
        assert code == 450 and "messages per hour from this sender" in text


def submission(daemon: Daemon, source: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.2", daemon.ports["submission"], timeout=10, source_address=(source, 0))
    context = ssl.create_default_context()
    daemon.ca.configure_trust(context)
    context.check_hostname = False
    smtp.starttls(context=context)
    smtp.ehlo("c.example")
    return smtp


def login(smtp: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    smtp.user, smtp.password = user, password
    try:
        return smtp.auth("PLAIN", smtp.auth_plain)
    except smtplib.SMTPAuthenticationError as exc:
        return exc.smtp_code, exc.smtp_error
    except smtplib.SMTPServerDisconnected:
        return 421, b"closed"


def test_messages_per_hour_for_one_login(limited):
    for n in range(3):  # three addresses, one login
        with submission(limited, f"127.0.6.{n + 1}") as smtp:
            assert login(smtp, "user0@example.org", PASSWORD)[0] == 235
            assert smtp.mail("user0@example.org")[0] == 250
    with submission(limited, "127.0.6.9") as smtp:
        assert login(smtp, "user0@example.org", PASSWORD)[0] == 235
        code, text = smtp.mail("user0@example.org")
        assert code == 450 and b"messages per hour for your login" in text


def test_recipients_per_hour_for_one_login(limited):
    for n in range(2):
        with submission(limited, f"127.0.7.{n + 1}") as smtp:
            assert login(smtp, "user1@example.org", PASSWORD)[0] == 235
            assert smtp.mail("user1@example.org")[0] == 250
            for r in range(2):
                assert smtp.rcpt(f"x{n}{r}@example.com")[0] == 250
    with submission(limited, "127.0.7.9") as smtp:
        assert login(smtp, "user1@example.org", PASSWORD)[0] == 235
        assert smtp.mail("user1@example.org")[0] == 250
        code, text = smtp.rcpt("x99@example.com")
        assert code == 452 and b"recipients per hour for your login" in text


def test_the_auth_lockout_counts_failures_in_every_worker(limited):
    source = "127.0.8.1"
    for _ in range(3):  # one failure per connection: a new connection per guess does not help
        with submission(limited, source) as smtp:
            assert login(smtp, "bob", "guess")[0] == 535
    with submission(limited, source) as smtp:
        assert login(smtp, "bob", PASSWORD)[0] == 421  # locked out, the right password or not


# ---- a listener a reload adds ----------------------------------------------------------------------


def test_a_port_0_listener_added_by_a_reload_gets_one_port_for_all_workers(tmp_path):
    daemon = Daemon(tmp_path, CAPS.replace("@WORKERS@", "4")).start()
    try:
        smtp_workers(daemon, 4)
        daemon.config_path.write_text(daemon.config_path.read_text().replace(
            '[server]', '[[listeners]]\naddress = "127.0.0.5:0"\nrole = "mx"\n\n[server]', 1))
        daemon.signal(signal.SIGHUP)
        pattern = re.compile(r"elemta\[(\d+)\]: NOQUEUE listening address=127\.0\.0\.5:\d+ role=mx port=(\d+)")
        wait_for(lambda: len(pattern.findall(daemon.log_text())) == 4, 15, what="four workers on the new listener")
        ports = {port for _, port in pattern.findall(daemon.log_text())}
        assert len(ports) == 1, f"the workers listen on different ports: {ports}"
        c = RawClient("127.0.0.5", int(ports.pop()))
        assert c.greeting[0] == 220
        c.sock.close()
    finally:
        assert daemon.stop() == 0


# ---- TLS session resumption -------------------------------------------------------------------------


def starttls_session(daemon: Daemon, source: str, context: ssl.SSLContext, session=None):
    """A STARTTLS session from source; (resumed?, the session to keep)."""
    c = Client(daemon.ports["mx"], source)
    assert c.cmd("EHLO c.example")[0] == 250 and c.cmd("STARTTLS")[0] == 220
    tls = context.wrap_socket(c.sock, server_hostname="mx.test.example", session=session)
    c.sock = tls
    assert c.cmd("EHLO c.example")[0] == 250  # the TLS 1.3 ticket comes with the first reply
    c.cmd("QUIT")
    resumed, kept = tls.session_reused, tls.session
    tls.close()
    return resumed, kept


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_tls_session_resumes_on_any_worker(limited, version):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    limited.ca.configure_trust(context)
    context.minimum_version = context.maximum_version = version
    net = 9 if version == ssl.TLSVersion.TLSv1_2 else 10
    first = f"127.0.{net}.1"
    resumed, session = starttls_session(limited, first, context)
    assert not resumed
    wait_for(lambda: served_by(limited, first), 10, what="the first connect line")
    issuer = served_by(limited, first)[0]
    # An address each (the log names the worker), in batches of 12, until one went to another
    # worker than the ticket's: which worker takes an address is the kernel's choice, and 12
    # once all went to the same one.
    sources: list[str] = []
    others: list[str] = []
    for batch in range(5):
        more = [f"127.0.{net}.{2 + 12 * batch + n}" for n in range(12)]
        assert all(starttls_session(limited, source, context, session)[0] for source in more)
        sources.extend(more)
        wait_for(lambda: all(served_by(limited, s) for s in sources), 10, what="the connect lines")
        others = [s for s in sources if served_by(limited, s)[0] != issuer]
        if others:
            break
    assert others, "every connection went to the worker that made the ticket: nothing was tested"
