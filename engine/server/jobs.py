"""Task records (for ``getResponse``, idempotent retries and webhooks) and admission control.

A :class:`Job` is created for every ``controlNetPreprocess`` and ``imageUpload``
task that is started, sync or async, and kept until ``job_ttl`` after it
finished (at most ``max_jobs``, oldest finished first). All of this runs on the
event loop only, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from guideflow.errors import GuideflowError
from guideflow.protocol import ErrorObject

JobStatus = Literal["processing", "success", "error"]


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


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of a validated task's wire form: equal payloads, equal fingerprints."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Job:
    """One started task and, once finished, its result item or its failure."""

    task_uuid: str
    task_type: str
    fingerprint: str
    created: float
    status: JobStatus = "processing"
    result: dict[str, Any] | None = None
    failure: Failure | None = None
    finished: float | None = None
    webhook: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(
        self, now: float, *, result: dict[str, Any] | None = None, failure: Failure | None = None
    ) -> None:
        self.result, self.failure, self.finished = result, failure, now
        self.status = "success" if failure is None else "error"
        self.done.set()

    def status_item(self) -> dict[str, Any]:
        """The ``getResponse``/webhook item: the result plus ``status``, or an error summary."""
        if self.status == "success" and self.result is not None:
            item = {**self.result, "status": "success"}
        else:
            item = {"taskType": self.task_type, "taskUUID": self.task_uuid, "status": self.status}
            if self.failure is not None:
                err = self.failure.error
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
