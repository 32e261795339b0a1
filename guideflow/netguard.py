"""SSRF guard for every URL the server fetches or calls (input images, upload endpoints, webhooks).

A Runware-compatible server downloads ``inputImage`` URLs, PUTs results to ``uploadEndpoint``
and POSTs to ``webhookURL``: all three are chosen by the caller, so without a guard anyone
could make the server reach its own loopback, the private network or a cloud metadata service.

The guard lives in the *connection layer*, so it cannot be bypassed by redirects, odd host
spellings or DNS tricks:

* :class:`GuardedBackend` is an httpcore network backend. Its ``connect_tcp`` resolves the host
  once (the policy's resolver, run in a worker thread), checks **every** resolved address and
  connects to a checked IP itself, so there is no window between the check and the connection
  (no DNS rebinding). Addresses that are refused are skipped; when none is left the request
  fails with :class:`BlockedURL`. TLS still verifies the certificate against the URL's host,
  because httpcore passes ``server_hostname`` from the request origin, not from the socket.
* :class:`GuardedTransport` is httpx's own transport with that backend in its pool; it also
  refuses schemes outside ``policy.allowed_schemes`` and URLs carrying credentials.
* :func:`guarded_client` builds the :class:`httpx.AsyncClient` with ``trust_env=False`` (so
  ``HTTP_PROXY``/``ALL_PROXY``/``.netrc`` cannot route around the guard) and
  ``follow_redirects=False``; :func:`fetch_bytes` follows redirects itself, each hop going
  through the same transport, so the checks repeat on every hop.

Refused addresses (also in their IPv4-mapped, NAT64 and 6to4 IPv6 forms): loopback, private
(RFC 1918, ``fc00::/7``, ``fec0::/10``), link-local, cloud metadata (``169.254.169.254``,
``fd00:ec2::254``, ``100.100.100.200``), carrier-grade NAT ``100.64.0.0/10``, ``0.0.0.0/8``,
multicast, reserved, broadcast, unspecified and every other non-global special-purpose range.
``localhost`` and ``*.localhost`` are loopback by name (RFC 6761) and never sent to DNS.
Spellings such as ``127.1``, ``0x7f000001`` or ``2130706433`` reach ``getaddrinfo``, which
turns them into ``127.0.0.1``, and are then refused like any other loopback address.

An operator permits such addresses explicitly with ``GUIDEFLOW_NET_ALLOW`` (comma-separated
CIDRs such as ``127.0.0.0/8`` or exact host names such as ``minio.internal``; a permitted host
name may resolve to any address). Tests against a server on 127.0.0.1 use that allow-list.

Decision on credentials: URLs with userinfo (``user:pass@host``) are **refused**
(``forbiddenURL``), not stripped: stripping would silently change what the caller asked for,
and credentials belong in headers or presigned query strings, not in logged URLs.

Error codes (Runware style; each is a :class:`~guideflow.errors.GuideflowError`):

* :class:`BlockedURL`, ``forbiddenURL`` (400): a refused address, or credentials in the URL.
* :class:`UnsupportedURLScheme`, ``unsupportedURLScheme`` (400): not http/https (ftp, file...).
* :class:`DownloadFailed`, ``imageDownloadFailed``: the GET answered 4xx/5xx (``.status``),
  a network error or timeout, or more than ``max_redirects`` redirects.
* :class:`UploadFailed`, ``uploadFailed``: the PUT to ``uploadEndpoint`` failed (same rules).
* :class:`WebhookFailed`, ``webhookFailed``: the POST to ``webhookURL`` failed (same rules).
* ``ImageTooLarge``, ``imageTooLarge`` (400): the body is over ``max_bytes``.

Only remote 5xx/429, network errors and timeouts are retryable; those answer HTTP 502, the
others 400. Messages and logs never contain query strings (presigned signatures) or
credentials: every URL goes through :func:`redact_url`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpcore
import httpx

from guideflow.errors import GuideflowError, ImageTooLarge, InvalidParameter

__all__ = [
    "ENV_ALLOW",
    "BlockedURL",
    "DownloadFailed",
    "GuardedBackend",
    "GuardedClient",
    "GuardedTransport",
    "NetPolicy",
    "RefusedURL",
    "UnsupportedURLScheme",
    "UploadFailed",
    "WebhookFailed",
    "blocked_reason",
    "fetch_bytes",
    "guarded_client",
    "post_json",
    "put_bytes",
    "redact_url",
]

log = logging.getLogger(__name__)

ENV_ALLOW = "GUIDEFLOW_NET_ALLOW"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


# --------------------------------------------------------------------------------------------
# Errors


class RefusedURL(GuideflowError):
    """Base of the guard's refusals; the caller names the offending parameter afterwards.

    The refusal is raised deep in the connection layer, which does not know whether the URL
    came from ``inputImage``, ``uploadEndpoint`` or ``webhookURL``.
    """

    http_status = 400

    def with_parameter(self, name: str) -> Self:
        """Set the protocol parameter this URL came from and return the same error."""
        self.parameter = name
        return self


class BlockedURL(RefusedURL):
    """The URL points at an address the policy refuses, or carries credentials."""

    code = "forbiddenURL"


class UnsupportedURLScheme(RefusedURL):
    """The URL's scheme is not one we fetch (only http and https by default)."""

    code = "unsupportedURLScheme"


class _RemoteFailure(GuideflowError):
    """A request that was allowed but did not succeed; ``status`` is the remote's, if any."""

    http_status = 400

    def __init__(self, message: str, *, status: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status = status


class DownloadFailed(_RemoteFailure):
    """Fetching an input URL failed (HTTP error, network error, timeout, redirect loop)."""

    code = "imageDownloadFailed"


class UploadFailed(_RemoteFailure):
    """The PUT to ``uploadEndpoint`` failed."""

    code = "uploadFailed"


class WebhookFailed(_RemoteFailure):
    """The POST to ``webhookURL`` failed."""

    code = "webhookFailed"


# --------------------------------------------------------------------------------------------
# Address classification


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Checked in order, so the most specific reason wins (metadata before link-local / CGNAT).
_REFUSED: tuple[tuple[tuple[IPNetwork, ...], str], ...] = (
    (_nets("169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32"), "cloud metadata"),
    (_nets("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (_nets("127.0.0.0/8", "::1/128"), "loopback"),
    (_nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10"), "private"),
    (_nets("169.254.0.0/16", "fe80::/10"), "link-local"),
    (_nets("100.64.0.0/10"), "carrier-grade NAT"),
    (_nets("224.0.0.0/4", "ff00::/8"), "multicast"),
    (_nets("255.255.255.255/32"), "broadcast"),
    (_nets("240.0.0.0/4"), "reserved"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, NAT64, 6to4), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted (e.g. ``"private"``), or ``None`` for a public address."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        return blocked_reason(inner)
    if ip.is_unspecified:
        return "unspecified"
    for networks, reason in _REFUSED:
        if any(ip in net for net in networks):
            return reason
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "special-purpose (non-global)"
    return None


def _parse_ip(text: str) -> IPAddress | None:
    """An IP literal (IPv6 brackets tolerated), or ``None`` for a host name."""
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _normal_host(host: str) -> str:
    """Host names compare case-insensitively and without the root dot (``LOCALHOST.``)."""
    return host.strip().lower().rstrip(".")


def _default_resolver(host: str, port: int) -> list[str]:
    """All addresses ``getaddrinfo`` gives for ``host``, in its preference order, deduplicated."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# --------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True)
class NetPolicy:
    """What the guard permits.

    ``allow``: CIDRs (``"127.0.0.0/8"``, a bare IP means a single address) or exact host names
    that are permitted even though they are private. ``resolver(host, port) -> [ip, ...]`` is
    injectable for tests; the default is :func:`socket.getaddrinfo`.
    """

    allow: tuple[str, ...] = ()
    allowed_schemes: tuple[str, ...] = ("http", "https")
    max_redirects: int = 5
    resolver: Resolver | None = None
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in self.allow:
            text = entry.strip()
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = _normal_host(text)
            if not name or any(c in name for c in "/:@ "):
                raise ValueError(f"{ENV_ALLOW}: {entry!r} is neither a CIDR nor a host name")
            hosts.add(name)
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "allowed_schemes", tuple(s.lower() for s in self.allowed_schemes))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_hosts", frozenset(hosts))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> NetPolicy:
        """The policy configured by ``GUIDEFLOW_NET_ALLOW`` (comma-separated; empty = none)."""
        env = os.environ if environ is None else environ
        allow = tuple(p.strip() for p in env.get(ENV_ALLOW, "").split(",") if p.strip())
        return cls(allow=allow, **overrides)

    def permits_host(self, host: str) -> bool:
        """Whether ``host`` is an explicitly allowed host name (any address it resolves to)."""
        return _normal_host(host) in self._hosts

    def permits_address(self, ip: IPAddress) -> bool:
        """Whether contacting ``ip`` is fine: a public address, or inside an allowed CIDR."""
        inner = _embedded_ipv4(ip)
        for candidate in (ip, inner):
            if candidate is not None and any(
                candidate.version == n.version and candidate in n for n in self._networks
            ):
                return True
        return blocked_reason(ip) is None

    def check_url(self, url: str | httpx.URL) -> httpx.URL:
        """Parse ``url`` and refuse bad schemes, credentials and missing hosts (before any I/O)."""
        try:
            parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidParameter(f"not a valid URL: {redact_url(str(url))}") from exc
        scheme = parsed.scheme.lower()
        if scheme not in self.allowed_schemes:
            allowed = " and ".join(self.allowed_schemes)
            raise UnsupportedURLScheme(
                f"{redact_url(str(parsed))}: only {allowed} URLs can be fetched, not {scheme!r}"
            )
        if parsed.userinfo:
            raise BlockedURL(
                f"{redact_url(str(parsed))}: URLs with credentials (user:pass@) are refused; "
                "use a presigned URL instead"
            )
        if not parsed.host:
            raise InvalidParameter(f"not a valid URL (no host): {redact_url(str(parsed))}")
        return parsed


def _refusal(host: str, ip: IPAddress, literal: bool) -> BlockedURL:
    """``"host 'x' resolves to 10.0.0.5, a private address; allow it with ..."``."""
    inner = _embedded_ipv4(ip)
    shown = f"{ip} (IPv4 {inner})" if inner is not None else str(ip)
    reason = blocked_reason(ip) or "refused"
    article = "an" if reason[0] in "aeiou" else "a"
    what = f"{shown} is" if literal else f"host {host!r} resolves to {shown},"
    return BlockedURL(f"{what} {article} {reason} address; allow it with {ENV_ALLOW}")


# --------------------------------------------------------------------------------------------
# Connection layer


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore backend that resolves, checks and connects to the checked IP itself."""

    def __init__(
        self, policy: NetPolicy, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self.policy = policy
        self.inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def _resolve(self, host: str, port: int, limit: float | None) -> list[IPAddress]:
        """Resolve in a worker thread, bounded by the connect timeout."""
        name = _normal_host(host)
        if name == "localhost" or name.endswith(".localhost"):
            return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
        resolver = self.policy.resolver or _default_resolver
        try:
            with anyio.fail_after(limit) if limit else nullcontext():
                answers = await anyio.to_thread.run_sync(
                    resolver, host, port, abandon_on_cancel=True
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve host {host!r}: {exc}") from exc
        addresses = [ip for ip in map(_parse_ip, answers) if ip is not None]
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve host {host!r}: no usable address")
        return addresses

    async def addresses_for(
        self, host: str, port: int, resolve_timeout: float | None = None
    ) -> list[IPAddress]:
        """The permitted addresses for ``host``; raises :class:`BlockedURL` when there are none."""
        literal = _parse_ip(host)
        addresses = (
            [literal] if literal is not None else await self._resolve(host, port, resolve_timeout)
        )
        if self.policy.permits_host(host):
            return addresses
        allowed = [ip for ip in addresses if self.policy.permits_address(ip)]
        if allowed:
            return allowed
        raise _refusal(host, addresses[0], literal is not None)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first permitted address that accepts; fall back only on refusals."""
        deadline = None if timeout is None else time.monotonic() + timeout
        error: Exception | None = None
        for ip in await self.addresses_for(host, port, timeout):
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return await self.inner.connect_tcp(
                    str(ip), port, remaining, local_address, socket_options
                )
            except httpcore.ConnectError as exc:  # refused/unreachable: try the next address
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Unix sockets are local by definition: always refused."""
        raise BlockedURL("unix-domain sockets are never contacted")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, with :class:`GuardedBackend` in its pool and no proxy support."""

    def __init__(
        self,
        policy: NetPolicy,
        *,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),
        retries: int = 0,
    ) -> None:
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=False)
        super().__init__(verify=ssl_context, trust_env=False, http1=http1, http2=http2)
        self.policy = policy
        # Replace the pool httpx built with one whose every connection goes through the guard.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            network_backend=GuardedBackend(policy),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Refuse bad schemes and credentials, then send; refusals name the (redacted) URL."""
        self.policy.check_url(request.url)
        try:
            return await super().handle_async_request(request)
        except BlockedURL as exc:
            where = redact_url(str(request.url))
            log.warning("refused %s: %s", where, exc.message)
            raise BlockedURL(f"{where}: {exc.message}", parameter=exc.parameter) from None


class GuardedClient(httpx.AsyncClient):
    """An :class:`httpx.AsyncClient` that knows its policy (built by :func:`guarded_client`)."""

    def __init__(self, policy: NetPolicy, **kw: Any) -> None:
        super().__init__(**kw)
        self.policy = policy


_TRANSPORT_KW = frozenset({"verify", "cert", "http1", "http2", "limits", "retries"})
_FORBIDDEN_KW = frozenset(
    {"transport", "mounts", "proxy", "proxies", "trust_env", "app", "follow_redirects"}
)


def guarded_client(policy: NetPolicy, *, timeout: float = 30.0, **kw: Any) -> httpx.AsyncClient:
    """An AsyncClient whose every connection is checked by ``policy``.

    Transport options (``verify``, ``http2``, ``limits``...) go to the guarded transport; other
    keywords (``headers``...) to the client. Anything that could route around the guard
    (``transport``, ``mounts``, ``proxy``, ``trust_env``, ``follow_redirects``) is a TypeError.
    """
    forbidden = sorted(_FORBIDDEN_KW.intersection(kw))
    if forbidden:
        raise TypeError(f"guarded_client() does not accept {', '.join(forbidden)}")
    transport_kw = {k: kw.pop(k) for k in list(kw) if k in _TRANSPORT_KW}
    return GuardedClient(
        policy,
        transport=GuardedTransport(policy, **transport_kw),
        timeout=timeout,
        trust_env=False,
        follow_redirects=False,
        max_redirects=policy.max_redirects,
        **kw,
    )


# --------------------------------------------------------------------------------------------
# Requests


def redact_url(url: str) -> str:
    """``url`` without query string, fragment and credentials, for messages and logs."""
    try:
        parts = urlsplit(str(url))
        netloc = parts.netloc.rpartition("@")[2]
        text = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<invalid URL>"
    return text if len(text) <= 200 else text[:199] + "…"


def _policy_of(client: httpx.AsyncClient) -> NetPolicy:
    if not isinstance(client, GuardedClient):
        raise TypeError("use netguard.guarded_client(policy): plain httpx clients are unguarded")
    return client.policy


@asynccontextmanager
async def _failures(
    kind: type[_RemoteFailure], what: str, url: str, parameter: str
) -> AsyncIterator[None]:
    """Turn refusals and httpx errors into typed errors that name ``parameter``."""
    where = f"{what} {redact_url(url)}"
    try:
        yield
    except RefusedURL as exc:
        raise exc.with_parameter(parameter) from None
    except GuideflowError as exc:  # our own typed errors pass through, naming the parameter
        if exc.parameter is None:
            exc.parameter = parameter
        raise
    except httpx.UnsupportedProtocol as exc:
        raise UnsupportedURLScheme(f"{where}: unsupported scheme", parameter=parameter) from exc
    except httpx.TimeoutException as exc:
        raise kind(
            f"{where} timed out", parameter=parameter, retryable=True, http_status=502
        ) from exc
    except httpx.TransportError as exc:
        raise kind(
            f"{where} failed: {type(exc).__name__}: {exc}",
            parameter=parameter,
            retryable=True,
            http_status=502,
        ) from exc
    except httpx.HTTPError as exc:
        raise kind(f"{where} failed: {type(exc).__name__}", parameter=parameter) from exc


def _status_failure(
    kind: type[_RemoteFailure], what: str, url: str, status: int, parameter: str
) -> _RemoteFailure:
    """The error for a remote HTTP status; only 5xx and 429 are worth retrying."""
    retryable = status >= 500 or status == 429
    return kind(
        f"{what} {redact_url(url)} answered HTTP {status}",
        parameter=parameter,
        status=status,
        retryable=retryable,
        http_status=502 if retryable else 400,
    )


async def _read_capped(response: httpx.Response, url: str, max_bytes: int, parameter: str) -> bytes:
    """The body, refusing as soon as it is known to exceed ``max_bytes``."""
    too_big = f"{redact_url(url)}: the body is over the {max_bytes}-byte limit"
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(too_big, parameter=parameter)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise ImageTooLarge(too_big, parameter=parameter)
    return bytes(body)


async def fetch_bytes(
    client: httpx.AsyncClient, url: str, *, max_bytes: int, parameter: str
) -> bytes:
    """GET ``url`` through a guarded client, following up to ``policy.max_redirects`` hops.

    Every hop is re-checked (scheme, credentials, addresses). Raises :class:`BlockedURL`,
    :class:`UnsupportedURLScheme`, :class:`DownloadFailed` or ``ImageTooLarge``, all naming
    ``parameter``.
    """
    policy = _policy_of(client)
    current = url
    for _hop in range(policy.max_redirects + 1):
        async with _failures(DownloadFailed, "GET", current, parameter):
            target = policy.check_url(current)
            headers = {"Accept-Encoding": "identity"}  # the byte cap then counts wire bytes
            async with client.stream("GET", target, headers=headers) as response:
                if response.has_redirect_location:
                    location = response.headers["Location"]
                    nxt = response.next_request
                    current = str(nxt.url if nxt else response.url.join(location))
                    continue
                if not response.is_success:
                    raise _status_failure(
                        DownloadFailed, "GET", current, response.status_code, parameter
                    )
                return await _read_capped(response, current, max_bytes, parameter)
    raise DownloadFailed(
        f"GET {redact_url(url)}: more than {policy.max_redirects} redirects", parameter=parameter
    )


async def _send_once(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    kind: type[_RemoteFailure],
    parameter: str,
    **request: Any,
) -> int:
    """Send one request (redirects are not followed) and return its 2xx status."""
    policy = _policy_of(client)
    async with _failures(kind, method, url, parameter):
        target = policy.check_url(url)
        async with client.stream(method, target, **request) as response:
            status = response.status_code
    if not 200 <= status < 300:
        raise _status_failure(kind, method, url, status, parameter)
    return status


async def put_bytes(
    client: httpx.AsyncClient,
    url: str,
    data: bytes,
    content_type: str,
    *,
    parameter: str = "uploadEndpoint",
) -> int:
    """PUT ``data`` as the raw body (Runware's ``uploadEndpoint``); returns the 2xx status."""
    headers = {"Content-Type": content_type}
    return await _send_once(
        client, "PUT", url, UploadFailed, parameter, content=data, headers=headers
    )


async def post_json(
    client: httpx.AsyncClient, url: str, payload: Any, *, parameter: str = "webhookURL"
) -> int:
    """POST ``payload`` as JSON (Runware's ``webhookURL``); returns the 2xx status."""
    return await _send_once(client, "POST", url, WebhookFailed, parameter, json=payload)
