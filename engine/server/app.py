"""The FastAPI application: ``POST /v1``, ``GET /image/<uuid>.<ext>``, ``GET /healthz``.

:func:`create_app` is the testable factory. The routes stay thin: body
limits, JSON parsing and HTTP framing here; tasks in :mod:`.dispatch`; work in
:mod:`.executor`. Cross-cutting behaviour (fault injection, metrics) can be
added later as ordinary ASGI middleware around the returned app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from engine.server import faults, logs
from engine.server.auth import bearer_token
from engine.server.config import ServerConfig
from engine.server.dispatch import Dispatcher, Reply, request_error
from engine.server.openapi import REQUEST_BODY, V1_RESPONSES, customize
from guideflow.netguard import guarded_client

log = logging.getLogger("guideflow.server")


class BodyTooLarge(Exception):
    """The request body exceeds ``max_body_bytes``."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing early on Content-Length and while streaming past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: Bodies up to this size are parsed and validated on the event loop; bigger ones in a
#: thread (a 64 MB batch takes ~100 ms to parse). Parsing a 1 MiB body takes ~1.5 ms
#: (stdlib ``json``: ~700 MB/s on long strings), less than the two thread hand-offs it
#: saves; on a loaded host each hand-off can wait several ms for a CPU. A single 512²
#: PNG sent as base64 is ~380 KB, so single-image requests never leave the loop here.
INLINE_PARSE_BYTES = 1024 * 1024


async def _parse_json(body: bytes) -> Any:
    """``json.loads`` that rejects NaN/Infinity and keeps big bodies off the event loop.

    The stdlib parser is kept on purpose: orjson would be ~3x faster but reads integers
    beyond 64 bits as floats and ``1e400`` as an error, which would change what the
    validation layer sees; at the sizes parsed inline the difference is < 1 ms.
    """

    def parse() -> Any:
        # strict UTF-8 (RFC 8259), unlike json.loads(bytes), which also takes UTF-16/32
        # and decodes with "surrogatepass"; only backslash-u escapes can then make a surrogate
        text = body.decode("utf-8-sig")
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
        check_structure(value, surrogates="\\u" in text)
        return value

    return parse() if len(body) <= INLINE_PARSE_BYTES else await asyncio.to_thread(parse)


#: Tasks nest 3 levels (array, task, inputs/settings); far deeper bodies are garbage.
MAX_JSON_DEPTH = 32


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
            ) from None


def check_structure(value: Any, *, surrogates: bool = True) -> None:
    """Refuse JSON nested deeper than :data:`MAX_JSON_DEPTH` or holding lone surrogates.

    Both are valid JSON syntax that the server cannot process: deep nesting overflows
    the stack of ``json`` and the serialisation depth of pydantic, and a lone surrogate
    (``"\\ud800"``) cannot be encoded as UTF-8 to be hashed or echoed back; both used to
    surface as HTTP 500 (found by tests/test_fuzz.py). ``surrogates=False`` skips the
    string check (the body holds no ``\\u`` escape, so no string can hold one). Iterative:
    O(containers) normally, plus one ``isascii`` per string when checking surrogates.
    """
    if isinstance(value, str):
        if surrogates:
            _check_text(value)
        return
    if not isinstance(value, list | dict):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            if surrogates:
                for key in node:
                    _check_text(key)
            children = node.values()
        else:
            children = node
        for child in children:
            if isinstance(child, list | dict):
                stack.append((child, depth + 1))
            elif surrogates and isinstance(child, str):
                _check_text(child)


class FastJSONResponse(JSONResponse):
    """``JSONResponse`` rendered by orjson (~50x faster on base64 image fields).

    The same JSON as Starlette's renderer (compact, UTF-8, no ASCII escaping; floats
    may be spelt differently, e.g. ``1e-5`` for ``1e-05``); content orjson refuses
    (integers beyond 64 bits, lone surrogates) falls back to Starlette's renderer, so
    it succeeds or fails as before.
    A batch of 20 base64Data results is ~700 KB of JSON: 3 ms of event-loop time with
    ``json.dumps``, 0.05 ms with orjson. Every body comes from pydantic's JSON mode,
    which has already turned NaN/Infinity into ``null``.
    """

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:
            return super().render(content)


def to_response(reply: Reply, started: float | None = None) -> JSONResponse:
    """The reply as a JSON response; with ``started`` (a ``perf_counter`` reading), a
    ``Server-Timing: app;dur=<ms>`` header: the server's own time for the request, from
    the handler's start to the rendered body (body read, parse, work, render)."""
    response = FastJSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
    if started is not None:
        elapsed = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = f"app;dur={elapsed:.1f}"
    return response


def create_app(config: ServerConfig) -> FastAPI:
    """Build the server for ``config`` (raises ``ValueError`` for an unsafe/invalid config)."""
    config.validate()
    logs.install(config.api_keys)
    dispatcher = Dispatcher(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with guarded_client(config.net_policy, timeout=config.fetch_timeout) as client:
            dispatcher.runner.client = client
            sweeper = asyncio.create_task(_sweep_forever(dispatcher, config.sweep_interval))
            try:
                yield
            finally:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
                await dispatcher.aclose()
                dispatcher.runner.client = None
                if injector is not None:
                    injector.close()

    app = FastAPI(
        title="guideflow",
        version="0.1.0",
        summary="A Runware-compatible server for ControlNet preprocessing.",
        lifespan=lifespan,
    )
    app.state.dispatcher = dispatcher
    app.state.config = config
    # TEST ONLY, off unless configured: answers some POST /v1 with 429/5xx/delays/drops...
    injector = faults.install(app, config.faults) if config.faults is not None else None

    @app.post(
        "/v1",
        openapi_extra={"requestBody": REQUEST_BODY, "security": [{"bearer": []}, {}]},
        responses=V1_RESPONSES,
        response_class=JSONResponse,
        summary="Run a batch of Runware tasks",
    )
    async def v1(request: Request) -> JSONResponse:
        """Runware's task endpoint: a JSON array of tasks in, ``{"data", "errors"}`` out."""
        started = time.perf_counter()
        try:
            body = await read_body(request, config.max_body_bytes)
        except BodyTooLarge:
            return to_response(
                request_error(
                    "payloadTooLarge",
                    f"the request body exceeds the limit of {config.max_body_bytes} bytes",
                    413,
                ),
                started,
            )
        try:
            tasks = await _parse_json(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return to_response(
                request_error("invalidJSON", f"the body is not valid JSON: {exc}", 400), started
            )
        if not isinstance(tasks, list) or not tasks:
            return to_response(
                request_error(
                    "invalidRequestBody",
                    "the body must be a non-empty JSON array of task objects",
                    400,
                ),
                started,
            )
        base_url = config.public_url or str(request.base_url)
        reply = await dispatcher.handle(
            tasks,
            bearer_token(request.headers.get("authorization")),
            base_url.rstrip("/"),
            offload=len(body) > INLINE_PARSE_BYTES,
        )
        return to_response(reply, started)

    @app.get(
        "/image/{filename}",
        responses={
            200: {"content": {"image/*": {}}, "description": "The image bytes."},
            404: {"description": "Unknown or expired image."},
        },
        summary="A stored image (guide or upload) until its ttl expires",
    )
    async def image(filename: str) -> Response:
        """Serve ``<uuid>.<ext>`` while it lives; 404 once expired or evicted."""
        image_uuid, _, ext = filename.partition(".")
        entry = dispatcher.store.lookup(image_uuid.lower())
        found = None
        if entry is not None and entry.ext == ext.lower():
            found = await asyncio.to_thread(dispatcher.store.read, entry.uuid)
        if found is None:
            return to_response(
                request_error(
                    "imageNotFound", f"no image {filename} (unknown, expired or evicted)", 404
                )
            )
        stored, data = found
        remaining = max(0, int(stored.expires - config.clock()))
        return Response(
            data,
            media_type=stored.content_type,
            headers={"Cache-Control": f"private, max-age={remaining}"},
        )

    @app.get("/healthz", summary="Liveness probe")
    async def healthz() -> dict[str, Any]:
        """200 while the server is up, with its queue occupancy."""
        return {
            "status": "ok",
            "inFlight": dispatcher.admission.in_flight,
            "capacity": dispatcher.admission.capacity,
        }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = customize(
                get_openapi(
                    title=app.title, version=app.version, summary=app.summary, routes=app.routes
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _sweep_forever(dispatcher: Dispatcher, interval: float) -> None:
    """Delete expired images and job records every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        try:
            images = await asyncio.to_thread(dispatcher.store.sweep)
            jobs = dispatcher.jobs.sweep()
        except Exception:  # never let housekeeping kill the server
            log.exception("sweep failed")
            continue
        if images or jobs:
            log.info("swept %d expired image(s) and %d job record(s)", images, jobs)
