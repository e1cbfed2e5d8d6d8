"""SmtpServers in the test's process: real listeners on loopback, a real queue in tmp_path."""

from __future__ import annotations

from elemta import config as cfg
from elemta.config import Config
from elemta.log import EventLog
from elemta.queue.store import Store
from elemta.smtp.server import SmtpServer

MX = [{"address": "127.0.0.1:0", "role": "mx"}]


class Servers:
    """start() as many as a test needs; close() stops them all (a fixture's teardown)."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[SmtpServer, Store]] = []

    def start(self, listeners=None, *, server=None, smtp=None, tls=None) -> tuple[SmtpServer, list[str], Config]:
        """A started server (hostname mx.test.example, example.com local), its log lines."""
        config = cfg.parse({
            "listeners": listeners or MX,
            "server": {"spool_dir": str(self.tmp_path), "hostname": "mx.test.example", **(server or {})},
            "smtp": {"local_domains": ["example.com"], **(smtp or {})},
            "queue": {"min_free_space": 0},
            **({"tls": tls} if tls else {}),
        })
        store = Store(config.queue_path)
        store.open()
        lines: list[str] = []
        smtp_server = SmtpServer(config, store, EventLog(sink=lines.append))
        smtp_server.start()
        self.started.append((smtp_server, store))
        return smtp_server, lines, config

    def close(self, grace: float) -> None:
        for smtp_server, store in self.started:
            smtp_server.stop(grace=grace)
            store.close()
