"""Run the real guideflow server (uvicorn) on loopback in a background thread.

Shared by the server and client tests::

    with run_server(ServerConfig(no_auth=True)) as base_url:
        httpx.post(f"{base_url}/v1", json=[{"taskType": "ping", "ping": True}])

or, in a test, the ``server_factory`` fixture (``base_url = server_factory(config)``),
or ``live_server_url`` for a default no-auth server allowing loopback URLs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import uvicorn

from engine.server import ServerConfig, create_app
from guideflow.netguard import NetPolicy

LOOPBACK_POLICY = NetPolicy(allow=("127.0.0.0/8",))


def test_config(**overrides: Any) -> ServerConfig:
    """A no-auth config for tests: 2 workers, loopback URLs allowed, fast webhook retries."""
    base: dict[str, Any] = {
        "no_auth": True,
        "workers": 2,
        "net_policy": LOOPBACK_POLICY,
        "webhook_backoff": 0.01,
        "fetch_timeout": 10.0,
    }
    base.update(overrides)
    return ServerConfig(**base)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test despite its name


@contextmanager
def run_server(config: ServerConfig | None = None, *, app: Any = None) -> Iterator[str]:
    """Serve ``create_app(config)`` (or ``app``) on 127.0.0.1:<free port>; yield its base URL.

    The socket is bound before the thread starts, so the port is known and no
    other process can take it; the server is stopped (lifespan shutdown run) on exit.
    """
    app = app if app is not None else create_app(config or test_config())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", log_level="warning")
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture()
def server_factory() -> Iterator[Callable[..., str]]:
    """``server_factory(config=None) -> base_url``; every server is stopped after the test."""
    with ExitStack() as stack:

        def start(config: ServerConfig | None = None, **kw: Any) -> str:
            return stack.enter_context(run_server(config, **kw))

        yield start


@pytest.fixture()
def live_server_url(server_factory: Callable[..., str]) -> str:
    """The base URL of a default test server (no auth, loopback URLs allowed)."""
    return server_factory()


@dataclass
class Received:
    """One request seen by a :class:`Receiver`."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real HTTP server on 127.0.0.1 for webhooks, upload endpoints and input-image URLs.

    ``statuses`` is consumed one status per POST/PUT (then ``default_status``);
    GET serves ``files[path]`` (query ignored). Every request is recorded in ``requests``;
    :meth:`wait_for` blocks until ``n`` POST/PUT requests arrived.
    """

    def __init__(self, statuses: list[int] | None = None, default_status: int = 200) -> None:
        self.statuses = list(statuses or [])
        self.default_status = default_status
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[Received] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _record(self, body: bytes) -> None:
                with receiver._cond:
                    receiver.requests.append(
                        Received(self.command, self.path, dict(self.headers.items()), body)
                    )
                    receiver._cond.notify_all()

            def do_GET(self) -> None:
                self._record(b"")
                found = receiver.files.get(self.path.partition("?")[0])
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, ctype = found
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _answer(self) -> None:
                body = self._body()
                with receiver._cond:
                    status = (
                        receiver.statuses.pop(0) if receiver.statuses else receiver.default_status
                    )
                self._record(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = _answer
            do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def writes(self) -> list[Received]:
        with self._cond:
            return [r for r in self.requests if r.method in ("POST", "PUT")]

    def wait_for(self, n: int, timeout: float = 30.0) -> list[Received]:
        """The first ``n`` POST/PUT requests, waiting for them to arrive."""
        with self._cond:
            self._cond.wait_for(
                lambda: sum(r.method in ("POST", "PUT") for r in self.requests) >= n, timeout
            )
        got = self.writes()
        if len(got) < n:
            raise AssertionError(f"expected {n} POST/PUT requests, got {len(got)}")
        return got[:n]


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    """A :class:`Receiver` answering 200 to everything."""
    with Receiver() as r:
        yield r
