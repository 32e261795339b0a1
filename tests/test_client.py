"""Tests for ``connectors.runware.RunwareClient``.

api.runware.ai cannot be reached from here, so the retry, batching, parsing and polling
tests talk to :class:`ScriptedServer`: a real HTTP/1.1 server on 127.0.0.1 (stdlib
``http.server`` in a thread) that answers each POST from a script — a status with headers
and a JSON body, a truncated body, or a dropped connection — and records what it was sent.
It stands in for Runware's API; the end-to-end tests against guideflow's own server are
in the ``live`` section at the bottom.

Waits never really happen: the client's ``sleep``/``clock`` are a :class:`FakeTime` that
records every wait and advances a virtual clock, and ``random`` is fixed, so backoff and
poll schedules are asserted exactly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from connectors.runware import (
    RunwareAuthError,
    RunwareClient,
    RunwareConnectionError,
    RunwareCreditError,
    RunwareError,
    RunwareRateLimited,
    RunwareServerError,
    RunwareTimeout,
    RunwareValidationError,
    error_from,
    parse_retry_after,
)
from guideflow.protocol import (
    ErrorObject,
    PingTask,
    PreprocessResult,
    PreprocessTask,
    stable_task_uuid,
)

API_KEY = "rw-test-key-0123456789abcdef"

# ============================================================================================
# A scripted HTTP peer standing in for api.runware.ai
# ============================================================================================


@dataclass
class Reply:
    """Answer with ``status``, JSON ``body`` (or raw bytes) and extra ``headers``."""

    status: int = 200
    body: Any = field(default_factory=lambda: {"data": []})
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Drop:
    """Close the connection without answering (a dropped connection)."""


@dataclass
class Truncated:
    """Send a 200 whose Content-Length promises more bytes than are sent, then close."""

    body: bytes = b'{"data": [{"taskType": "controlNetPre'
    declared: int = 500


Action = Reply | Drop | Truncated
Handler = Callable[[list[dict[str, Any]]], Action]


@dataclass
class Seen:
    """One request as the server received it."""

    headers: dict[str, str]
    body: list[dict[str, Any]]


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 that plays ``script`` (then calls ``handler``)."""

    def __init__(self, script: list[Action] | None = None, handler: Handler | None = None):
        self.script = list(script or [])
        self.handler = handler
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with outer._lock:
                    outer.requests.append(
                        Seen({k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    action = outer.script.pop(0) if outer.script else None
                if action is None:
                    assert outer.handler is not None, "script exhausted"
                    action = outer.handler(body)
                outer._play(self, action)

        class _Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # a client that gave up mid-answer (cancelled batch): not a test failure
                outer.server_errors += 1

        self.server_errors = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @staticmethod
    def _play(h: BaseHTTPRequestHandler, action: Action) -> None:
        if isinstance(action, Drop):
            h.close_connection = True
            return
        if isinstance(action, Truncated):
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(action.declared))
            h.end_headers()
            h.wfile.write(action.body)
            h.wfile.flush()
            h.close_connection = True
            return
        payload = (
            action.body if isinstance(action.body, bytes) else json.dumps(action.body).encode()
        )
        h.send_response(action.status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in action.headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)

    def __enter__(self) -> ScriptedServer:
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def task_batches(self) -> list[list[dict[str, Any]]]:
        return [r.body for r in self.requests]


@contextmanager
def scripted(*script: Action, handler: Handler | None = None) -> Iterator[ScriptedServer]:
    with ScriptedServer(list(script), handler) as server:
        yield server


class FakeTime:
    """Injectable ``sleep``/``clock``: records every wait and advances a virtual clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def clock(self) -> float:
        return self.now


def client_for(url: str, ft: FakeTime, *, jitter: float = 0.5, **kw: Any) -> RunwareClient:
    return RunwareClient(API_KEY, url, sleep=ft.sleep, random=lambda: jitter, clock=ft.clock, **kw)


# -- protocol helpers (tasks from guideflow.protocol; raw JSON only for the server's side) -----


def task(i: int, **fields: Any) -> PreprocessTask:
    return PreprocessTask.build(
        "canny",
        "https://images.example/photo.png",
        task_uuid=stable_task_uuid("t", str(i)),
        **fields,
    )


def guide(item: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A successful result item for a request item, as a Runware-like server would send."""
    return {
        "taskType": item["taskType"],
        "taskUUID": item["taskUUID"],
        "guideImageUUID": stable_task_uuid("g", item["taskUUID"]),
        "inputImageUUID": stable_task_uuid("i", item["taskUUID"]),
        "guideImageURL": f"https://im.example/{item['taskUUID']}.jpg",
        **extra,
    }


def echo_all(body: list[dict[str, Any]]) -> Action:
    return Reply(200, {"data": [guide(t) for t in body]})


# ============================================================================================
# Retries and backoff
# ============================================================================================


async def test_transient_failures_are_retried_with_backoff_honouring_retry_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """429 (Retry-After: 2), 503, truncated JSON, a dropped connection and a body cut short
    are each retried; the waits are max(Retry-After, full jitter) = exact values here."""
    caplog.set_level(logging.WARNING, logger="connectors.runware")
    ft = FakeTime()
    with scripted(
        Reply(
            429,
            {"errors": [{"code": "rateLimitExceeded", "message": "slow down"}]},
            {"Retry-After": "2"},
        ),
        Reply(503, {"errors": [{"code": "serviceUnavailable", "message": "busy"}]}),
        Reply(200, b'{"data": [{"taskType": "controlNetPreprocess", "taskUU'),
        Drop(),
        Truncated(),
        handler=echo_all,
    ) as srv:
        async with client_for(srv.url, ft) as client:
            result = await client.preprocess(task(1))
    assert isinstance(result, PreprocessResult)
    assert result.guideImageURL == f"https://im.example/{task(1).taskUUID}.jpg"
    # jitter 0.5 × min(30, 0.5·2ⁿ): 0.25 (raised to Retry-After 2), 0.5, 1.0, 2.0, 4.0
    assert ft.sleeps == [2.0, 0.5, 1.0, 2.0, 4.0]
    assert len(srv.requests) == 6
    # each failure was recognised for what it is
    codes = [r.args[0] for r in caplog.records if r.name == "connectors.runware"]
    assert codes == [
        "rateLimitExceeded",
        "serviceUnavailable",
        "invalidResponse",
        "connectionError",
        "connectionError",
    ]
    # every retry re-sends the same taskUUID (the server treats it idempotently)
    assert {b[0]["taskUUID"] for b in srv.task_batches} == {task(1).taskUUID}


async def test_retry_after_http_date_and_short_retry_after() -> None:
    """An HTTP-date Retry-After is a wait until that time; a Retry-After shorter than the
    jittered backoff does not shorten it."""
    now = parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT")
    assert now == 0.0  # in the past: no wait
    from datetime import UTC, datetime

    base = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=base) == 30.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("soon") is None
    ft = FakeTime()
    with scripted(Reply(429, {"errors": []}, {"Retry-After": "0"}), handler=echo_all) as srv:
        async with client_for(srv.url, ft, jitter=1.0) as client:
            await client.preprocess(task(1))
    assert ft.sleeps == [0.5]


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalidParameter", RunwareValidationError),
        (401, "invalidApiKey", RunwareAuthError),
        (402, "insufficientCredits", RunwareCreditError),
        (403, "forbidden", RunwareAuthError),
    ],
)
async def test_client_errors_are_never_retried(status: int, code: str, cls: type) -> None:
    """400/401/402/403 fail at once: exactly one request, a typed non-retryable error."""
    ft = FakeTime()
    body = {"errors": [{"code": code, "message": "no", "parameter": "apiKey"}]}
    with scripted(Reply(status, body), handler=echo_all) as srv:
        async with client_for(srv.url, ft) as client:
            with pytest.raises(cls) as info:
                await client.send([task(1)])
    assert len(srv.requests) == 1
    assert ft.sleeps == []
    err = info.value
    assert (err.http_status, err.code, err.retryable) == (status, code, False)
    assert err.error.code == code


async def test_retries_stop_at_max_retries_with_typed_retryable_error() -> None:
    ft = FakeTime()
    with scripted(
        handler=lambda body: Reply(503, {"errors": [{"code": "x", "message": "down"}]})
    ) as srv:
        async with client_for(srv.url, ft, max_retries=3) as client:
            with pytest.raises(RunwareServerError) as info:
                await client.send([task(1)])
            # preprocess_many returns the same failure in place rather than raising
            (outcome,) = await client.preprocess_many([task(2)])
    assert len(srv.requests) == 4 + 4
    assert ft.sleeps == [0.25, 0.5, 1.0] * 2
    err = info.value
    assert err.retryable and err.http_status == 503 and err.attempts == 4
    assert "gave up after 4 attempts" in str(err)
    assert isinstance(outcome, RunwareServerError) and outcome.task_uuid == task(2).taskUUID


async def test_unreachable_server_is_a_retryable_connection_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    ft = FakeTime()
    async with client_for(f"http://127.0.0.1:{port}/v1", ft, max_retries=2) as client:
        with pytest.raises(RunwareConnectionError) as info:
            await client.send([task(1)])
        assert await client.ping() is False
    assert info.value.retryable and len(ft.sleeps) == 2


async def test_retry_after_beyond_the_cap_fails_at_once_for_rescheduling() -> None:
    ft = FakeTime()
    with scripted(Reply(429, {"errors": []}, {"Retry-After": "3600"}), handler=echo_all) as srv:
        async with client_for(srv.url, ft, retry_after_max=60) as client:
            with pytest.raises(RunwareRateLimited) as info:
                await client.send([task(1)])
    assert len(srv.requests) == 1 and ft.sleeps == []
    assert info.value.retry_after == 3600 and info.value.retryable


# ============================================================================================
# Batching and per-task errors
# ============================================================================================


async def test_batches_of_batch_size_and_results_in_input_order() -> None:
    """45 tasks with batch_size 20 → 3 POSTs of 20/20/5; the server answers each batch in
    reverse order, yet results come back in input order."""

    def reverse(body: list[dict[str, Any]]) -> Action:
        return Reply(200, {"data": [guide(t) for t in reversed(body)]})

    tasks = [task(i) for i in range(45)]
    ft = FakeTime()
    with scripted(handler=reverse) as srv:
        async with client_for(srv.url, ft, batch_size=20) as client:
            results = await client.preprocess_many(tasks)
    assert sorted(len(b) for b in srv.task_batches) == [5, 20, 20]
    sent = [t["taskUUID"] for b in srv.task_batches for t in b]
    assert sorted(sent) == sorted(t.taskUUID for t in tasks)  # each exactly once
    assert [r.taskUUID for r in results] == [t.taskUUID for t in tasks]
    assert all(isinstance(r, PreprocessResult) and r.is_complete for r in results)


async def test_per_task_errors_land_in_place_without_failing_siblings() -> None:
    """A 200 with data and errors side by side: the bad task's error is returned in its
    place, a non-retryable per-task error is not re-sent."""
    bad = task(1).taskUUID

    def mixed(body: list[dict[str, Any]]) -> Action:
        return Reply(
            200,
            {
                "data": [guide(t) for t in body if t["taskUUID"] != bad],
                "errors": [
                    {
                        "code": "invalidImage",
                        "message": "not an image",
                        "parameter": "inputs.image",
                        "taskUUID": bad,
                        "taskType": "controlNetPreprocess",
                    }
                ],
            },
        )

    ft = FakeTime()
    with scripted(handler=mixed) as srv:
        async with client_for(srv.url, ft) as client:
            out = await client.preprocess_many([task(0), task(1), task(2)])
            with pytest.raises(RunwareValidationError) as info:
                await client.preprocess(task(1))
    assert isinstance(out[0], PreprocessResult) and isinstance(out[2], PreprocessResult)
    assert isinstance(out[1], RunwareValidationError)
    assert (out[1].code, out[1].parameter, out[1].task_uuid) == (
        "invalidImage",
        "inputs.image",
        bad,
    )
    assert not out[1].retryable and out[1].http_status is None
    assert len(srv.requests) == 2 and ft.sleeps == []
    assert info.value.task_uuid == bad


async def test_transient_per_task_error_resends_only_that_task() -> None:
    flaky = task(1).taskUUID
    first = {"done": False}

    def handler(body: list[dict[str, Any]]) -> Action:
        if not first["done"]:
            first["done"] = True
            return Reply(
                200,
                {
                    "data": [guide(t) for t in body if t["taskUUID"] != flaky],
                    "errors": [{"code": "timeoutProvider", "message": "slow", "taskUUID": flaky}],
                },
            )
        return echo_all(body)

    ft = FakeTime()
    with scripted(handler=handler) as srv:
        async with client_for(srv.url, ft) as client:
            out = await client.preprocess_many([task(0), task(1)])
    assert all(isinstance(o, PreprocessResult) for o in out)
    assert [[t["taskUUID"] for t in b] for b in srv.task_batches] == [
        [task(0).taskUUID, flaky],
        [flaky],
    ]
    assert ft.sleeps == [0.25]


async def test_unanswered_siblings_of_a_rejected_task_are_resent() -> None:
    """A 400 naming one bad task leaves its siblings unanswered: they are re-sent (same
    taskUUIDs) and succeed; the bad one keeps its validation error."""
    bad = task(1).taskUUID
    ft = FakeTime()
    rejection = {"errors": [{"code": "invalidParameter", "message": "bad", "taskUUID": bad}]}
    with scripted(Reply(400, rejection), handler=echo_all) as srv:
        async with client_for(srv.url, ft) as client:
            out = await client.preprocess_many([task(0), task(1)])
    assert isinstance(out[0], PreprocessResult)
    assert isinstance(out[1], RunwareValidationError)
    assert (out[1].http_status, out[1].retryable) == (400, False)
    assert [[t["taskUUID"] for t in b] for b in srv.task_batches] == [
        [task(0).taskUUID, bad],
        [task(0).taskUUID],
    ]


async def test_error_without_task_uuid_applies_to_the_whole_batch() -> None:
    ft = FakeTime()
    rejection = {"errors": [{"code": "invalidParameter", "message": "batch too odd"}]}
    with scripted(handler=lambda body: Reply(400, rejection)) as srv:
        async with client_for(srv.url, ft) as client:
            out = await client.preprocess_many([task(2), task(3)])
            with pytest.raises(RunwareValidationError) as info:
                await client.preprocess(task(4))
    assert all(isinstance(o, RunwareValidationError) and o.message == "batch too odd" for o in out)
    assert [o.task_uuid for o in out] == [task(2).taskUUID, task(3).taskUUID]
    assert info.value.task_uuid == task(4).taskUUID  # single-task batch: it is that task's
    assert len(srv.requests) == 2 and ft.sleeps == []


async def test_auth_failure_raises_from_preprocess_many() -> None:
    ft = FakeTime()
    body = {
        "errors": [{"code": "invalidApiKey", "message": "Invalid API key", "parameter": "apiKey"}]
    }
    with scripted(handler=lambda b: Reply(401, body)) as srv:
        async with client_for(srv.url, ft, batch_size=2) as client:
            with pytest.raises(RunwareAuthError):
                await client.preprocess_many([task(i) for i in range(6)])
    assert 1 <= len(srv.requests) <= 3  # never retried


@pytest.mark.parametrize("spelling", ["controlNetPreprocess", "imageControlNetPreProcess"])
async def test_both_response_spellings_parse(spelling: str) -> None:
    """The verbatim docs response, in both taskType spellings."""
    legacy = task(7, form="legacy") if spelling.startswith("image") else task(7)
    item = {
        "taskType": spelling,
        "taskUUID": legacy.taskUUID,
        "guideImageUUID": "b6a06b3b-ce32-4884-ad93-c5eca7937ba0",
        "inputImageUUID": "ff1d9a0b-b80f-4665-ae07-8055b99f4aea",
        "guideImageURL": "https://im.runware.ai/image/ws/0.5/ii/b6a06b3b-ce32-4884-ad93-c5eca7937ba0.jpg",
        "cost": 0.0006,
    }
    ft = FakeTime()
    with scripted(Reply(200, {"data": [item]})) as srv:
        async with client_for(srv.url, ft) as client:
            result = await client.preprocess(legacy)
    assert result.taskType == spelling
    assert result.guideImageUUID == "b6a06b3b-ce32-4884-ad93-c5eca7937ba0"
    assert result.cost == 0.0006
    assert srv.task_batches[0][0]["taskType"] == legacy.taskType


# ============================================================================================
# Async delivery: getResponse polling
# ============================================================================================


def poller(frames: dict[str, list[dict[str, Any] | None]]) -> Handler:
    """Ack async submissions; answer each getResponse with the task's next frame.

    ``frames[uuid]`` is consumed one per poll; the last frame repeats (REST polling returns
    cumulative state). ``None`` means "no item for this task".
    """

    def handler(body: list[dict[str, Any]]) -> Action:
        if body[0]["taskType"] != "getResponse":
            return Reply(200, {"data": []})  # async ack
        data, errors = [], []
        for t in body:
            seq = frames[t["taskUUID"]]
            frame = seq.pop(0) if len(seq) > 1 else seq[0]
            if frame is not None and "code" in frame:
                errors.append(frame)
            elif frame is not None:
                data.append(frame)
        return Reply(200, {"data": data, "errors": errors})

    return handler


def processing(uuid: str) -> dict[str, Any]:
    return {"taskType": "controlNetPreprocess", "taskUUID": uuid, "status": "processing"}


async def test_async_polls_with_growing_waits_until_success() -> None:
    t = task(1, deliveryMethod="async")
    u = t.taskUUID
    done = guide({"taskType": "controlNetPreprocess", "taskUUID": u}, status="success")
    ft = FakeTime()
    with scripted(handler=poller({u: [processing(u), processing(u), done]})) as srv:
        async with client_for(srv.url, ft) as client:
            result = await client.preprocess(t)
    assert result.status == "success" and result.guideImageURL
    assert ft.sleeps == [1.0, 1.5, 2.25]
    assert [b[0]["taskType"] for b in srv.task_batches] == ["controlNetPreprocess"] + [
        "getResponse"
    ] * 3
    assert srv.task_batches[1] == [{"taskType": "getResponse", "taskUUID": u}]


async def test_poll_waits_are_capped_at_poll_max() -> None:
    t = task(1, deliveryMethod="async")
    u = t.taskUUID
    done = guide({"taskType": "controlNetPreprocess", "taskUUID": u}, status="success")
    ft = FakeTime()
    with scripted(handler=poller({u: [processing(u)] * 8 + [done]})) as srv:
        async with client_for(srv.url, ft) as client:
            await client.preprocess(t)
    assert ft.sleeps == [1.0, 1.5, 2.25, 3.375, 5.0625, 7.59375, 10.0, 10.0, 10.0]
    assert len(srv.requests) == 10


async def test_guide_image_without_status_completes_the_sdk_bug_case() -> None:
    """A result with guideImageURL and NO status field is complete (Runware's SDK misses it)."""
    t = task(1, deliveryMethod="async")
    u = t.taskUUID
    no_status = {
        "taskType": "controlNetPreprocess",
        "taskUUID": u,
        "guideImageUUID": "g-1",
        "guideImageURL": "https://im.runware.ai/guide.png",
    }
    ft = FakeTime()
    with scripted(handler=poller({u: [None, no_status]})) as srv:
        async with client_for(srv.url, ft) as client:
            result = await client.preprocess(t)
    assert result.status is None and result.guideImageURL == "https://im.runware.ai/guide.png"
    assert ft.sleeps == [1.0, 1.5] and len(srv.requests) == 3


async def test_status_success_without_guide_field_completes() -> None:
    t = task(1, deliveryMethod="async")
    u = t.taskUUID
    ok = {
        "taskType": "controlNetPreprocess",
        "taskUUID": u,
        "status": "success",
        "guideImageUUID": "b6a06b3b-ce32-4884-ad93-c5eca7937ba0",
    }
    ft = FakeTime()
    with scripted(handler=poller({u: [ok]})) as srv:
        async with client_for(srv.url, ft) as client:
            result = await client.preprocess(t)
    assert result.status == "success" and result.guideImageURL is None
    assert result.guideImageUUID == "b6a06b3b-ce32-4884-ad93-c5eca7937ba0"
    assert ft.sleeps == [1.0] and len(srv.requests) == 2


async def test_error_status_and_error_objects_fail_the_task() -> None:
    """``status: "error"`` with an embedded error object, and an ``errors`` entry for the
    taskUUID, each end polling for that task with a RunwareError; siblings still finish."""
    a, b, c = (task(i, deliveryMethod="async") for i in range(3))
    failed = {
        "taskType": "controlNetPreprocess",
        "taskUUID": a.taskUUID,
        "status": "error",
        "error": {"code": "inferenceError", "message": "one of N failed"},
    }
    rejected = {
        "code": "invalidImage",
        "message": "cannot decode",
        "taskUUID": b.taskUUID,
        "parameter": "inputs.image",
    }
    done = guide({"taskType": "controlNetPreprocess", "taskUUID": c.taskUUID})
    frames = {
        a.taskUUID: [processing(a.taskUUID), failed],
        b.taskUUID: [rejected],
        c.taskUUID: [None, None, done],
    }
    ft = FakeTime()
    with scripted(handler=poller(frames)) as srv:
        async with client_for(srv.url, ft) as client:
            out = await client.preprocess_many([a, b, c])
    assert type(out[0]) is RunwareError and out[0].code == "inferenceError"
    assert out[0].message == "one of N failed" and out[0].task_uuid == a.taskUUID
    assert isinstance(out[1], RunwareValidationError) and out[1].parameter == "inputs.image"
    assert isinstance(out[2], PreprocessResult)
    # several pending tasks share one getResponse POST, which shrinks as they finish
    polls = [sorted(t["taskUUID"] for t in body) for body in srv.task_batches[1:]]
    assert polls == [
        sorted([a.taskUUID, b.taskUUID, c.taskUUID]),
        sorted([a.taskUUID, c.taskUUID]),
        [c.taskUUID],
    ]
    assert ft.sleeps == [1.0, 1.5, 2.25]


async def test_poll_timeout_is_a_retryable_runware_timeout() -> None:
    t = task(1, deliveryMethod="async")
    ft = FakeTime()
    with scripted(handler=poller({t.taskUUID: [processing(t.taskUUID)]})) as srv:
        async with client_for(srv.url, ft, poll_timeout=5.0) as client:
            with pytest.raises(RunwareTimeout) as info:
                await client.preprocess(t)
    # 1 + 1.5 + 2.25 = 4.75 s, then the last 0.25 s up to the deadline, one final poll
    assert ft.sleeps == [1.0, 1.5, 2.25, 0.25]
    assert len(srv.requests) == 5
    assert info.value.retryable and info.value.task_uuid == t.taskUUID
    assert info.value.code == "pollTimeout"


async def test_sync_task_answered_processing_is_polled() -> None:
    """If a sync task comes back still ``processing`` (sync window exceeded), it is polled."""
    t = task(1)
    u = t.taskUUID
    done = guide({"taskType": "controlNetPreprocess", "taskUUID": u}, status="success")

    def handler(body: list[dict[str, Any]]) -> Action:
        if body[0]["taskType"] != "getResponse":
            return Reply(200, {"data": [processing(u)]})
        return Reply(200, {"data": [done]})

    ft = FakeTime()
    with scripted(handler=handler) as srv:
        async with client_for(srv.url, ft) as client:
            result = await client.preprocess(t)
    assert result.is_complete and ft.sleeps == [1.0] and len(srv.requests) == 2


async def test_get_response_returns_items_and_errors() -> None:
    u = task(1).taskUUID
    body = {"data": [processing(u)], "errors": [{"code": "x", "message": "y", "taskUUID": u}]}
    ft = FakeTime()
    with scripted(Reply(200, body)) as srv:
        async with client_for(srv.url, ft) as client:
            out = await client.get_response(u)
    assert isinstance(out[0], PreprocessResult) and out[0].status == "processing"
    assert isinstance(out[1], ErrorObject) and out[1].code == "x"
    assert srv.task_batches == [[{"taskType": "getResponse", "taskUUID": u}]]


# ============================================================================================
# API key handling
# ============================================================================================


async def test_api_key_is_sent_as_bearer_and_never_shown_or_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Header sent; not in repr/str; not in any log record at DEBUG (aiohttp, httpx and
    httpcore included), nor in an exception message even when the server echoes it back."""
    caplog.set_level(logging.DEBUG)
    for name in ("aiohttp", "httpx", "httpcore", "connectors.runware"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    ft = FakeTime()
    echo = {"errors": [{"code": "invalidApiKey", "message": f"key {API_KEY} is not valid"}]}
    with scripted(
        Reply(503, {"errors": []}),
        Reply(200, {"data": [{"taskType": "ping", "pong": True}]}),
        Reply(401, echo),
        Reply(404, f"no {API_KEY}".encode()),
    ) as srv:
        async with client_for(srv.url, ft) as client:
            assert await client.ping() is False  # 503: ping makes one attempt only
            assert await client.ping() is True
            with pytest.raises(RunwareAuthError) as auth:
                await client.send([task(1)])
            with pytest.raises(RunwareValidationError) as not_found:
                await client.send([task(1)])
            shown = repr(client) + str(client)
    assert srv.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in shown and "api_key='***'" in shown
    for err in (auth.value, not_found.value):
        assert API_KEY not in str(err) and API_KEY not in repr(err.error)
        assert "***" in str(err)
    assert any(r.getMessage().startswith("POST ") for r in caplog.records)  # DEBUG was on
    assert API_KEY not in caplog.text


async def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNWARE_API_KEY", "env-key-42")
    with scripted(Reply(200, {"data": [{"taskType": "ping", "pong": True}]})) as srv:
        async with RunwareClient(base_url=srv.url) as client:
            assert await client.ping()
    assert srv.requests[0].headers["authorization"] == "Bearer env-key-42"
    monkeypatch.delenv("RUNWARE_API_KEY")
    with pytest.raises(RunwareAuthError) as info:
        RunwareClient(base_url=srv.url)
    assert info.value.code == "missingApiKey"


@pytest.fixture(scope="module")
def prefect_secret_block(prefect_harness: None) -> Iterator[str]:
    """A real Prefect Secret block on the session's ephemeral Prefect server."""
    from prefect.blocks.system import Secret

    Secret(value="block-key-7").save("runware-test-key", overwrite=True)
    yield "runware-test-key"


async def test_api_key_from_prefect_secret_block(prefect_secret_block: str) -> None:
    with scripted(Reply(200, {"data": [{"taskType": "ping", "pong": True}]})) as srv:
        client = await RunwareClient.from_prefect_secret(prefect_secret_block, base_url=srv.url)
        async with client:
            assert await client.ping()
            assert "block-key-7" not in repr(client)
    assert srv.requests[0].headers["authorization"] == "Bearer block-key-7"


# ============================================================================================
# imageUpload, errors
# ============================================================================================


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "media"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
async def test_upload_image_bytes_as_data_uri_with_sniffed_type(fmt: str, media: str) -> None:
    raw = _encoded(fmt)

    def handler(body: list[dict[str, Any]]) -> Action:
        return Reply(
            200,
            {
                "data": [
                    {
                        "taskType": "imageUpload",
                        "taskUUID": body[0]["taskUUID"],
                        "imageUUID": "989ba605-1449-4e1e-b462-cd83ec9c1a67",
                    }
                ]
            },
        )

    ft = FakeTime()
    with scripted(handler=handler) as srv:
        async with client_for(srv.url, ft) as client:
            result = await client.upload_image(raw)
            with pytest.raises(RunwareValidationError):
                await client.upload_image(b"%PDF-1.4 not an image")
    assert result.imageUUID == "989ba605-1449-4e1e-b462-cd83ec9c1a67"
    (sent,) = srv.task_batches[0]  # the PDF never left the client
    assert len(srv.requests) == 1
    prefix = f"data:{media};base64,"
    assert sent["image"].startswith(prefix)
    assert base64.b64decode(sent["image"][len(prefix) :]) == raw


@pytest.mark.parametrize(
    ("code", "status", "cls", "retryable"),
    [
        ("invalidApiKey", None, RunwareAuthError, False),
        (None, 401, RunwareAuthError, False),
        (None, 403, RunwareAuthError, False),
        (None, 402, RunwareCreditError, False),
        ("insufficientCredits", None, RunwareCreditError, False),
        (None, 429, RunwareRateLimited, True),
        (None, 408, RunwareTimeout, True),
        (None, 503, RunwareServerError, True),
        (None, 501, RunwareServerError, False),
        ("timeoutProvider", None, RunwareTimeout, True),
        ("internalError", None, RunwareServerError, True),
        ("modelUnavailable", None, RunwareServerError, False),
        ("invalidImage", None, RunwareValidationError, False),
        ("forbiddenURL", None, RunwareValidationError, False),
        ("timeoutProvider", 400, RunwareTimeout, False),  # never retry a 400
        (None, 400, RunwareValidationError, False),
        ("somethingNew", None, RunwareError, False),
    ],
)
def test_error_mapping(code: str | None, status: int | None, cls: type, retryable: bool) -> None:
    err_obj = ErrorObject(code=code, message="m") if code else None
    err = error_from(err_obj, http_status=status)
    assert type(err) is cls
    assert err.retryable is retryable


def test_errors_pickle_and_attribute_to_tasks() -> None:
    """Prefect pickles task results: a typed error survives the round trip intact."""
    err = error_from(
        ErrorObject(code="rateLimitExceeded", message="m"), http_status=429, retry_after=3.0
    )
    clone = pickle.loads(pickle.dumps(err.for_task("u-1")))
    assert type(clone) is RunwareRateLimited
    assert (clone.task_uuid, clone.retry_after, clone.retryable, clone.http_status) == (
        "u-1",
        3.0,
        True,
        429,
    )
    assert clone.error.taskUUID == "u-1" and "u-1" in str(clone)
    assert err.task_uuid is None


# ============================================================================================
# End to end: the client against guideflow's real server (tests/live_server.py)
# ============================================================================================

LIVE_KEY = "live-key-for-client-tests"


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    """One real guideflow server (uvicorn on 127.0.0.1) requiring ``LIVE_KEY``; its /v1 URL."""
    from tests.live_server import run_server, test_config

    config = test_config(no_auth=False, api_keys=(LIVE_KEY,), queue_size=64)
    with run_server(config) as base:
        yield f"{base}/v1"


@pytest.fixture(scope="module")
def small_photo(images_dir: Any) -> bytes:
    """A real photo (RGBA PNG), downscaled to keep the round trips quick."""
    with Image.open(images_dir / "room.png") as im:
        im = im.resize((im.width // 3, im.height // 3))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


def live_client(url: str, **kw: Any) -> RunwareClient:
    kw.setdefault("poll_initial", 0.02)
    kw.setdefault("poll_max", 0.2)
    return RunwareClient(LIVE_KEY, url, **kw)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.parametrize("form", ["new", "legacy"])
async def test_live_sync_canny_both_forms_match_the_engine(
    live: str, small_photo: bytes, form: str
) -> None:
    """Both request forms through the client return exactly the engine's local output."""
    from engine.api import Engine

    settings = {"lowThresholdCanny": 50, "highThresholdCanny": 150}
    t = PreprocessTask.build(
        "canny",
        data_uri(small_photo),
        form=form,
        settings=settings,
        outputType="base64Data",
        outputFormat="PNG",
    )
    async with live_client(live) as client:
        result = await client.preprocess(t)
    expected = Engine().preprocess(small_photo, "canny", settings, output_format="PNG").data
    assert result.taskType == t.taskType and result.taskUUID == t.taskUUID
    assert result.guide_bytes() == expected
    assert result.cost is None  # includeCost not asked


async def test_live_async_delivery_polls_get_response(live: str, small_photo: bytes) -> None:
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)
        await asyncio.sleep(s)

    t = PreprocessTask.build("canny", data_uri(small_photo), deliveryMethod="async")
    async with live_client(live, sleep=sleep) as client:
        result = await client.preprocess(t)
        polled = await client.get_response(t.taskUUID)
        image = await _fetch(result.guideImageURL)
    assert result.is_complete and result.guideImageURL
    assert waits[0] == 0.02
    assert all(b == min(a * 1.5, 0.2) for a, b in itertools.pairwise(waits))
    (item,) = polled
    assert isinstance(item, PreprocessResult) and item.status == "success"
    assert item.guideImageUUID == result.guideImageUUID
    assert Image.open(io.BytesIO(image)).size == Image.open(io.BytesIO(small_photo)).size


async def _fetch(url: str | None) -> bytes:
    import httpx

    assert url is not None
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    response.raise_for_status()
    return response.content


async def test_live_upload_then_preprocess_by_uuid(live: str, small_photo: bytes) -> None:
    async with live_client(live) as client:
        upload = await client.upload_image(small_photo)
        by_uuid = await client.preprocess(
            PreprocessTask.build(
                "canny", upload.imageUUID, outputType="base64Data", outputFormat="PNG"
            )
        )
        inline = await client.preprocess(
            PreprocessTask.build(
                "canny", data_uri(small_photo), outputType="base64Data", outputFormat="PNG"
            )
        )
    assert by_uuid.inputImageUUID == upload.imageUUID
    assert by_uuid.guide_bytes() == inline.guide_bytes()


async def test_live_mixed_batch_errors_in_place(live: str, small_photo: bytes) -> None:
    """Bad preprocessor (rejected at validation) and a truncated PNG (fails at decode)
    next to good tasks: errors in place, good results untouched, one POST's worth."""
    good = data_uri(small_photo)
    junk = data_uri(small_photo[:300])  # a PNG cut short
    tasks = [
        PreprocessTask.build("canny", good),
        PreprocessTask.build("nosuchpreprocessor", good),
        PreprocessTask.build("canny", junk),
        PreprocessTask.build("canny", good, includeCost=True),
    ]
    async with live_client(live) as client:
        out = await client.preprocess_many(tasks)
    assert isinstance(out[0], PreprocessResult) and isinstance(out[3], PreprocessResult)
    assert isinstance(out[1], RunwareValidationError) and out[1].parameter == "model"
    assert isinstance(out[2], RunwareValidationError) and out[2].code == "invalidImage"
    assert [o.task_uuid for o in out[1:3]] == [t.taskUUID for t in tasks[1:3]]
    assert not out[1].retryable and not out[2].retryable


async def test_live_include_cost_and_idempotent_resend(live: str, small_photo: bytes) -> None:
    """includeCost adds the canny price; re-sending a taskUUID (what a retry does) returns
    the stored result rather than new work."""
    from guideflow.pricing import PriceTable

    t = PreprocessTask.build("canny", data_uri(small_photo), includeCost=True)
    async with live_client(live) as client:
        first = await client.preprocess(t)
        again = await client.preprocess(t)
    assert first.cost == PriceTable.load().price("canny") > 0
    assert again.guideImageUUID == first.guideImageUUID


async def test_live_auth_failure(live: str, small_photo: bytes) -> None:
    async with RunwareClient("wrong-key", live) as client:
        with pytest.raises(RunwareAuthError) as info:
            await client.preprocess(PreprocessTask.build("canny", data_uri(small_photo)))
        with pytest.raises(RunwareAuthError):
            await client.ping()
    assert info.value.http_status == 401 and info.value.code == "invalidApiKey"
    assert not info.value.retryable and "wrong-key" not in str(info.value)
    async with live_client(live) as client:
        assert await client.ping() is True


async def test_live_over_capacity_429_is_retried_after_retry_after(
    small_photo: bytes,
) -> None:
    """A queue of 1 and 6 concurrent single-task POSTs: the server answers 429 with
    Retry-After: 1; the client waits at least that long and every task succeeds."""
    from tests.live_server import run_server, test_config

    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)
        await asyncio.sleep(0.02)  # recorded, not really waited: keeps the test quick

    tasks = [PreprocessTask.build("canny", data_uri(small_photo)) for _ in range(6)]
    with run_server(test_config(queue_size=1)) as base:
        async with RunwareClient(
            "any", f"{base}/v1", batch_size=1, max_concurrency=6, max_retries=50, sleep=sleep
        ) as client:
            out = await client.preprocess_many(tasks)
    assert all(isinstance(o, PreprocessResult) for o in out)
    assert waits and all(w >= 1.0 for w in waits)


# ============================================================================================
# The wire: aiohttp by default, httpx with a transport of one's own
# ============================================================================================


@pytest.mark.parametrize("wire", ["aiohttp", "httpx"])
async def test_both_wires_send_the_same_request_and_map_failures_alike(wire: str) -> None:
    """The default aiohttp wire and the httpx one (taken when a transport is given; here a
    real network transport) send the same headers and body, retry a 503 and a dropped
    connection, read a truncated body as retryable ``invalidResponse``, and name a refused
    connection ``connectionError``."""
    from connectors.http_wire import AiohttpWire, HttpxWire

    kw: dict[str, Any] = {"transport": httpx.AsyncHTTPTransport()} if wire == "httpx" else {}
    ft = FakeTime()
    ok = Reply(200, {"data": [{"taskType": "ping", "pong": True}]})
    with scripted(Reply(503, {"errors": []}), Drop(), Truncated(), ok) as srv:
        async with client_for(srv.url, ft, max_retries=3, **kw) as client:
            assert isinstance(client._http, AiohttpWire if wire == "aiohttp" else HttpxWire)
            response = await client.send([PingTask()])
    assert response.data == [{"taskType": "ping", "pong": True}]
    assert len(srv.requests) == 4 and len(ft.sleeps) == 3
    first = srv.requests[0]
    assert first.headers["authorization"] == f"Bearer {API_KEY}"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"].startswith("guideflow/")
    assert first.body == [{"taskType": "ping", "ping": True}]

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    closed_url = f"http://127.0.0.1:{port.getsockname()[1]}/v1"
    port.close()
    async with client_for(closed_url, FakeTime(), max_retries=0, **kw) as client:
        with pytest.raises(RunwareConnectionError) as refused:
            await client.send([PingTask()])
    assert refused.value.code == "connectionError" and refused.value.retryable


def test_aiohttp_wire_times_out_and_serves_a_new_event_loop() -> None:
    """A slow answer is ``requestTimeout``; a client first used under one event loop
    still works under the next (its session belongs to the loop that made it)."""

    def slow(_: list[dict[str, Any]]) -> Action:
        time.sleep(1.5)
        return Reply(200, {"data": []})

    def in_new_loop(coro: Any) -> Any:  # a fresh thread, so a fresh loop, each time
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    with scripted(handler=slow) as srv:
        client = client_for(srv.url, FakeTime(), max_retries=0, timeout=0.5)
        with pytest.raises(RunwareTimeout) as late:
            in_new_loop(client.send([PingTask()]))
        assert late.value.code == "requestTimeout"
        srv.handler = lambda _: Reply(200, {"data": [{"taskType": "ping", "pong": True}]})
        assert in_new_loop(client.send([PingTask()])).data[0]["pong"] is True
        in_new_loop(client.aclose())
    assert client._http.is_closed


def test_proxies_come_from_the_environment_like_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.http_wire import env_proxy

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert env_proxy("https://api.runware.ai/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,.corp")
    assert env_proxy("https://api.runware.ai/v1") == "http://proxy.internal:3128"
    assert env_proxy("http://api.runware.ai/v1") is None  # no HTTP_PROXY
    assert env_proxy("https://127.0.0.1:8000/v1") is None
    assert env_proxy("https://gpu.corp/v1") is None
