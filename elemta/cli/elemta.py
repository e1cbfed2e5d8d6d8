"""`elemta`: the daemon's command line (see elemta(8))."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import socket
import sys

from elemta import __version__
from elemta import config as cfg
from elemta.errors import ConfigError

DEV_PORTS = (2525, 2526, 2527, 2528)
DEV_SPOOL = "dev-spool"
EX_CONFIG = 78  # sysexits.h: configuration error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="elemta",
        description="elemta mail transfer agent: receive mail over SMTP into a durable queue.",
    )
    parser.add_argument("--config", metavar="FILE", help=f"configuration file (default {cfg.DEFAULT_PATH})")
    parser.add_argument(
        "--dev", action="store_true",
        help="run from a checkout: spool ./dev-spool, first free port of 2525-2528 on 127.0.0.1, "
        "every recipient accepted, mail held in the queue unless delivery.relayhost is set",
    )
    parser.add_argument("--port", type=int, metavar="N", help="listen on port N only (0: any free port)")
    parser.add_argument("--no-auth-required", action="store_true", help="turn authentication requirements off")
    parser.add_argument("--check-config", action="store_true", help="check the configuration and exit")
    parser.add_argument("--version", action="version", version=f"elemta {__version__}")
    args = parser.parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error(f"--port: {args.port} is not a port (0 to 65535)")
    return args


def free_dev_port(host: str = "127.0.0.1") -> int:
    """The first of 2525-2528 that nothing listens on."""
    for port in DEV_PORTS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            return port
    raise ConfigError(f"--dev: ports {DEV_PORTS[0]}-{DEV_PORTS[-1]} are all in use (use --port N)")


def build_config(args: argparse.Namespace, dev_port: int | None = None) -> cfg.Config:
    """The file's config (or the defaults, in dev mode without --config) plus the flags."""
    if args.dev and not args.config:
        config = cfg.Config(source="(dev defaults)")
    else:
        config = cfg.load(args.config or cfg.DEFAULT_PATH)
    if args.dev:
        port = args.port if args.port is not None else (dev_port or DEV_PORTS[0])
        config = cfg.replace(
            config,
            server={"spool_dir": os.path.abspath(DEV_SPOOL)} if not args.config else {},
            smtp={"auth_required": False},
            delivery={"hold": config.delivery.hold or not config.delivery.relayhost},
        )
        config = _with_listener(config, cfg.Listener(f"127.0.0.1:{port}", "submission"))
        config = dataclasses.replace(config, dev=True)
    elif args.port is not None:
        first = config.listeners[0]
        host = first.host
        shown = f"[{host}]" if ":" in host else host
        config = _with_listener(config, cfg.Listener(f"{shown}:{args.port}", first.role))
    if args.no_auth_required:
        config = cfg.replace(config, smtp={"auth_required": False})
    return config


def _with_listener(config: cfg.Config, listener: cfg.Listener) -> cfg.Config:
    return dataclasses.replace(config, listeners=(listener,))


def report(exc: ConfigError) -> None:
    """Every problem on a line of its own, each with the program's name (as a compiler lists
    every error of a file): one line each keeps grep and the journal's view of them whole."""
    for problem in exc.problems or [str(exc)]:
        print(f"elemta: {problem}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dev_port = free_dev_port() if args.dev and args.port is None and not args.check_config else None
        config = build_config(args, dev_port)
    except ConfigError as exc:
        report(exc)
        return EX_CONFIG
    if args.check_config:
        from elemta import privileges
        from elemta.assemble import (
            check_startup,  # imported late: the plain start needs it later
        )

        try:
            privileges.target(config)  # as root: server.user and server.group must exist
            check_startup(config)
        except ConfigError as exc:
            report(exc)
            return EX_CONFIG
        print(f"elemta: configuration {config.source or cfg.DEFAULT_PATH} is valid")
        return 0
    if args.dev:
        hold = "held in the queue" if config.delivery.hold else f"relayed via {config.delivery.relayhost}"
        print(f"elemta: dev mode: spool {config.server.spool_dir}, outbound mail {hold}", flush=True)

    # Imported late: a bad command line or config file is reported without loading it all.
    from elemta.supervisor import main_loop

    return main_loop(lambda: build_config(args, dev_port))


if __name__ == "__main__":
    sys.exit(main())
