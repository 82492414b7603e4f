"""Running the playground: uvicorn on a local address, in the foreground (`serve`) or on a background
thread (`running`, for tests, benchmarks and screenshots)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from steerlab.playground.app import LOCAL_HOSTS, create_app
from steerlab.playground.core import Playground


def is_local(host: str) -> bool:
    """Whether `host` is reachable from this machine only (a loopback address or 'localhost')."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> list[str]:
    """Host headers accepted: this machine's names, or any when the server listens beyond it."""
    return LOCAL_HOSTS if is_local(host) else ["*"]


def url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _server(playground: Playground, host: str, port: int):
    import uvicorn

    app = create_app(playground, allowed_hosts(host))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    return uvicorn.Server(config)


def serve(playground: Playground, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted (Ctrl-C)."""
    _server(playground, host, port).run()


@contextmanager
def running(playground: Playground, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Serve on a background thread; yields the page's URL and stops the server on exit."""
    port = port or free_port(host)
    server = _server(playground, host, port)
    thread = threading.Thread(target=server.run, name="steerlab-playground-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the playground server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield url(host, port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
