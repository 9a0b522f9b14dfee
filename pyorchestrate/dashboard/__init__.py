"""``pyorchestrate dashboard``: a web page of a running cluster, in a process of its own (it
queries the coordinator's control port and follows its event bus, so the coordinator stays lean).

Needs the ``dashboard`` extra: ``pip install 'pyorchestrate[dashboard]'`` (Starlette, uvicorn,
prometheus-client)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
from typing import Any

TOKEN_ENV = "PYORCHESTRATE_DASHBOARD_TOKEN"


def _listen_socket(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    # said as what to write (it said "invalid literal for int() with base 10", or ended in an
    # OverflowError traceback for a port past 65535)
    if not (port or "0").isdigit() or not 0 <= int(port or 0) <= 65535:
        raise ValueError(f"--listen {listen!r}: use HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:8265 "
                         "(port 0: any free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port or 0)))
        sock.listen(128)
    except OSError as exc:  # a host that is not this machine's, a port taken or privileged
        sock.close()
        raise ValueError(f"--listen {listen!r}: cannot listen there: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def serve(address: str, listen: str = "127.0.0.1:8265", *, token: str | None = None, keys: Any = None,
          key_name: str | None = None, interval: float = 1.0) -> None:
    """Run the dashboard until interrupted (SIGINT/SIGTERM).  Prints its URL (with the token)."""
    import uvicorn

    from .app import create_app
    from .feed import Feed

    token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(18)
    feed = Feed(address, keys=keys, key_name=key_name, interval=interval)
    sock = _listen_socket(listen)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _loopback(host):
        print(f"pyorchestrate dashboard: listening on {host}, beyond this host: anyone who reaches it needs the "
              "token; put it behind TLS (a reverse proxy) on an untrusted network", file=sys.stderr)
    feed.start()
    try:
        print(f"pyorchestrate dashboard for {address}: http://{shown}:{port}/?token={token}", flush=True)
        config = uvicorn.Config(create_app(feed, token), log_level="warning", timeout_graceful_shutdown=2,
                                lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        feed.stop()
        sock.close()
