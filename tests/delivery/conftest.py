"""Fixtures the delivery tests share: a test CA (trustme) and its certificate as a file, a
server TLS context from it, aiosmtpd servers (tests/mx.py) and scripted peers on 127.0.0.1."""

import socketserver
import ssl
import threading
import warnings

import pytest
import trustme

from tests.mx import Mx


@pytest.fixture(scope="session")
def ca():
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def server_tls(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(context)
    return context


@pytest.fixture
def aiosmtpd():
    """Start aiosmtpd servers: aiosmtpd(handler, lmtp=False, **SMTP kwargs) -> controller."""
    controllers = []

    def start(handler, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # aiosmtpd warns about AUTH without TLS
            controller = Mx(handler, **kwargs)
            controller.start()
        controllers.append(controller)
        return controller

    yield start
    for controller in controllers:
        controller.stop()


# -- scripted servers ----------------------------------------------------------------------


class Peer(socketserver.StreamRequestHandler):
    timeout = 10  # a client that never sends what the script waits for fails the test

    def handle(self):
        with self.server.lock:
            self.server.connections += 1
        try:
            self.server.script(self)
        except (OSError, EOFError, AssertionError) as exc:  # checked by the tests
            self.server.errors.append(exc)

    def line(self) -> str:
        raw = self.rfile.readline(4096)
        if not raw:
            raise EOFError("client closed")
        text = raw.decode("utf-8").removesuffix("\r\n")
        self.server.received.append(text)
        return text

    def send(self, *lines: str) -> None:
        self.wfile.write("".join(f"{line}\r\n" for line in lines).encode())

    def data(self) -> bytes:
        """The raw (still dot-stuffed) message text up to and without the final dot."""
        chunks = []
        while (raw := self.rfile.readline(4096)) != b".\r\n":
            if not raw:
                raise EOFError("client closed in DATA")
            chunks.append(raw)
        self.server.messages.append(b"".join(chunks))
        return b"".join(chunks)


class Scripted(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), Peer)
        self.script = script
        self.lock = threading.Lock()
        self.connections = 0
        self.received: list[str] = []
        self.messages: list[bytes] = []
        self.errors: list[Exception] = []
        self.release = threading.Event()  # ends scripts that wait for the test to finish

    @property
    def port(self) -> int:
        return self.server_address[1]


@pytest.fixture
def scripted():
    servers = []

    def start(script) -> Scripted:
        server = Scripted(script)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()
