"""Fault injection for ``guideflow serve``: TEST-ONLY chaos, off unless explicitly enabled.

With ``ServerConfig(faults=FaultConfig(rate=0.2))`` (CLI: ``guideflow serve --fault-rate
0.2`` or ``--faults JSON``) each ``POST /v1`` request is, with probability ``rate``,
answered with one of these faults instead of (or on top of) its real answer:

==============  ===========================================================================
``429``         ``429 Too Many Requests`` with ``Retry-After: <retry_after>`` and one
                ``rateLimitExceeded`` error per task; nothing is run.
``500``         ``500`` with an ``internalError`` error envelope; nothing is run.
``502``         ``502 Bad Gateway`` with an HTML body, as a proxy answers; nothing is run.
``503``         ``503`` with a ``serviceUnavailable`` error envelope; nothing is run.
``delay``       the request waits ``delay_s`` (set it past the client's timeout), then runs
                and answers normally, usually to a client that has gone away.
``drop``        the request runs; the status line, headers and the first part of the
                body are sent, then the connection is closed (the ASGI app returns
                mid-body, which uvicorn, like any ASGI server, answers by closing it).
``truncate``    the request runs; its answer is sent with its status but a cut body (and a
                ``Content-Length`` matching the cut): unparsable JSON.
``upload``      the request runs, but the PUT of one of its preprocess tasks to its
                ``uploadEndpoint`` goes to a loopback port that refuses connections, so
                that task (only) ends ``uploadFailed`` (a real failed PUT; the request
                itself is unchanged, so a retry of it is the same payload); its siblings
                succeed. Needs 127.0.0.1 allowed by the server's network policy
                (otherwise the task fails ``forbiddenURL``). Drawn only for requests
                holding such a task.
==============  ===========================================================================

``upload`` is the one fault injected below the HTTP layer: :func:`install` wraps the
server's ``Runner.upload`` (a dispatch hook), which redirects the PUT of the URLs the
middleware marked. The faults that run the request (``delay``, ``drop``, ``truncate``)
leave the work done on the server, so a client's retry with the same taskUUIDs is
answered from the stored job: they test idempotent retries. Which fault is drawn follows
``weights`` (among the kinds that apply to the request); decisions come from a private
``random.Random(seed)``, so the sequence of draws is repeatable (which request gets which
draw depends on arrival order).

Counters of every injected fault, and how long clients waited after a ``429`` before
re-sending one of its taskUUIDs (``retryAfter``: checked, minGapS, violations), are kept
on ``app.state.faults`` (a :class:`FaultInjector`) and served at ``GET /faults/stats``;
neither exists when faults are off. Nothing is logged beyond the kind of each fault and
the number of tasks it hit (never bodies or URLs, which may hold presigned signatures).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("guideflow.server.faults")

#: Every fault kind, in the order of the table above.
FAULT_KINDS: tuple[str, ...] = ("429", "500", "502", "503", "delay", "drop", "truncate", "upload")
#: Kinds that need the request to hold a preprocess task with an ``uploadEndpoint``.
_NEEDS_UPLOAD = frozenset({"upload"})
#: Request bodies over this size are passed through untouched (never buffered twice).
MAX_INSPECTED_BYTES = 64 * 1024**2

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _equal_weights() -> dict[str, float]:
    return dict.fromkeys(FAULT_KINDS, 1.0)


@dataclass(frozen=True)
class FaultConfig:
    """What to inject, and how often (see the module docstring for each kind).

    ``rate``: probability that a ``POST /v1`` request gets a fault (0..1, combined over
    all kinds). ``weights``: relative frequency of each kind (missing kinds: 0).
    ``seed``: the RNG seed (``None``: unseeded). ``retry_after``: seconds sent in the
    429's ``Retry-After``. ``delay_s``: how long ``delay`` holds a request (make it longer
    than the client's timeout). ``truncate_fraction``: share of the body that ``truncate``
    and ``drop`` still send.
    """

    rate: float = 0.0
    weights: Mapping[str, float] = field(default_factory=_equal_weights)
    seed: int | None = 0
    retry_after: int = 1
    delay_s: float = 35.0
    truncate_fraction: float = 0.5

    def validate(self) -> None:
        """Raise ``ValueError`` for a configuration that cannot inject what it says."""
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"faults.rate must be within 0..1, got {self.rate}")
        unknown = set(self.weights) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError("fault weights must be >= 0 and at least one > 0")
        if self.retry_after < 0 or self.delay_s < 0:
            raise ValueError("faults.retry_after and faults.delay_s must be >= 0")
        if not 0.0 <= self.truncate_fraction < 1.0:
            raise ValueError("faults.truncate_fraction must be within [0, 1)")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> FaultConfig:
        """From a JSON object of these fields (``--faults``); unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {sorted(names)}")
        try:
            config = cls(**dict(raw))
            if "weights" in raw:
                weights = {str(k): float(v) for k, v in raw["weights"].items()}
                config = replace(config, weights=weights)
            config.validate()
        except (TypeError, AttributeError) as exc:  # e.g. "rate": "high", "weights": [1]
            raise ValueError(f"invalid fault settings: {exc}") from None
        return config

    @classmethod
    def from_json(cls, text: str) -> FaultConfig:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("--faults must be a JSON object")
        return cls.from_mapping(value)


class FaultInjector:
    """The shared state of fault injection: the config (replaceable at run time with
    :meth:`configure`), the RNG, the counters and the Retry-After bookkeeping.

    Used only from the server's event loop; :meth:`stats` may be read from any thread.
    """

    def __init__(self, config: FaultConfig, clock: Callable[[], float] = time.monotonic) -> None:
        config.validate()
        self.config = config
        self.clock = clock
        self._rng = random.Random(config.seed)
        self.requests = 0
        #: uploadEndpoint URLs whose next PUT must fail (marked by an ``upload`` fault)
        self._doomed: set[str] = set()
        self.counts: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self.upload_tasks_failed = 0
        #: taskUUID → (when its 429 was sent, the Retry-After it carried)
        self._limited: dict[str, tuple[float, int]] = {}
        self.retry_checked = 0
        self.retry_violations = 0
        self.retry_min_gap: float | None = None
        # Bound but never listening: connecting to it is refused at once (ECONNREFUSED).
        self._sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sink.bind(("127.0.0.1", 0))
        self.refused_netloc = f"127.0.0.1:{self._sink.getsockname()[1]}"

    def configure(self, config: FaultConfig) -> None:
        """Switch to ``config`` from now on (counters and RNG state are kept)."""
        config.validate()
        self.config = config

    def draw(self, applicable: frozenset[str] | set[str]) -> str | None:
        """The fault for one request (``None``: no fault), among ``applicable`` kinds."""
        cfg = self.config
        self.requests += 1
        if cfg.rate <= 0 or self._rng.random() >= cfg.rate:
            return None
        kinds = [k for k in FAULT_KINDS if k in applicable and cfg.weights.get(k, 0) > 0]
        if not kinds:
            return None
        kind = self._rng.choices(kinds, weights=[cfg.weights[k] for k in kinds])[0]
        self.counts[kind] += 1
        return kind

    def pick(self, n: int) -> int:
        """A random index below ``n`` (which task an ``upload`` fault hits)."""
        return self._rng.randrange(n)

    def doom(self, url: str) -> None:
        """Make the next PUT to ``url`` fail (see :meth:`hook_uploads`)."""
        self._doomed.add(url)

    def hook_uploads(self, runner: Any) -> None:
        """Wrap ``runner.upload(url, data, content_type)`` so that a doomed URL's PUT goes
        to a port that refuses it: the server's own upload path fails for real."""
        original = runner.upload

        async def upload(url: str, data: bytes, content_type: str) -> None:
            if url in self._doomed:
                self._doomed.discard(url)
                self.upload_tasks_failed += 1
                url = urlunsplit(urlsplit(url)._replace(netloc=self.refused_netloc))
            await original(url, data, content_type)

        runner.upload = upload

    # -- Retry-After bookkeeping -----------------------------------------------------------

    def limited(self, task_uuids: list[str], retry_after: int) -> None:
        """Remember that these tasks were just told to wait ``retry_after`` seconds."""
        now = self.clock()
        for uuid in task_uuids:
            self._limited[uuid] = (now, retry_after)

    def arrived(self, task_uuids: list[str]) -> None:
        """Check the wait of every task re-sent after a 429 (its first re-send only)."""
        if not self._limited:
            return
        now = self.clock()
        for uuid in task_uuids:
            seen = self._limited.pop(uuid, None)
            if seen is None:
                continue
            gap = now - seen[0]
            self.retry_checked += 1
            self.retry_violations += gap < seen[1]
            self.retry_min_gap = gap if self.retry_min_gap is None else min(self.retry_min_gap, gap)

    def stats(self) -> dict[str, Any]:
        """Counters: requests seen, faults injected by kind, Retry-After compliance."""
        return {
            "rate": self.config.rate,
            "requests": self.requests,
            "faulted": sum(self.counts.values()),
            "faults": dict(self.counts),
            "uploadTasksFailed": self.upload_tasks_failed,
            "retryAfter": {
                "seconds": self.config.retry_after,
                "checked": self.retry_checked,
                "violations": self.retry_violations,
                "minGapS": self.retry_min_gap,
            },
        }

    def close(self) -> None:
        self._sink.close()


# -- the ASGI middleware ---------------------------------------------------------------------


def _tasks_of(body: bytes) -> list[Any]:
    """The body's JSON array, or [] when it is not one (the app will say why)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return []
    return value if isinstance(value, list) else []


def _uuids(tasks: list[Any]) -> list[str]:
    return [
        t["taskUUID"] for t in tasks if isinstance(t, dict) and isinstance(t.get("taskUUID"), str)
    ]


def _uploading(tasks: list[Any]) -> list[int]:
    """Indexes of the tasks that carry an http(s) ``uploadEndpoint``."""
    return [
        i
        for i, t in enumerate(tasks)
        if isinstance(t, dict)
        and isinstance(t.get("uploadEndpoint"), str)
        and t["uploadEndpoint"].lower().startswith(("http://", "https://"))
    ]


def _envelope(code: str, message: str, tasks: list[Any]) -> bytes:
    """A Runware error body: one error per task (or one for the request)."""
    errors = [
        {
            "code": code,
            "message": message,
            **({"taskType": t["taskType"]} if isinstance(t.get("taskType"), str) else {}),
            **({"taskUUID": t["taskUUID"]} if isinstance(t.get("taskUUID"), str) else {}),
        }
        for t in tasks
        if isinstance(t, dict)
    ] or [{"code": code, "message": message}]
    return json.dumps({"errors": errors}).encode()


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]


class FaultMiddleware:
    """ASGI middleware that injects :class:`FaultInjector`'s faults into ``POST /v1``."""

    def __init__(self, app: Any, injector: FaultInjector) -> None:
        self.app = app
        self.injector = injector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and scope["path"] == "/faults/stats":
            await _respond(send, 200, json.dumps(self.injector.stats()).encode())
            return
        if scope["method"] != "POST" or scope["path"] != "/v1":
            await self.app(scope, receive, send)
            return
        body, complete = await _read(receive)
        if not complete:  # too big to inspect: run it untouched
            await self.app(scope, _replay(body, receive, more=True), send)
            return
        tasks = _tasks_of(body)
        self.injector.arrived(_uuids(tasks))
        uploading = _uploading(tasks)
        applicable = set(FAULT_KINDS) - (set() if uploading else _NEEDS_UPLOAD)
        kind = self.injector.draw(applicable)
        if kind is None:
            await self.app(scope, _replay(body, receive), send)
            return
        log.info("injected fault %s into POST /v1 (%d task(s))", kind, len(tasks))
        await self._inject(kind, scope, receive, send, body, tasks, uploading)

    async def _inject(
        self,
        kind: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        tasks: list[Any],
        uploading: list[int],
    ) -> None:
        cfg = self.injector.config
        message = f"injected fault ({kind})"
        if kind == "429":
            self.injector.limited(_uuids(tasks), cfg.retry_after)
            payload = _envelope("rateLimitExceeded", message, tasks)
            await _respond(send, 429, payload, [(b"retry-after", str(cfg.retry_after).encode())])
        elif kind in ("500", "503"):
            code = "internalError" if kind == "500" else "serviceUnavailable"
            await _respond(send, int(kind), _envelope(code, message, tasks))
        elif kind == "502":
            html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            await _respond(send, 502, html, content_type=b"text/html")
        elif kind == "delay":
            await asyncio.sleep(cfg.delay_s)
            await self.app(scope, _replay(body, receive), send)
        elif kind == "upload":
            task = tasks[uploading[self.injector.pick(len(uploading))]]
            self.injector.doom(task["uploadEndpoint"])
            await self.app(scope, _replay(body, receive), send)
        else:  # drop / truncate: run it, then mangle the answer
            start, answer = await _capture(self.app, scope, _replay(body, receive))
            cut = answer[: int(len(answer) * cfg.truncate_fraction)]
            if kind == "truncate":
                headers = _with_length(list(start.get("headers", [])), len(cut))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": cut, "more_body": False})
            else:  # headers promise the whole body; part of it comes, then the close
                await send(start)
                await send({"type": "http.response.body", "body": cut, "more_body": True})


async def _read(receive: Receive) -> tuple[bytes, bool]:
    """The request body and whether it is complete (False: over the inspection cap)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            return b"".join(chunks), True
        if size > MAX_INSPECTED_BYTES:
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive, *, more: bool = False) -> Receive:
    """A ``receive`` that yields ``body`` first (``more``: the rest is still to come),
    then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replay


async def _capture(app: Any, scope: Scope, receive: Receive) -> tuple[Message, bytes]:
    """Run ``app`` and keep its answer: (the response-start message, the whole body)."""
    start: Message = {}
    chunks: list[bytes] = []

    async def keep(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    return start, b"".join(chunks)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def install(app: Any, config: FaultConfig) -> FaultInjector:
    """Wrap ``app`` (a FastAPI/Starlette app) with fault injection; keep the injector on
    ``app.state.faults``."""
    injector = FaultInjector(config)
    injector.hook_uploads(app.state.dispatcher.runner)
    app.state.faults = injector
    app.add_middleware(FaultMiddleware, injector=injector)
    log.warning(
        "FAULT INJECTION ENABLED (test only): %.0f%% of POST /v1 requests get a fault",
        config.rate * 100,
    )
    return injector
