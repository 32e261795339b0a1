"""A Runware-compatible ``POST /v1`` that answers every task at once, for pipeline benchmarks.

It does no image work: a ``controlNetPreprocess`` task (either spelling) is answered
immediately with a protocol-valid result item (``taskType``, ``taskUUID``,
``guideImageUUID``, ``inputImageUUID``, ``cost`` 0.0006 and the guide image as
``outputType`` asks: ``guideImageURL``, ``guideImageBase64Data`` or
``guideImageDataURI`` of a fixed 1×1 PNG); ``imageUpload`` gets an ``imageUUID``;
``ping`` gets ``pong``. With an ``uploadEndpoint`` the answer pretends the upload
happened (nothing is PUT). Anything else is a per-task ``unsupportedTaskType`` error.
Any other ``GET``/``HEAD`` answers the tiny PNG and any ``PUT`` succeeds, so the server
can also stand in as the S3 endpoint a benchmark's contact sheet reads from.
``GET /stats`` returns how many POSTs and tasks it has answered, so a benchmark can
check that two clients sent the same work.

It is a raw ASGI app (no framework) encoding with :mod:`orjson` when installed, run
under uvicorn in a *separate process* (:func:`serve`), so that the server never
competes with the client being measured for the GIL (it still competes for CPU).

Usage::

    with serve() as url:            # "http://127.0.0.1:PORT/v1"
        ...                         # POST task arrays to url

    python bench/instant_server.py --port 8765    # stand-alone
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

try:  # orjson is ~5× faster than json for these bodies; the bench works without it
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PREPROCESS_TYPES = frozenset({"controlNetPreprocess", "imageControlNetPreProcess"})
COST = 0.0006


def _tiny_png() -> bytes:
    """A valid 1×1 white RGB PNG (built here so no binary blob lives in the source)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    pixels = zlib.compress(b"\x00\xff\xff\xff")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


TINY_PNG = _tiny_png()
TINY_PNG_B64 = base64.b64encode(TINY_PNG).decode()
TINY_PNG_DATA_URI = "data:image/png;base64," + TINY_PNG_B64


class InstantApp:
    """The ASGI app; ``posts``/``tasks`` count what it answered."""

    def __init__(self) -> None:
        self.posts = 0
        self.tasks = 0
        self.base = "http://127.0.0.1"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/stats":
            await _respond(send, 200, {"posts": self.posts, "tasks": self.tasks})
            return
        if scope["method"] in ("GET", "HEAD", "PUT"):
            await _object(scope, receive, send)  # a stand-in object store (contact sheets)
            return
        if scope["method"] != "POST":
            await _respond(send, 405, {"errors": [{"code": "methodNotAllowed", "message": "POST"}]})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            tasks = _loads(body)
        except ValueError:
            await _respond(send, 400, {"errors": [{"code": "invalidJSON", "message": "bad body"}]})
            return
        if not isinstance(tasks, list):
            tasks = [tasks]
        self.posts += 1
        self.tasks += len(tasks)
        data: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for task in tasks:
            kind = task.get("taskType") if isinstance(task, dict) else None
            if kind in PREPROCESS_TYPES:
                data.append(self._preprocess(task))
            elif kind == "imageUpload":
                image_uuid = str(uuid.uuid4())
                data.append(
                    {
                        "taskType": "imageUpload",
                        "taskUUID": task.get("taskUUID"),
                        "imageUUID": image_uuid,
                        "imageURL": f"{self.base}/image/{image_uuid}.png",
                    }
                )
            elif kind == "ping":
                data.append({"taskType": "ping", "pong": True, "taskUUID": task.get("taskUUID")})
            elif kind == "authentication":
                data.append(
                    {"taskType": "authentication", "connectionSessionUUID": str(uuid.uuid4())}
                )
            else:
                errors.append(
                    {
                        "code": "unsupportedTaskType",
                        "message": f"the instant server does not do {kind!r}",
                        "taskType": kind,
                        "taskUUID": task.get("taskUUID") if isinstance(task, dict) else None,
                    }
                )
        out: dict[str, Any] = {"data": data}
        if errors:
            out["errors"] = errors
        await _respond(send, 200, out)

    def _preprocess(self, task: dict[str, Any]) -> dict[str, Any]:
        guide_uuid = str(uuid.uuid4())
        item: dict[str, Any] = {
            "taskType": task["taskType"],
            "taskUUID": task.get("taskUUID"),
            "guideImageUUID": guide_uuid,
            "inputImageUUID": str(uuid.uuid4()),
        }
        output_type = task.get("outputType", "URL")
        if output_type == "base64Data":
            item["guideImageBase64Data"] = TINY_PNG_B64
        elif output_type == "dataURI":
            item["guideImageDataURI"] = TINY_PNG_DATA_URI
        else:
            item["guideImageURL"] = f"{self.base}/image/{guide_uuid}.png"
        if task.get("includeCost"):
            item["cost"] = COST
        return item


async def _object(scope: Scope, receive: Receive, send: Send) -> None:
    """Any other GET/HEAD is an object holding the tiny PNG; any PUT is accepted."""
    if scope["method"] == "PUT":
        while (await receive()).get("more_body"):
            pass
        body = b""
    else:
        body = TINY_PNG
    headers = [
        (b"content-type", b"image/png"),
        (b"content-length", str(len(TINY_PNG) if scope["method"] != "PUT" else 0).encode()),
        (b"etag", b'"bench"'),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


async def _respond(send: Send, status: int, payload: Any) -> None:
    body = _dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _run_on_fd(fd: int) -> None:
    """Serve on the inherited, already listening socket ``fd`` (see :func:`serve`)."""
    import uvicorn

    app = InstantApp()
    sock = socket.socket(fileno=fd)
    host, port = sock.getsockname()[:2]
    app.base = f"http://{host}:{port}"
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def serve(host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Start the instant server in a child process; yield its ``/v1`` URL; stop it after.

    The listening socket is bound here (port 0) and inherited by the child, so the URL is
    known before the child starts and no port can be taken in between.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    fd = sock.fileno()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--fd", str(fd)], pass_fds=[fd]
    )
    url = f"http://{host}:{port}/v1"
    try:
        _wait_ready(f"http://{host}:{port}/stats", timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sock.close()


def stats(url: str) -> dict[str, int]:
    """``GET /stats`` of the server whose ``/v1`` URL is ``url``."""
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as resp:
        return json.loads(resp.read())


def _wait_ready(stats_url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(stats_url, timeout=2) as resp:
                resp.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"instant server did not start within {timeout} s") from None
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # used by serve()
    args = parser.parse_args(argv)
    if args.fd is not None:
        _run_on_fd(args.fd)
        return
    import uvicorn

    app = InstantApp()
    app.base = f"http://{args.host}:{args.port}"
    print(f"instant server on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
