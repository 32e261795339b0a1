"""An async client for Runware's REST API (``POST /v1``), and for guideflow's own server.

``RunwareClient`` speaks the protocol modelled in :mod:`guideflow.protocol`: every request
is built from those models, every response item parsed back into them. It is the fast
path the pipeline uses to turn many images into guide images::

    async with RunwareClient() as client:          # key from RUNWARE_API_KEY
        results = await client.preprocess_many(tasks)
    for task, outcome in zip(tasks, results):
        if isinstance(outcome, RunwareError): ...  # per-task error, in place

What it does for you:

* **Batching.** ``preprocess_many`` sends up to ``batch_size`` tasks per POST (the API
  takes arrays) and runs up to ``max_concurrency`` POSTs at once over one connection
  pool (aiohttp; httpx with a custom ``transport`` or ``http2``: see
  :mod:`connectors.http_wire`). Results come back in input order; a task's error is returned in
  its place and never fails its siblings.
* **Retries.** Every POST is retried on HTTP 408/429/500/502/503/504, timeouts,
  connection errors, a connection dropped mid-response and unreadable (truncated, non-JSON)
  bodies, with full-jitter exponential backoff and ``Retry-After`` honoured as the minimum
  wait. 400, 401, 402, 403 and other client errors are never retried. Per-task errors in a
  successful response are retried only when their code is transient (see
  :func:`is_retryable_code`), and tasks a response leaves unanswered are re-sent.
  **Retries re-send the same taskUUIDs**: Runware and guideflow's server treat a taskUUID
  idempotently (guideflow's server answers a completed taskUUID with its stored result),
  so a retry after a lost response does not redo or re-bill the work.
* **Async delivery.** Tasks with ``deliveryMethod="async"`` are submitted, then polled
  with ``getResponse`` (several pending tasks per POST), waiting ``poll_initial`` seconds
  and then ×``poll_factor`` up to ``poll_max`` between polls, until each task completes,
  fails, or ``poll_timeout`` runs out (:class:`RunwareTimeout`). A task counts as complete
  when ``status == "success"`` *or* a guide image field is present
  (:attr:`PreprocessResult.is_complete`); Runware's own SDK only recognises ``imageURL`` /
  ``status == "completed"`` and so polls finished preprocess tasks until it times out.
* **Typed errors.** Every failure is a :class:`RunwareError` subclass carrying the error
  object, code, parameter, taskUUID, HTTP status and whether retrying can help; see
  :func:`error_from`.
* **The API key** comes from the argument, ``RUNWARE_API_KEY`` or a Prefect Secret block
  (:meth:`RunwareClient.from_prefect_secret`), travels only in the ``Authorization:
  Bearer`` header, and is never logged, shown in ``repr`` or put in an exception message.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import importlib.util
import json
import logging
import os
import random as _random
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import httpx
import orjson
from pydantic import TypeAdapter, ValidationError

from connectors.http_wire import (
    AiohttpWire,
    HttpxWire,
    Wire,
    WireConnectionError,
    WireResponse,
    WireTimeout,
)
from guideflow import __version__
from guideflow.protocol import (
    ApiResponse,
    ErrorObject,
    GetResponseTask,
    ImageUploadResult,
    ImageUploadTask,
    PingTask,
    PreprocessResult,
    PreprocessTask,
    ProtocolModel,
    StampedTask,
    new_task_uuid,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "RETRYABLE_STATUSES",
    "RunwareAuthError",
    "RunwareClient",
    "RunwareConnectionError",
    "RunwareCreditError",
    "RunwareError",
    "RunwareRateLimited",
    "RunwareServerError",
    "RunwareTimeout",
    "RunwareValidationError",
    "error_from",
    "is_retryable_code",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.runware.ai/v1"
API_KEY_ENV = "RUNWARE_API_KEY"

#: HTTP statuses that mean "try again later" (Runware's rate-limit page calls 429/503/504
#: transient; 408/500/502 are the usual proxy/server hiccups).
RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


# ============================================================================================
# Errors
# ============================================================================================


class RunwareError(Exception):
    """A failed request or task, with Runware's error object and whether a retry can help.

    Attributes: ``code``, ``message``, ``parameter``, ``task_uuid`` (``None`` for
    request-level failures), ``http_status`` (``None`` when the failure was per-task in a
    2xx response, or never reached the server), ``retryable`` and ``error`` (the
    :class:`ErrorObject`, synthesised for transport failures).
    """

    default_code: ClassVar[str] = "runwareError"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        parameter: str | None = None,
        task_uuid: str | None = None,
        task_type: str | None = None,
        http_status: int | None = None,
        retryable: bool | None = None,
        error: ErrorObject | None = None,
    ) -> None:
        if parameter is None and error is not None:
            parameter = error.parameter
        if task_uuid is None and error is not None:
            task_uuid = error.taskUUID
        self.code: str = code or (error.code if error else self.default_code)
        self.message = message
        self.parameter = parameter
        self.task_uuid = task_uuid
        self.attempts = 1
        self.http_status = http_status
        self.retryable = self.default_retryable if retryable is None else retryable
        self.error = error or ErrorObject(
            code=self.code,
            message=message,
            parameter=self.parameter,
            taskType=task_type,
            taskUUID=self.task_uuid,
        )
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [f"{self.code}: {self.message}"]
        if self.parameter:
            parts.append(f"(parameter: {self.parameter})")
        if self.task_uuid:
            parts.append(f"[task {self.task_uuid}]")
        if self.http_status is not None:
            parts.append(f"[HTTP {self.http_status}]")
        if self.attempts > 1:
            parts.append(f"(gave up after {self.attempts} attempts)")
        return " ".join(parts)

    def _refresh(self) -> None:
        Exception.__init__(self, self._describe())

    def for_task(self, task_uuid: str) -> RunwareError:
        """A copy of this (request-level) error attributed to one task of the request."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.task_uuid = task_uuid
        clone.error = self.error.model_copy(update={"taskUUID": task_uuid})
        clone._refresh()
        clone.__cause__ = self.__cause__
        return clone

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only __init__ breaks Exception's default pickling; Prefect pickles results.
        return (_restore_error, (type(self), self.__dict__.copy()))


def _restore_error(cls: type[RunwareError], state: dict[str, Any]) -> RunwareError:
    err = cls.__new__(cls)
    err.__dict__.update(state)
    err._refresh()
    return err


class RunwareValidationError(RunwareError):
    """The request or task is invalid (HTTP 400 and other 4xx, ``invalid*`` codes)."""

    default_code = "invalidParameter"


class RunwareAuthError(RunwareError):
    """The API key is missing, invalid or not allowed (HTTP 401/403, ``invalidApiKey``)."""

    default_code = "invalidApiKey"


class RunwareCreditError(RunwareError):
    """The account cannot pay for the request (HTTP 402)."""

    default_code = "insufficientCredits"


class RunwareRateLimited(RunwareError):
    """Too many requests (HTTP 429); ``retry_after`` is the server's wait in seconds, if any."""

    default_code = "rateLimitExceeded"
    default_retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)


class RunwareServerError(RunwareError):
    """The server failed (HTTP 5xx, ``internalError``); usually worth retrying."""

    default_code = "serverError"
    default_retryable = True


class RunwareTimeout(RunwareError):
    """A request timed out, or an async task did not finish within ``poll_timeout``."""

    default_code = "timeout"
    default_retryable = True


class RunwareConnectionError(RunwareError):
    """The server could not be reached, or dropped the connection, or sent an unreadable body."""

    default_code = "connectionError"
    default_retryable = True


# -- code table -------------------------------------------------------------------------------

#: Per-task error codes worth retrying (matched case-insensitively as substrings). Runware's
#: docs name only ``timeoutProvider``; the rest are the generic transient spellings its SDKs
#: and guideflow's server use. Everything else (``invalid*``, ``missing*``, ``unsupported*``,
#: ``imageTooLarge``, ``modelUnavailable``, ``modelCorrupt``, safety and auth codes) is final.
RETRYABLE_CODE_PARTS: tuple[str, ...] = (
    "timeout",
    "ratelimit",
    "toomanyrequests",
    "serviceunavailable",
    "serverbusy",
    "overloaded",
    "internalerror",
    "servererror",
    "connectionerror",
    "noresult",
)
_AUTH_CODES = frozenset(
    {
        "unauthorized",
        "forbidden",
        "permissiondenied",
        "insufficientpermissions",
        "authenticationfailed",
        "authfailed",
        "invalidauthentication",
        "invalidcredentials",
        "missingauthentication",
    }
)
_CREDIT_CODE_PARTS = ("credit", "balance", "quota", "paymentrequired")
_SERVER_CODES = frozenset({"internalerror", "servererror", "modelunavailable", "modelcorrupt"})


def is_retryable_code(code: str) -> bool:
    """Whether a per-task error ``code`` is transient (see :data:`RETRYABLE_CODE_PARTS`)."""
    low = code.lower()
    return any(part in low for part in RETRYABLE_CODE_PARTS)


def error_from(
    error: ErrorObject | None = None,
    *,
    http_status: int | None = None,
    retry_after: float | None = None,
    message: str | None = None,
    task_uuid: str | None = None,
) -> RunwareError:
    """THE mapping from an error object and/or HTTP status to a typed :class:`RunwareError`.

    Auth, credit, rate-limit and timeout *codes* win (a per-task ``invalidApiKey`` in a
    200 is still an auth error); then the HTTP status (401/403 auth, 402 credit, 429 rate,
    408 timeout, 5xx server, other 4xx validation); then the code's shape. ``retryable``
    follows the status for request-level failures, :func:`is_retryable_code` for per-task
    ones, and an explicit boolean ``retryable`` field in the error object if a server sends
    one.
    """
    code = error.code if error else None
    text = message or (error.message if error else None) or f"HTTP {http_status}"
    low = (code or "").lower()
    cls: type[RunwareError]
    if "apikey" in low or low in _AUTH_CODES:
        cls = RunwareAuthError
    elif any(p in low for p in _CREDIT_CODE_PARTS):
        cls = RunwareCreditError
    elif "ratelimit" in low or "toomanyrequests" in low:
        cls = RunwareRateLimited
    elif "timeout" in low:
        cls = RunwareTimeout
    elif http_status in (401, 403):
        cls = RunwareAuthError
    elif http_status == 402:
        cls = RunwareCreditError
    elif http_status == 429:
        cls = RunwareRateLimited
    elif http_status == 408:
        cls = RunwareTimeout
    elif http_status is not None and http_status >= 500:
        cls = RunwareServerError
    elif http_status is not None and 400 <= http_status < 500:
        cls = RunwareValidationError
    elif low in _SERVER_CODES:
        cls = RunwareServerError
    elif low.startswith(("invalid", "missing", "unsupported", "forbidden")) or low.endswith(
        "toolarge"
    ):
        cls = RunwareValidationError
    else:
        cls = RunwareError

    explicit = (error.model_extra or {}).get("retryable") if error else None
    if http_status is not None and http_status >= 400:
        retryable = http_status in RETRYABLE_STATUSES  # never retry a 4xx other than 408/429
    elif isinstance(explicit, bool):
        retryable = explicit
    elif code is not None:
        retryable = is_retryable_code(code)
    else:
        retryable = cls.default_retryable
    kw: dict[str, Any] = {}
    if cls is RunwareRateLimited:
        kw["retry_after"] = retry_after
    return cls(
        text,
        code=code,
        error=error,
        http_status=http_status,
        retryable=retryable,
        task_uuid=task_uuid,
        **kw,
    )


# ============================================================================================
# Response handling helpers
# ============================================================================================


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP-date; ``None`` if absent/bad."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


_STATUS_ALIASES = {
    "success": "success",
    "completed": "success",
    "complete": "success",
    "error": "error",
    "failed": "error",
}


def parse_preprocess_item(item: Mapping[str, Any]) -> PreprocessResult | None:
    """A response item as a :class:`PreprocessResult`, or ``None`` if it is not one.

    Lenient about status: ``success``/``completed`` → ``success``, ``error``/``failed``
    → ``error``, anything else present (``processing``, the older docs' ``pending``) →
    ``processing``. Both taskType spellings parse; other fields are kept as extras.
    """
    data = _result_candidate(item)
    if data is None:
        return None
    try:
        return PreprocessResult.model_validate(data)
    except ValidationError:
        return None


def parse_preprocess_items(items: Sequence[Any]) -> list[PreprocessResult]:
    """Every item of a response's ``data`` that is a preprocess result (see
    :func:`parse_preprocess_item`), validated in one call when all of them are."""
    candidates = [c for c in map(_result_candidate, items) if c is not None]
    try:
        return _RESULTS.validate_python(candidates)
    except ValidationError:  # some item is not a result: sort them out one by one
        return [r for r in map(parse_preprocess_item, candidates) if r is not None]


def _result_candidate(item: Any) -> dict[str, Any] | None:
    """``item`` with its status normalised, or ``None`` when it has no taskUUID."""
    if not isinstance(item, Mapping) or not isinstance(item.get("taskUUID"), str):
        return None
    data = dict(item)
    status = data.get("status")
    if status is not None and status not in _RESULT_STATUSES:
        data["status"] = _STATUS_ALIASES.get(str(status).lower(), "processing")
    return data


_RESULTS = TypeAdapter(list[PreprocessResult])
_RESULT_STATUSES = frozenset({"processing", "success", "error"})


def _embedded_error(result: PreprocessResult) -> ErrorObject:
    """The error object of a ``status == "error"`` item (``{"error": {...}}``), or a generic one."""
    raw = (result.model_extra or {}).get("error")
    if isinstance(raw, Mapping):
        try:
            return ErrorObject.model_validate(
                {"taskUUID": result.taskUUID, "taskType": result.taskType, **raw}
            )
        except ValidationError:
            pass
    message = raw if isinstance(raw, str) and raw else "the task failed"
    return ErrorObject(
        code="taskFailed", message=message, taskUUID=result.taskUUID, taskType=result.taskType
    )


@dataclass
class _Envelope:
    """A parsed response body plus the HTTP status it came with."""

    response: ApiResponse
    http_status: int
    retry_after: float | None = None
    items: dict[str, list[PreprocessResult]] = field(default_factory=dict)
    tagged: dict[str, ErrorObject] = field(default_factory=dict)
    untagged: list[ErrorObject] = field(default_factory=list)

    @classmethod
    def of(cls, response: ApiResponse, http_status: int, retry_after: float | None) -> _Envelope:
        env = cls(response, http_status, retry_after)
        for result in parse_preprocess_items(response.data):
            env.items.setdefault(result.taskUUID, []).append(result)
        for err in response.errors:
            if err.taskUUID:
                env.tagged.setdefault(err.taskUUID, err)
            else:
                env.untagged.append(err)
        return env

    def error_for(self, task_uuid: str) -> ErrorObject | None:
        """The error that belongs to a task: its own, else an untagged one.

        An error without taskUUID belongs to the task when the request held one task, and
        otherwise applies to the whole request, i.e. to every task without a result.
        """
        if task_uuid in self.tagged:
            return self.tagged[task_uuid]
        if self.untagged:
            return self.untagged[0]
        return None

    def first_error(self) -> ErrorObject | None:
        return self.response.errors[0] if self.response.errors else None


class _Pending:
    """Marker outcome: the task is still processing (poll it)."""


PENDING = _Pending()


def _classify(
    task: PreprocessTask | StampedTask, env: _Envelope, *, polling: bool = False
) -> PreprocessResult | RunwareError | _Pending:
    """What one submitted task ended as in a response: result, error, pending or unanswered.

    Precedence: a complete result (the work is done), then the task's error (its own
    ``errors`` entry, an item with ``status == "error"``, or a request-wide error), then
    pending (async tasks without output, any item still ``processing``), else a retryable
    ``noResult`` error (the server did not answer this task; re-sending is idempotent).
    """
    uuid = task.taskUUID
    items = env.items.get(uuid, [])
    is_async = polling or task.deliveryMethod == "async"
    for item in items:
        if item.is_complete:
            return item
        if not is_async and item.status is None and item.guideImageUUID:
            return item  # sync result whose guide image went elsewhere (uploadEndpoint)
    for item in items:
        if item.status == "error":
            return error_from(_embedded_error(item), task_uuid=uuid)
    err = env.error_for(uuid)
    if err is not None:
        status = env.http_status if env.http_status >= 400 else None
        return error_from(err, http_status=status, retry_after=env.retry_after, task_uuid=uuid)
    if is_async or items:
        return PENDING
    return RunwareServerError(
        "the response had neither a result nor an error for this task",
        code="noResult",
        task_uuid=uuid,
        http_status=env.http_status if env.http_status >= 400 else None,
        retryable=True,
    )


# ============================================================================================
# The client
# ============================================================================================

Sleep = Callable[[float], Awaitable[Any]]


class RunwareClient:
    """Async client for Runware's REST API (and guideflow's compatible server).

    Parameters:
        api_key: the API key; default ``$RUNWARE_API_KEY`` (see also
            :meth:`from_prefect_secret`). Sent as ``Authorization: Bearer <key>`` only.
        base_url: the endpoint that takes ``POST`` task arrays.
        batch_size: tasks per POST in :meth:`preprocess_many` (and per ``getResponse`` poll).
        max_concurrency: POSTs in flight at once (also sizes the connection pool).
        timeout: seconds for each HTTP request (connect, read, write, pool).
        max_retries: retries after the first attempt (so at most ``max_retries + 1`` POSTs
            for one request, and ``max_retries`` re-sends of a task with a transient error).
        backoff_base, backoff_max: the backoff before retry *n* (0-based) is
            ``min(backoff_max, backoff_base * 2**n) * random()`` ("full jitter"), and at
            least the server's ``Retry-After``.
        poll_initial, poll_factor, poll_max: waits between ``getResponse`` polls for async
            tasks: ``poll_initial``, then ×``poll_factor``, capped at ``poll_max``.
        poll_timeout: seconds an async task may stay pending before :class:`RunwareTimeout`.
        transport: an ``httpx.AsyncBaseTransport`` to use instead of the network.
        sleep, random, clock: injectable for tests (``asyncio.sleep``, ``random.random``,
            ``time.monotonic``): every wait goes through ``sleep``, every jitter through
            ``random``, the poll deadline through ``clock``.
        retry_after_max: a ``Retry-After`` longer than this is not slept through: the
            request fails at once with :class:`RunwareRateLimited` (``.retry_after`` set)
            so the caller can reschedule instead of holding a worker.
        http2: speak HTTP/2 when the server offers it (needs ``h2``). Off by default:
            requests carry images as ~380 KB of base64 each (512²), and httpx's pure-Python
            HTTP/2 stack frames them in 16 KB DATA frames under per-stream flow control,
            costing ~8 ms of client CPU per such request against ~1.5 ms over HTTP/1.1
            (loopback, measured for issue 4), plus window-update round trips on real
            links. Concurrency comes from ``max_concurrency`` pooled HTTP/1.1 connections.

    A client holds one connection pool (aiohttp, HTTP/1.1; or an ``httpx.AsyncClient`` with
    a custom ``transport`` or ``http2``: see :mod:`connectors.http_wire`),
    bound to the event loop that first uses it: use one client per loop, and close it
    (``async with`` or :meth:`aclose`). Transport retries (per POST) and per-task re-sends
    (per task with a transient error) are separate budgets of ``max_retries`` each.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        batch_size: int = 20,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        poll_initial: float = 1.0,
        poll_factor: float = 1.5,
        poll_max: float = 10.0,
        poll_timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
        retry_after_max: float = 120.0,
        http2: bool = False,
    ) -> None:
        if batch_size < 1 or max_concurrency < 1 or max_retries < 0:
            raise ValueError("batch_size and max_concurrency must be ≥ 1, max_retries ≥ 0")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if not key:
            raise RunwareAuthError(
                f"no API key: pass api_key=, set {API_KEY_ENV}, or use "
                "RunwareClient.from_prefect_secret(block_name)",
                code="missingApiKey",
                parameter="apiKey",
            )
        self._api_key = key
        self.base_url = base_url
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.poll_initial = poll_initial
        self.poll_factor = poll_factor
        self.poll_max = poll_max
        self.poll_timeout = poll_timeout
        self.retry_after_max = retry_after_max
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self._semaphore = asyncio.Semaphore(max_concurrency)
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"guideflow/{__version__}",
        }
        wire_options: dict[str, Any] = {
            "timeout": timeout,
            "max_connections": max_concurrency,
            "ssl_context": shared_ssl_context(),
        }
        use_h2 = http2 and transport is None and importlib.util.find_spec("h2") is not None
        self._http: Wire = (
            HttpxWire(headers, transport=transport, http2=use_h2, **wire_options)
            if transport is not None or use_h2
            else AiohttpWire(headers, **wire_options)
        )

    # -- construction, lifecycle, repr -----------------------------------------------------

    @classmethod
    async def from_prefect_secret(cls, block_name: str, **kwargs: Any) -> RunwareClient:
        """A client whose API key comes from the Prefect ``Secret`` block ``block_name``."""
        from prefect.blocks.system import Secret

        secret = await Secret.aload(block_name)
        value = secret.get()
        if not isinstance(value, str) or not value:
            raise RunwareAuthError(
                f"Prefect Secret block {block_name!r} does not hold a non-empty string",
                code="missingApiKey",
                parameter="apiKey",
            )
        return cls(value, **kwargs)

    async def __aenter__(self) -> RunwareClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"RunwareClient(base_url={self.base_url!r}, api_key='***')"

    __str__ = __repr__

    def _redact(self, text: str) -> str:
        """``text`` with the API key blanked (a server may echo what it was sent)."""
        return text.replace(self._api_key, "***") if self._api_key in text else text

    # -- public API ------------------------------------------------------------------------

    async def preprocess(self, task: PreprocessTask) -> PreprocessResult:
        """Run one preprocess task (sync or async delivery); raise its :class:`RunwareError`."""
        (outcome,) = await self.preprocess_many([task])
        if isinstance(outcome, RunwareError):
            raise outcome
        return outcome

    async def preprocess_many(
        self, tasks: Sequence[PreprocessTask | StampedTask]
    ) -> list[PreprocessResult | RunwareError]:
        """Run many preprocess tasks; one outcome per task, in input order.

        Tasks go out in POSTs of up to ``batch_size``, up to ``max_concurrency`` at once.
        A task's error (its own, or its request's after retries) is returned in its place.
        Account-level failures (:class:`RunwareAuthError`, :class:`RunwareCreditError`)
        raise instead, and cancel the other batches: every task would fail the same way.
        taskUUIDs must be unique (outcomes are matched by taskUUID).
        """
        uuids = [t.taskUUID for t in tasks]
        if len(set(uuids)) != len(uuids):
            raise ValueError("preprocess_many: taskUUIDs must be unique within one call")
        if len(tasks) <= self.batch_size:  # one POST: no task to spawn and gather
            return await self._run_batch(tasks) if tasks else []
        batches = [tasks[i : i + self.batch_size] for i in range(0, len(tasks), self.batch_size)]
        outcomes = await _gather_or_cancel(self._run_batch(b) for b in batches)
        return [o for batch in outcomes for o in batch]

    async def upload_image(
        self, image: bytes | str, *, task_uuid: str | None = None
    ) -> ImageUploadResult:
        """Upload an image once (``imageUpload``) and get the UUID to refer to it by.

        ``image`` is encoded image bytes (PNG, JPEG, WEBP, BMP or GIF, sent as a data URI
        with the sniffed media type) or a string the API accepts (data URI, base64, URL).
        """
        if isinstance(image, bytes | bytearray | memoryview):
            image = _data_uri(bytes(image))
        task = ImageUploadTask(taskUUID=task_uuid or new_task_uuid(), image=image)
        response = await self.send([task])
        for item in response.data:
            if item.get("taskUUID") == task.taskUUID and item.get("imageUUID"):
                return ImageUploadResult.model_validate(item)
        err = next((e for e in response.errors if e.taskUUID in (None, task.taskUUID)), None)
        if err is not None:
            raise error_from(err, task_uuid=task.taskUUID)
        raise RunwareServerError(
            "imageUpload answered without an imageUUID",
            code="noResult",
            task_uuid=task.taskUUID,
            retryable=True,
        )

    async def get_response(self, task_uuid: str) -> list[PreprocessResult | ErrorObject]:
        """One ``getResponse`` poll: the task's result items and error objects as they stand."""
        response = await self.send([GetResponseTask(taskUUID=task_uuid)])
        out: list[PreprocessResult | ErrorObject] = []
        for item in response.data:
            result = parse_preprocess_item(item)
            if result is not None and result.taskUUID == task_uuid:
                out.append(result)
        out.extend(e for e in response.errors if e.taskUUID in (None, task_uuid))
        return out

    async def ping(self) -> bool:
        """Whether the API answers ``pong`` (one attempt, no retries).

        ``False`` when the server is unreachable, fails or answers without ``pong``; an
        auth or credit error raises, since that is a configuration problem, not an outage.
        """
        try:
            env = await self._exchange([PingTask()], retries=0)
        except (RunwareAuthError, RunwareCreditError):
            raise
        except RunwareError as exc:
            logger.debug("ping failed: %s", exc)
            return False
        return any(item.get("pong") is True for item in env.response.data)

    async def send(self, tasks: Sequence[ProtocolModel]) -> ApiResponse:
        """POST one array of tasks, with retries; the parsed envelope of a 2xx answer.

        Per-task errors inside a 2xx answer are in ``.errors``; a non-2xx final answer
        raises the typed error of its first error object (or of its status).
        """
        env = await self._exchange(tasks)
        if env.http_status >= 400:
            raise self._request_error(env)
        return env.response

    # -- batches -----------------------------------------------------------------------------

    async def _run_batch(
        self, batch: Sequence[PreprocessTask | StampedTask]
    ) -> list[PreprocessResult | RunwareError]:
        """Submit one batch, re-send its transiently failed tasks, poll its async ones."""
        outcomes: dict[str, PreprocessResult | RunwareError] = {}
        pending: list[PreprocessTask | StampedTask] = []
        to_send = list(batch)
        for round_ in range(self.max_retries + 1):
            try:
                env = await self._exchange(to_send, client_errors=True)
            except (RunwareAuthError, RunwareCreditError):
                raise
            except RunwareError as exc:
                outcomes.update({t.taskUUID: exc.for_task(t.taskUUID) for t in to_send})
                break
            if env.http_status in (401, 402, 403):
                raise self._request_error(env)
            retry: list[PreprocessTask | StampedTask] = []
            for task in to_send:
                outcome = _classify(task, env)
                if outcome is PENDING:
                    pending.append(task)
                    continue
                assert not isinstance(outcome, _Pending)
                outcomes[task.taskUUID] = outcome
                if isinstance(outcome, RunwareError) and outcome.retryable:
                    retry.append(task)
            if not retry or round_ == self.max_retries:
                break
            wait = self._backoff(round_, None)
            logger.info("re-sending %d task(s) with transient errors in %.2f s", len(retry), wait)
            await self._sleep(wait)
            to_send = retry
        if pending:
            outcomes.update(await self._poll(pending))
        return [outcomes[t.taskUUID] for t in batch]

    async def _poll(
        self, tasks: Sequence[PreprocessTask | StampedTask]
    ) -> dict[str, PreprocessResult | RunwareError]:
        """Poll ``getResponse`` for ``tasks`` (one POST for all) until each is final."""
        pending = {t.taskUUID: t for t in tasks}
        done: dict[str, PreprocessResult | RunwareError] = {}
        deadline = self._clock() + self.poll_timeout
        delay = self.poll_initial
        while pending:
            remaining = deadline - self._clock()
            if remaining <= 0:
                for uuid in pending:
                    done[uuid] = RunwareTimeout(
                        f"the async task was still processing after {self.poll_timeout:g} s",
                        code="pollTimeout",
                        task_uuid=uuid,
                    )
                break
            await self._sleep(min(delay, remaining))
            delay = min(delay * self.poll_factor, self.poll_max)
            polls = [GetResponseTask(taskUUID=uuid) for uuid in pending]
            try:
                env = await self._exchange(polls, client_errors=True)
            except (RunwareAuthError, RunwareCreditError):
                raise
            except RunwareError as exc:
                done.update({uuid: exc.for_task(uuid) for uuid in pending})
                break
            if env.http_status in (401, 402, 403):
                raise self._request_error(env)
            for uuid, task in list(pending.items()):
                outcome = _classify(task, env, polling=True)
                if not isinstance(outcome, _Pending):
                    done[uuid] = outcome
                    del pending[uuid]
            logger.debug("poll: %d task(s) still processing", len(pending))
        return done

    # -- one request, with retries ----------------------------------------------------------

    async def _exchange(
        self,
        tasks: Sequence[ProtocolModel | StampedTask],
        *,
        client_errors: bool = False,
        retries: int | None = None,
    ) -> _Envelope:
        """POST ``tasks`` and parse the envelope, retrying transient failures.

        Returns the envelope of a 2xx answer, or (with ``client_errors``) of a non-retryable
        4xx answer whose body is a readable envelope, so per-task errors can be matched.
        Raises the typed error otherwise, including after the last retry.
        """
        if not tasks:
            raise ValueError("send at least one task")
        payload = [t.wire() for t in tasks]
        retries = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            try:
                return await self._attempt(payload, client_errors=client_errors)
            except RunwareError as exc:
                if not exc.retryable or attempt >= retries:
                    exc.attempts = attempt + 1
                    exc._refresh()
                    raise
                retry_after = getattr(exc, "retry_after", None)
                if retry_after is not None and retry_after > self.retry_after_max:
                    raise
                wait = self._backoff(attempt, retry_after)
                logger.warning(
                    "Runware request failed (%s); retry %d/%d in %.2f s",
                    exc.code,
                    attempt + 1,
                    retries,
                    wait,
                )
                await self._sleep(wait)
                attempt += 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter backoff for retry ``attempt`` (0-based), at least ``retry_after``."""
        jittered = min(self.backoff_max, self.backoff_base * 2**attempt) * self._random()
        return max(jittered, retry_after) if retry_after is not None else jittered

    async def _attempt(self, payload: list[dict[str, Any]], *, client_errors: bool) -> _Envelope:
        """One POST: the envelope, or a typed (possibly retryable) :class:`RunwareError`."""
        logger.debug("POST %s (%d task(s))", self.base_url, len(payload))
        body = _json_body(payload)
        try:
            async with self._semaphore:
                response = await self._http.post(self.base_url, body)
        except WireTimeout as exc:
            raise RunwareTimeout(str(exc), code="requestTimeout") from exc
        except WireConnectionError as exc:
            raise RunwareConnectionError(self._redact(str(exc)), code="connectionError") from exc
        status = response.status
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        logger.debug("HTTP %d from %s", status, self.base_url)
        parsed = self._parse_body(response)
        if parsed is None:
            if 200 <= status < 300 or status >= 500:
                raise RunwareConnectionError(
                    f"unreadable response body (HTTP {status}: not a JSON data/errors envelope)",
                    code="invalidResponse",
                    http_status=status,
                    retryable=True,
                )
            raise error_from(
                http_status=status,
                retry_after=retry_after,
                message=self._redact(f"HTTP {status}: {response.text[:200]}"),
            )
        env = _Envelope.of(parsed, status, retry_after)
        if 200 <= status < 300:
            return env
        if status in RETRYABLE_STATUSES or not client_errors:
            raise self._request_error(env)
        return env

    def _parse_body(self, response: WireResponse) -> ApiResponse | None:
        """The body as an :class:`ApiResponse`, or ``None`` if it is not one (truncated, HTML)."""
        try:
            body = _json_loads(response.body)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(body, dict) or not ({"data", "errors", "error"} & body.keys()):
            return None
        data = body.get("data")
        if isinstance(data, dict):  # a docs example shows a bare object
            data = [data]
        errors = body.get("errors")
        if errors is None and isinstance(body.get("error"), dict):
            errors = [body["error"]]
        try:
            return ApiResponse.model_validate(
                {
                    "data": [d for d in (data or []) if isinstance(d, dict)],
                    "errors": [
                        self._redact_error(e) for e in (errors or []) if isinstance(e, dict)
                    ],
                }
            )
        except ValidationError:
            return None

    def _redact_error(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {k: self._redact(v) if isinstance(v, str) else v for k, v in raw.items()}

    def _request_error(self, env: _Envelope) -> RunwareError:
        """The typed error of a whole non-2xx answer (its first error object, or its status)."""
        return error_from(
            env.first_error(), http_status=env.http_status, retry_after=env.retry_after
        )


# ============================================================================================
# Small helpers
# ============================================================================================


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One default-verifying SSL context for every client in the process.

    httpx builds a new one per client otherwise, loading the whole CA bundle each time
    (20-50 ms, more under load); the pipeline makes a client per shard. Contexts are
    safe to share between clients, threads and event loops.
    """
    return httpx.create_ssl_context()


def _json_loads(content: bytes) -> Any:
    """A response body parsed by orjson (several times faster than ``json.loads``), falling
    back to the standard library for what orjson refuses (NaN, integers beyond 64 bits)."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


def _json_body(payload: list[dict[str, Any]]) -> bytes:
    """The request body: the same JSON httpx's ``json=`` would send, built by orjson.

    A 512² PNG travels as ~380 KB of base64; ``json.dumps`` (what ``json=`` uses) spends
    2-5 ms on it, orjson ~0.02 ms. The payload comes from pydantic's JSON mode (NaN
    already ``null``); anything orjson refuses (integers beyond 64 bits in ``settings``)
    is encoded exactly as httpx would, so it succeeds or fails as before. The
    ``Content-Type: application/json`` header is one of the client's default headers.
    """
    try:
        return orjson.dumps(payload)
    except TypeError:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")


def _data_uri(data: bytes) -> str:
    """Encoded image bytes as a data URI with the media type sniffed from the bytes."""
    from engine.imageio import image_data_uri  # lazy: pulls in numpy/cv2

    uri = image_data_uri(data)
    if uri is None:
        raise RunwareValidationError(
            "image bytes are not PNG, JPEG, WEBP, BMP or GIF",
            code="unsupportedImageFormat",
            parameter="image",
        )
    return uri


async def _gather_or_cancel(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Like ``asyncio.gather`` but the first exception cancels the rest (then re-raises)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]
