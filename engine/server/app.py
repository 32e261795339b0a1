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
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from engine.server import logs
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


#: Bodies above this size are parsed in a thread (a 64 MB batch takes ~100 ms to parse).
_INLINE_PARSE_BYTES = 256 * 1024


async def _parse_json(body: bytes) -> Any:
    """``json.loads`` that rejects NaN/Infinity and keeps big bodies off the event loop."""

    def parse() -> Any:
        return json.loads(body, parse_constant=_reject_constant)

    return parse() if len(body) <= _INLINE_PARSE_BYTES else await asyncio.to_thread(parse)


def to_response(reply: Reply) -> JSONResponse:
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


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

    app = FastAPI(
        title="guideflow",
        version="0.1.0",
        summary="A Runware-compatible server for ControlNet preprocessing.",
        lifespan=lifespan,
    )
    app.state.dispatcher = dispatcher
    app.state.config = config

    @app.post(
        "/v1",
        openapi_extra={"requestBody": REQUEST_BODY, "security": [{"bearer": []}, {}]},
        responses=V1_RESPONSES,
        response_class=JSONResponse,
        summary="Run a batch of Runware tasks",
    )
    async def v1(request: Request) -> JSONResponse:
        """Runware's task endpoint: a JSON array of tasks in, ``{"data", "errors"}`` out."""
        try:
            body = await read_body(request, config.max_body_bytes)
        except BodyTooLarge:
            return to_response(
                request_error(
                    "payloadTooLarge",
                    f"the request body exceeds the limit of {config.max_body_bytes} bytes",
                    413,
                )
            )
        try:
            tasks = await _parse_json(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return to_response(
                request_error("invalidJSON", f"the body is not valid JSON: {exc}", 400)
            )
        if not isinstance(tasks, list) or not tasks:
            return to_response(
                request_error(
                    "invalidRequestBody",
                    "the body must be a non-empty JSON array of task objects",
                    400,
                )
            )
        base_url = config.public_url or str(request.base_url)
        reply = await dispatcher.handle(
            tasks, bearer_token(request.headers.get("authorization")), base_url.rstrip("/")
        )
        return to_response(reply)

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
