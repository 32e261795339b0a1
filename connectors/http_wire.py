"""How the Runware client's POSTs travel: aiohttp by default, httpx when asked.

:class:`connectors.runware.RunwareClient` only needs "POST these bytes, give me the
status, headers and body". Measured on the pipeline's benchmark machine against an
instant local server, one 20-task POST costs about 0.45 ms of client CPU through aiohttp
and 2.7-3.0 ms through ``httpx.AsyncClient`` (its anyio and connection-pool layers); at
thousands of guide images a second the HTTP client was the pipeline's largest cost.
aiohttp is the asyncio ecosystem's standard HTTP client and already part of every
install (s3fs talks to S3 through it), so it carries the requests by default.

:class:`HttpxWire` stays for what only httpx offers here: an injected transport (tests
use ``httpx.MockTransport``; callers may bring their own) and HTTP/2.

Both raise only :class:`WireTimeout` and :class:`WireConnectionError`, which the client
turns into its typed, retryable errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx


class WireTimeout(Exception):
    """The request did not complete in time (connect, send or read)."""


class WireConnectionError(Exception):
    """The connection failed or broke (refused, reset, closed mid-response, bad HTTP)."""


@dataclass(frozen=True)
class WireResponse:
    """A complete HTTP response: status, headers (case-insensitive ``get``) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class Wire(Protocol):
    """POSTs to one service with a connection pool of ``max_connections``."""

    async def post(self, url: str, body: bytes) -> WireResponse: ...

    async def aclose(self) -> None: ...

    @property
    def is_closed(self) -> bool: ...


class AiohttpWire:
    """POSTs through one ``aiohttp.ClientSession``, made on first use in the running loop.

    Like httpx's defaults: proxies from the environment (``HTTPS_PROXY``, ``NO_PROXY``),
    no redirects followed, one total timeout per request. Unlike them, no cookies are
    kept and no ``.netrc`` is read (the client sends its own ``Authorization``). The
    proxy is looked up once per URL: aiohttp's ``trust_env`` does it per request, in a
    worker thread, re-reading ``~/.netrc`` each time.
    """

    def __init__(
        self,
        headers: Mapping[str, str],
        *,
        timeout: float,
        max_connections: int,
        ssl_context: ssl.SSLContext,
    ) -> None:
        self._headers = dict(headers)
        self._timeout = timeout
        self._max_connections = max_connections
        self._ssl = ssl_context
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._proxies: dict[str, str | None] = {}

    def _session_for_this_loop(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            # A session belongs to the loop that made it; a client reused under a new
            # asyncio.run() gets a new one (the old loop, and its sockets, are gone).
            if self._session is not None and not self._session.closed:
                _abandon(self._session)
            self._loop = loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, limit_per_host=0, ssl=self._ssl
                ),
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def post(self, url: str, body: bytes) -> WireResponse:
        import aiohttp

        if self._closed:
            raise WireConnectionError("the client is closed")
        session = self._session_for_this_loop()
        proxy = self._proxies.get(url, "")
        if proxy == "":
            proxy = self._proxies[url] = env_proxy(url)
        try:
            async with session.post(url, data=body, allow_redirects=False, proxy=proxy) as response:
                data = await response.read()
                return WireResponse(response.status, response.headers, data)
        except TimeoutError as exc:  # aiohttp's timeouts are asyncio.TimeoutError subclasses
            raise WireTimeout(f"request timed out ({type(exc).__name__})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise WireConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed:
            # RuntimeError: its event loop is already closed, nothing is left to free
            with contextlib.suppress(RuntimeError):
                await session.close()

    @property
    def is_closed(self) -> bool:
        return self._closed


def _abandon(session: Any) -> None:
    """Let go of a session whose event loop is gone, closing its sockets without awaiting."""
    connector = session.connector
    session.detach()  # the session counts as closed now: no "unclosed session" report
    if connector is not None:
        with contextlib.suppress(Exception):  # transports of a closed loop may refuse
            connector._close()


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTP(S)_PROXY``/``ALL_PROXY``,
    honouring ``NO_PROXY``), as httpx and curl read them; ``None`` for a direct connection."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not proxies or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


class HttpxWire:
    """POSTs through an ``httpx.AsyncClient`` (a custom transport, or HTTP/2)."""

    def __init__(
        self,
        headers: Mapping[str, str],
        *,
        timeout: float,
        max_connections: int,
        ssl_context: ssl.SSLContext,
        transport: httpx.AsyncBaseTransport | None = None,
        http2: bool = False,
    ) -> None:
        self._http = httpx.AsyncClient(
            headers=dict(headers),
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            http2=http2,
            transport=transport,
            verify=ssl_context,
            follow_redirects=False,
        )

    async def post(self, url: str, body: bytes) -> WireResponse:
        try:
            response = await self._http.post(url, content=body)
        except httpx.TimeoutException as exc:
            raise WireTimeout(f"request timed out ({type(exc).__name__})") from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise WireConnectionError(f"{type(exc).__name__}: {exc}") from exc
        return WireResponse(response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed
