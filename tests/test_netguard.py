"""SSRF guard tests against a real HTTP server on 127.0.0.1 (real sockets, no mocks of httpx).

The server counts accepted TCP connections and records every request, and a spy on
``httpcore.AnyIOBackend.connect_tcp`` records every address the guard actually dialled, so
"refused" means "no connection was even attempted", not just "an error came back".

Real DNS for arbitrary names is not available here, so names that resolve to private or
loopback addresses use the policy's injectable ``resolver`` (the only stand-in); the odd
spellings of 127.0.0.1 (``2130706433``, ``0x7f000001``, ``127.1``) go through the real
``getaddrinfo``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpcore
import httpx
import pytest

from guideflow import netguard
from guideflow.errors import ImageTooLarge
from guideflow.netguard import (
    BlockedURL,
    DownloadFailed,
    NetPolicy,
    UnsupportedURLScheme,
    UploadFailed,
    WebhookFailed,
    blocked_reason,
    fetch_bytes,
    guarded_client,
    post_json,
    put_bytes,
    redact_url,
)

PAYLOAD = bytes(range(256)) * 8  # 2 KiB, every byte value
BIG = 300_000
LOOPBACK = NetPolicy(allow=("127.0.0.0/8",))


class _Server(ThreadingHTTPServer):
    """A test server that counts accepted connections and records requests."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [r["path"] for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    """Routes: /bytes, /echo-host, /redirect?to=, /loop, /slow, /big, /big-stream, /status/N."""

    server: _Server

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _record(self, body: bytes = b"") -> None:
        with self.server.lock:
            self.server.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body": body,
                }
            )

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._record()
        url = urlsplit(self.path)
        if url.path == "/bytes":
            self._send(200, PAYLOAD, {"Content-Type": "image/png"})
        elif url.path == "/echo-host":
            self._send(200, self.headers["Host"].encode())
        elif url.path == "/redirect":
            self._send(302, headers={"Location": parse_qs(url.query)["to"][0]})
        elif url.path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif url.path == "/slow":
            time.sleep(1.5)
            with contextlib.suppress(OSError):  # the client gave up long ago
                self._send(200, b"late")
        elif url.path == "/big":
            self._send(200, b"x" * BIG)
        elif url.path == "/big-stream":  # no Content-Length: only the streamed cap can stop it
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(BIG // 10_000):
                    self.wfile.write(b"y" * 10_000)
            except OSError:
                pass
        elif url.path.startswith("/status/"):
            self._send(int(url.path.rsplit("/", 1)[1]), b"nope")
        else:
            self._send(404, b"not found")

    def _receive(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._record(body)
        url = urlsplit(self.path)
        status = int(url.path.rsplit("/", 1)[1]) if url.path.startswith("/status/") else 200
        self._send(status, b"ok")

    do_PUT = _receive
    do_POST = _receive


def _start() -> tuple[_Server, threading.Thread]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv, thread = _start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture()
def dialled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (ip, port) the guard handed to the real socket backend."""
    calls: list[tuple[str, int]] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def spy(self: Any, host: str, port: int, *args: Any, **kw: Any) -> Any:
        calls.append((host, port))
        return await real(self, host, port, *args, **kw)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", spy)
    return calls


def _resolver(
    table: dict[str, list[str]], seen: list[str] | None = None
) -> Callable[..., list[str]]:
    """A stand-in DNS: ``table`` maps names to addresses; unknown names fail like NXDOMAIN.

    Like real DNS, names compare case-insensitively and a trailing root dot does not matter.
    """

    def resolve(host: str, port: int) -> list[str]:
        if seen is not None:
            seen.append(host)
        name = host.lower().rstrip(".")
        if name not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[name]

    return resolve


async def _fetch(policy: NetPolicy, url: str, *, max_bytes: int = 1 << 20, **kw: Any) -> bytes:
    async with guarded_client(policy, **kw) as client:
        return await fetch_bytes(client, url, max_bytes=max_bytes, parameter="inputImage")


# --------------------------------------------------------------------------------------------
# Refusals without an allow-list


BLOCKED = [
    ("http://127.0.0.1:{port}/bytes", "loopback"),
    ("http://localhost:{port}/bytes", "loopback"),
    ("http://LOCALHOST.:{port}/bytes", "loopback"),
    ("http://img.localhost:{port}/bytes", "loopback"),
    ("http://[::1]:{port}/", "loopback"),
    ("http://2130706433:{port}/", "loopback"),
    ("http://0x7f000001:{port}/", "loopback"),
    ("http://127.1:{port}/", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/", "loopback"),
    ("http://0.0.0.0:{port}/", "unspecified"),
    ("http://0:{port}/", "unspecified"),
    ("http://10.0.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[64:ff9b::a00:1]/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[::ffff:169.254.169.254]/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://100.100.100.200/", "cloud metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "broadcast"),
]


@pytest.mark.parametrize(("template", "reason"), BLOCKED)
async def test_refused_before_any_connection(
    server: _Server, dialled: list[tuple[str, int]], template: str, reason: str
) -> None:
    before = server.connections
    with pytest.raises(BlockedURL) as info:
        await _fetch(NetPolicy(), template.format(port=server.port))
    err = info.value
    assert err.code == "forbiddenURL"
    assert err.http_status == 400
    assert err.parameter == "inputImage"
    assert f"{reason} address" in err.message
    assert netguard.ENV_ALLOW in err.message
    assert dialled == []
    assert server.connections == before


def test_mapped_address_message_names_the_ipv4() -> None:
    err = netguard._refusal("::ffff:10.0.0.1", netguard._parse_ip("::ffff:10.0.0.1"), True)
    assert "(IPv4 10.0.0.1) is a private address" in err.message


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    ip = netguard._parse_ip(address)
    assert ip is not None
    assert blocked_reason(ip) is None
    assert NetPolicy().permits_address(ip)


# --------------------------------------------------------------------------------------------
# Names resolved by the (injected) resolver


async def test_name_resolving_to_private_is_refused(dialled: list[tuple[str, int]]) -> None:
    seen: list[str] = []
    policy = NetPolicy(resolver=_resolver({"images.example": ["10.0.0.5"]}, seen))
    with pytest.raises(BlockedURL) as info:
        await _fetch(policy, "http://images.example/cat.png?sig=SECRET")
    assert seen == ["images.example"]
    assert "host 'images.example' resolves to 10.0.0.5, a private address" in info.value.message
    assert "SECRET" not in str(info.value)
    assert dialled == []


async def test_name_resolving_to_allowed_loopback_connects_to_the_checked_ip(
    server: _Server, dialled: list[tuple[str, int]]
) -> None:
    policy = NetPolicy(
        allow=("127.0.0.0/8",), resolver=_resolver({"images.example": ["127.0.0.1"]})
    )
    body = await _fetch(policy, f"http://images.example:{server.port}/echo-host")
    # The socket went to the checked IP, while the Host header kept the URL's name.
    assert body == f"images.example:{server.port}".encode()
    assert dialled == [("127.0.0.1", server.port)]


async def test_refused_addresses_in_a_mixed_answer_are_skipped(
    server: _Server, dialled: list[tuple[str, int]]
) -> None:
    resolver = _resolver({"mixed.example": ["10.0.0.5", "169.254.169.254", "127.0.0.1"]})
    policy = NetPolicy(allow=("127.0.0.0/8",), resolver=resolver)
    body = await _fetch(policy, f"http://mixed.example:{server.port}/bytes")
    assert body == PAYLOAD
    assert dialled == [("127.0.0.1", server.port)]


async def test_allowed_host_name_permits_only_that_name(server: _Server) -> None:
    table = {"images.internal": ["127.0.0.1"], "other.internal": ["127.0.0.1"]}
    policy = NetPolicy(allow=("images.internal",), resolver=_resolver(table))
    assert await _fetch(policy, f"http://IMAGES.internal.:{server.port}/bytes") == PAYLOAD
    with pytest.raises(BlockedURL, match=r"'other\.internal' resolves to 127\.0\.0\.1, a loopback"):
        await _fetch(policy, f"http://other.internal:{server.port}/bytes")


async def test_unresolvable_name_is_a_retryable_download_failure() -> None:
    policy = NetPolicy(resolver=_resolver({}))
    with pytest.raises(DownloadFailed) as info:
        await _fetch(policy, "http://nowhere.example/x.png")
    assert info.value.code == "imageDownloadFailed"
    assert info.value.retryable
    assert "cannot resolve host 'nowhere.example'" in info.value.message


# --------------------------------------------------------------------------------------------
# With the loopback allow-list: fetches, redirects, limits, failures


async def test_allowed_fetch_returns_the_exact_bytes(server: _Server) -> None:
    assert await _fetch(LOOPBACK, server.url("/bytes")) == PAYLOAD
    assert await _fetch(NetPolicy(allow=("127.0.0.1",)), server.url("/bytes")) == PAYLOAD


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://10.0.0.1/x.png?X-Amz-Signature=SECRET", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata"),
        ("http://[::ffff:a9fe:a9fe]/", "(IPv4 169.254.169.254) is a cloud metadata"),
    ],
)
async def test_redirect_to_refused_address_is_blocked_at_the_hop(
    server: _Server, dialled: list[tuple[str, int]], target: str, reason: str
) -> None:
    with pytest.raises(BlockedURL) as info:
        await _fetch(LOOPBACK, server.url(f"/redirect?to={target}"))
    assert reason in info.value.message
    assert info.value.parameter == "inputImage"
    assert "SECRET" not in str(info.value)
    assert dialled == [("127.0.0.1", server.port)]  # only the allowed first hop was dialled


async def test_redirects_to_allowed_urls_are_followed(server: _Server) -> None:
    absolute = server.url("/redirect?to=" + server.url("/bytes"))
    assert await _fetch(LOOPBACK, absolute) == PAYLOAD
    assert await _fetch(LOOPBACK, server.url("/redirect?to=/bytes")) == PAYLOAD


async def test_redirect_to_another_scheme_is_refused(server: _Server) -> None:
    with pytest.raises(UnsupportedURLScheme) as info:
        await _fetch(LOOPBACK, server.url("/redirect?to=ftp://example.com/x.png"))
    assert info.value.code == "unsupportedURLScheme"
    assert info.value.parameter == "inputImage"


async def test_too_many_redirects(server: _Server) -> None:
    server.requests.clear()
    policy = NetPolicy(allow=("127.0.0.0/8",), max_redirects=3)
    with pytest.raises(DownloadFailed, match="more than 3 redirects") as info:
        await _fetch(policy, server.url("/loop"))
    assert not info.value.retryable
    assert server.paths().count("/loop") == 4  # the first request and three hops


async def test_redirects_followed_by_httpx_itself_are_still_checked(server: _Server) -> None:
    """Even a caller that asks httpx to follow redirects cannot get past the transport."""
    async with guarded_client(LOOPBACK) as client:
        with pytest.raises(BlockedURL, match=r"10\.0\.0\.1 is a private address"):
            await client.get(server.url("/redirect?to=http://10.0.0.1/"), follow_redirects=True)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x.png", "file:///etc/passwd", "gopher://example.com/1"]
)
async def test_unsupported_schemes(url: str, dialled: list[tuple[str, int]]) -> None:
    with pytest.raises(UnsupportedURLScheme) as info:
        await _fetch(LOOPBACK, url)
    assert info.value.code == "unsupportedURLScheme"
    assert info.value.parameter == "inputImage"
    assert "only http and https" in info.value.message
    assert dialled == []


async def test_urls_with_credentials_are_refused(
    server: _Server, dialled: list[tuple[str, int]]
) -> None:
    url = f"http://user:hunter2@127.0.0.1:{server.port}/bytes"
    with pytest.raises(BlockedURL, match="credentials") as info:
        await _fetch(LOOPBACK, url)
    assert "hunter2" not in str(info.value)
    assert dialled == []


@pytest.mark.parametrize("path", ["/big", "/big-stream"])
async def test_body_over_the_cap_is_too_large(server: _Server, path: str) -> None:
    with pytest.raises(ImageTooLarge) as info:
        await _fetch(LOOPBACK, server.url(path), max_bytes=100_000)
    assert info.value.code == "imageTooLarge"
    assert info.value.parameter == "inputImage"
    assert await _fetch(LOOPBACK, server.url(path), max_bytes=BIG) == (
        (b"x" if path == "/big" else b"y") * BIG
    )


async def test_cap_boundary(server: _Server) -> None:
    assert await _fetch(LOOPBACK, server.url("/bytes"), max_bytes=len(PAYLOAD)) == PAYLOAD
    with pytest.raises(ImageTooLarge):
        await _fetch(LOOPBACK, server.url("/bytes"), max_bytes=len(PAYLOAD) - 1)


@pytest.mark.parametrize(
    ("path", "status", "retryable"),
    [
        ("/missing", 404, False),
        ("/status/403", 403, False),
        ("/status/500", 500, True),
        ("/status/503", 503, True),
        ("/status/429", 429, True),
    ],
)
async def test_http_errors(server: _Server, path: str, status: int, retryable: bool) -> None:
    with pytest.raises(DownloadFailed) as info:
        await _fetch(LOOPBACK, server.url(path + "?token=SECRET"))
    err = info.value
    assert err.code == "imageDownloadFailed"
    assert err.status == status
    assert err.retryable is retryable
    assert f"answered HTTP {status}" in err.message
    assert "SECRET" not in err.message


async def test_timeout_is_retryable(server: _Server) -> None:
    with pytest.raises(DownloadFailed, match="timed out") as info:
        await _fetch(LOOPBACK, server.url("/slow"), timeout=0.2)
    assert info.value.retryable


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadFailed) as info:
        await _fetch(LOOPBACK, f"http://127.0.0.1:{port}/x")
    assert info.value.retryable
    assert "ConnectError" in info.value.message


# --------------------------------------------------------------------------------------------
# Uploads and webhooks


async def test_put_bytes_sends_exact_bytes_and_content_type(server: _Server) -> None:
    data = bytes(range(256)) * 3
    async with guarded_client(LOOPBACK) as client:
        status = await put_bytes(
            client, server.url("/upload/guide.png?X-Amz-Signature=s"), data, "image/png"
        )
    assert status == 200
    put = [r for r in server.requests if r["method"] == "PUT"][-1]
    assert put["path"] == "/upload/guide.png?X-Amz-Signature=s"
    assert put["body"] == data
    assert put["headers"]["Content-Type"] == "image/png"


async def test_post_json_sends_json(server: _Server) -> None:
    payload = {
        "data": [{"taskType": "imageControlNetPreProcess", "taskUUID": "u1", "cost": 0.0006}]
    }
    async with guarded_client(LOOPBACK) as client:
        assert await post_json(client, server.url("/hook"), payload) == 200
    post = [r for r in server.requests if r["method"] == "POST"][-1]
    assert post["path"] == "/hook"
    assert post["headers"]["Content-Type"] == "application/json"
    assert json.loads(post["body"]) == payload


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (429, True), (403, False)])
async def test_upload_and_webhook_failures(server: _Server, status: int, retryable: bool) -> None:
    async with guarded_client(LOOPBACK) as client:
        with pytest.raises(UploadFailed) as up:
            await put_bytes(client, server.url(f"/status/{status}"), b"x", "image/png")
        with pytest.raises(WebhookFailed) as hook:
            await post_json(client, server.url(f"/status/{status}"), {"a": 1})
    assert (up.value.code, up.value.parameter) == ("uploadFailed", "uploadEndpoint")
    assert (hook.value.code, hook.value.parameter) == ("webhookFailed", "webhookURL")
    assert up.value.retryable is retryable
    assert hook.value.retryable is retryable


async def test_upload_and_webhook_refuse_private_targets(dialled: list[tuple[str, int]]) -> None:
    async with guarded_client(NetPolicy()) as client:
        with pytest.raises(BlockedURL) as up:
            await put_bytes(client, "http://10.0.0.1/bucket/key.png", b"x", "image/png")
        with pytest.raises(BlockedURL) as hook:
            await post_json(client, "http://169.254.169.254/hook", {"a": 1})
    assert up.value.parameter == "uploadEndpoint"
    assert "private address" in up.value.message
    assert hook.value.parameter == "webhookURL"
    assert "cloud metadata address" in hook.value.message
    assert dialled == []


# --------------------------------------------------------------------------------------------
# Helpers, configuration and bypass attempts


def test_redact_url() -> None:
    url = "https://AKIA:secret@bucket.s3.amazonaws.com:8443/k/guide.png?X-Amz-Signature=abc#frag"
    assert redact_url(url) == "https://bucket.s3.amazonaws.com:8443/k/guide.png"
    assert redact_url("http://example.com/a.png") == "http://example.com/a.png"
    assert len(redact_url("data:image/png;base64," + "A" * 10_000)) == 200


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = NetPolicy.from_env({netguard.ENV_ALLOW: " 127.0.0.0/8, MinIO.internal ,10.1.2.3,"})
    assert policy.allow == ("127.0.0.0/8", "MinIO.internal", "10.1.2.3")
    ip = netguard._parse_ip
    assert policy.permits_address(ip("127.0.0.9"))
    assert policy.permits_address(ip("::ffff:127.0.0.9"))
    assert policy.permits_address(ip("10.1.2.3"))
    assert not policy.permits_address(ip("10.1.2.4"))
    assert not policy.permits_address(ip("::1"))
    assert policy.permits_host("minio.internal.")
    assert not policy.permits_host("other.internal")

    monkeypatch.setenv(netguard.ENV_ALLOW, "192.168.0.0/16")
    assert NetPolicy.from_env().allow == ("192.168.0.0/16",)
    monkeypatch.delenv(netguard.ENV_ALLOW)
    assert NetPolicy.from_env().allow == ()
    with pytest.raises(ValueError, match="neither a CIDR nor a host name"):
        NetPolicy.from_env({netguard.ENV_ALLOW: "http://10.0.0.1/"})


async def test_proxy_environment_cannot_bypass_the_guard(
    server: _Server, monkeypatch: pytest.MonkeyPatch, dialled: list[tuple[str, int]]
) -> None:
    proxy, thread = _start()
    try:
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        # Through an env proxy, httpx would only dial the (allowed) proxy and never see 10.0.0.1.
        with pytest.raises(BlockedURL):
            await _fetch(LOOPBACK, "http://10.0.0.1/x.png")
        assert await _fetch(LOOPBACK, server.url("/bytes")) == PAYLOAD
        assert proxy.connections == 0
        assert dialled == [("127.0.0.1", server.port)]
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    "kw",
    [
        {"proxy": "http://127.0.0.1:1"},
        {"trust_env": True},
        {"follow_redirects": True},
        {"transport": httpx.AsyncHTTPTransport()},
        {"mounts": {}},
    ],
)
def test_client_options_that_would_bypass_are_rejected(kw: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="does not accept"):
        guarded_client(LOOPBACK, **kw)


async def test_plain_clients_are_rejected(server: _Server) -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(TypeError, match="guarded_client"):
            await fetch_bytes(
                client, server.url("/bytes"), max_bytes=10_000, parameter="inputImage"
            )
