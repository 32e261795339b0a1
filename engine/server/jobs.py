"""Task records (for ``getResponse``, idempotent retries and webhooks) and admission control.

A :class:`Job` is created for every ``controlNetPreprocess`` and ``imageUpload``
task that is started, sync or async, and kept until ``job_ttl`` after it
finished (at most ``max_jobs``, oldest finished first). All of this runs on the
event loop only, so no locks are needed.

Records are small by construction, so ``max_jobs`` bounds their memory: a finished
job never holds image data. An inline guide (``guideImageBase64Data`` /
``guideImageDataURI``) is replaced by an :class:`InlineGuide` (the field, its
``data:`` prefix and the guide's UUID in the image store, which has its own TTL and
byte cap) and rebuilt from the stored bytes when the result is answered again; error
messages and webhook URLs are clipped to :data:`MAX_RECORD_TEXT` characters. A
finished record measures ~1.7 KB (tests/test_server.py), so the default 100,000
records stay under ~200 MB.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from guideflow.errors import GuideflowError
from guideflow.protocol import ErrorObject

JobStatus = Literal["processing", "success", "error"]

#: Result fields that carry the guide image inline; never kept in a job record.
INLINE_FIELDS: tuple[str, ...] = ("guideImageBase64Data", "guideImageDataURI")
#: Longest error message / webhook URL kept in a record (longer ones are clipped).
MAX_RECORD_TEXT = 1024


def clip(text: str, limit: int = MAX_RECORD_TEXT) -> str:
    """``text``, cut to ``limit`` characters (marked with an ellipsis) when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@dataclass(frozen=True)
class Failure:
    """A per-task error object and the HTTP status it stands for."""

    error: ErrorObject
    status: int
    retry_after: int | None = None

    @classmethod
    def of(cls, exc: GuideflowError, *, task_type: str | None, task_uuid: str | None) -> Failure:
        obj = ErrorObject.from_exception(exc, task_type=task_type, task_uuid=task_uuid)
        return cls(obj, exc.http_status)

    def clipped(self) -> Failure:
        """This failure with its message clipped to :data:`MAX_RECORD_TEXT` (to keep it)."""
        if len(self.error.message) <= MAX_RECORD_TEXT:
            return self
        error = self.error.model_copy(update={"message": clip(self.error.message)})
        return Failure(error, self.status, self.retry_after)


class GuideImageExpired(GuideflowError):
    """A finished task answered inline whose guide image is no longer in the image store."""

    code = "guideImageExpired"
    http_status = 410


@dataclass(frozen=True)
class InlineGuide:
    """Where a result's inline guide image went: rebuilt from the image store on demand."""

    field: str  # one of INLINE_FIELDS
    prefix: str  # "" (base64Data) or "data:<type>;base64," (dataURI)
    image_uuid: str

    @classmethod
    def split(cls, result: dict[str, Any]) -> tuple[dict[str, Any], InlineGuide | None]:
        """``result`` without its inline guide payload, and how to rebuild it."""
        name = next((f for f in INLINE_FIELDS if isinstance(result.get(f), str)), None)
        image_uuid = result.get("guideImageUUID")
        if name is None or not isinstance(image_uuid, str):
            return result, None
        payload = result[name]
        prefix = payload[: payload.find(",") + 1] if name == "guideImageDataURI" else ""
        kept = {k: v for k, v in result.items() if k not in INLINE_FIELDS}
        return kept, cls(name, prefix, image_uuid)

    def render(self, data: bytes) -> str:
        """The inline field's value for the guide image bytes ``data`` (as first answered)."""
        return self.prefix + base64.b64encode(data).decode("ascii")


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of a validated task's wire form: equal payloads, equal fingerprints.

    On the request path of every preprocess/upload task, over its whole inline image
    (a 512² PNG is ~380 KB of base64): orjson serialises that in ~0.02 ms where
    ``json.dumps(sort_keys=True)`` takes 2-3 ms, and BLAKE2b hashes about twice as
    fast as SHA-256. Payloads orjson refuses (integers beyond 64 bits in ``settings``)
    take the stdlib path; a given payload always takes the same path, so equal
    payloads still hash equally. Fingerprints live in memory only (never persisted),
    so the algorithm may change between releases.
    """
    try:
        text = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        text = json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=32).hexdigest()


@dataclass
class Job:
    """One started task and, once finished, its result item (without inline image data,
    see :class:`InlineGuide`) or its failure."""

    task_uuid: str
    task_type: str
    fingerprint: str
    created: float
    status: JobStatus = "processing"
    result: dict[str, Any] | None = None
    inline: InlineGuide | None = None
    failure: Failure | None = None
    finished: float | None = None
    webhook: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(
        self, now: float, *, result: dict[str, Any] | None = None, failure: Failure | None = None
    ) -> None:
        """Record the outcome; an inline guide payload is dropped (see :class:`InlineGuide`)."""
        if result is not None:
            result, self.inline = InlineGuide.split(result)
        self.result, self.finished = result, now
        self.failure = failure.clipped() if failure is not None else None
        self.status = "success" if failure is None else "error"
        self.done.set()

    def full_result(self, guide: bytes | None = None) -> dict[str, Any] | None:
        """The result item as first answered: the kept fields plus, for an inline answer,
        the guide field rebuilt from ``guide`` (the stored image's bytes)."""
        if self.result is None or self.inline is None:
            return self.result
        if guide is None:
            raise ValueError("an inline result needs its guide image bytes")
        return {**self.result, self.inline.field: self.inline.render(guide)}

    def expired_failure(self) -> Failure:
        """The error for an inline result whose stored guide image is gone (410)."""
        exc = GuideImageExpired(
            f"task {self.task_uuid} succeeded, but its guide image (UUID "
            f"{self.inline.image_uuid if self.inline else '?'}) has expired or been evicted "
            "from the image store, so its inline result can no longer be answered; submit "
            "the task again under a new taskUUID",
            parameter="taskUUID",
        )
        return Failure.of(exc, task_type=self.task_type, task_uuid=self.task_uuid)

    def status_item(
        self, result: dict[str, Any] | None = None, *, failure: Failure | None = None
    ) -> dict[str, Any]:
        """The ``getResponse``/webhook item: the result plus ``status``, or an error summary.

        ``result`` is the full result item to show (default: the kept one, fine for URL
        answers); ``failure`` overrides the job's (the guide-expired case).
        """
        failure = failure or self.failure
        shown = result if result is not None else self.result
        if self.status == "success" and shown is not None and failure is None:
            item = {**shown, "status": "success"}
        else:
            status = "error" if failure is not None else self.status
            item = {"taskType": self.task_type, "taskUUID": self.task_uuid, "status": status}
            if failure is not None:
                err = failure.error
                item["error"] = {"code": err.code, "message": err.message}
                if err.parameter:
                    item["error"]["parameter"] = err.parameter
        if self.webhook is not None:
            item["webhook"] = dict(self.webhook)
        return item


class JobRegistry:
    """Jobs by taskUUID, bounded in time (``ttl`` after finishing) and in number."""

    def __init__(self, *, ttl: float, max_jobs: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.max_jobs = max_jobs
        self.clock = clock
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def get(self, task_uuid: str) -> Job | None:
        job = self._jobs.get(task_uuid)
        if job is not None and self._expired(job):
            del self._jobs[task_uuid]
            return None
        return job

    def start(self, task_uuid: str, task_type: str, fp: str) -> Job:
        """Record a new job (replacing a finished one with the same UUID)."""
        job = Job(task_uuid=task_uuid, task_type=task_type, fingerprint=fp, created=self.clock())
        self._jobs.pop(task_uuid, None)
        self._jobs[task_uuid] = job
        self._trim()
        return job

    def sweep(self) -> int:
        """Forget finished jobs older than ``ttl``; return how many."""
        stale = [k for k, j in self._jobs.items() if self._expired(j)]
        for k in stale:
            del self._jobs[k]
        return len(stale)

    def __len__(self) -> int:
        return len(self._jobs)

    def records(self) -> list[Job]:
        """Every record held now, oldest first (for inspection: health checks, tests)."""
        return list(self._jobs.values())

    def _expired(self, job: Job) -> bool:
        return job.finished is not None and job.finished + self.ttl <= self.clock()

    def _trim(self) -> None:
        excess = len(self._jobs) - self.max_jobs
        if excess <= 0:
            return
        for key in [k for k, j in self._jobs.items() if j.finished is not None][:excess]:
            del self._jobs[key]


class Admission:
    """Counts tasks queued or running; a batch is admitted whole or not at all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def try_acquire(self, n: int) -> bool:
        if n <= 0:
            return True
        if self.in_flight + n > self.capacity:
            return False
        self.in_flight += n
        return True

    def release(self, n: int = 1) -> None:
        self.in_flight = max(0, self.in_flight - n)
