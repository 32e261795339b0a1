"""One ``POST /v1`` batch: authenticate, validate every task, admit, run, answer.

Errors are scoped per task: a task that fails validation or processing gets its
own error object and never affects its siblings. The whole request is refused
only for a bad API key (401) or when admitting its tasks would exceed the
queue capacity (429 + ``Retry-After``; nothing of it was started).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.api import PreparedRequest
from engine.models.onnx import batch_limit
from engine.server.auth import authorized
from engine.server.config import ServerConfig
from engine.server.executor import BatchGroup, Runner, image_parameter
from engine.server.jobs import Admission, Failure, Job, JobRegistry, clip, fingerprint
from engine.server.storage import ImageStore
from guideflow.errors import DOCS_URL, GuideflowError, InvalidParameter
from guideflow.netguard import redact_url
from guideflow.protocol import (
    PREPROCESS_TASK_TYPES,
    AuthenticationResult,
    AuthenticationTask,
    ErrorObject,
    GetResponseTask,
    ImageUploadTask,
    PingTask,
    PongResult,
    PreprocessTask,
    ProtocolError,
    parse_task,
)

log = logging.getLogger("guideflow.server")

#: Task types that start a job (and so own their taskUUID).
JOB_TASK_TYPES: tuple[str, ...] = (*PREPROCESS_TASK_TYPES, "imageUpload")
#: When every task failed, the first of these statuses present is the response's status.
STATUS_PRIORITY: tuple[int, ...] = (401, 403, 413, 429, 400, 409, 404, 410, 503, 504, 502, 500)


def error(code: str, message: str, *, parameter: str | None = None, raw: Any = None) -> ErrorObject:
    """An error object for a (possibly unparsed) raw task."""
    task_type = raw.get("taskType") if isinstance(raw, dict) else None
    task_uuid = raw.get("taskUUID") if isinstance(raw, dict) else None
    return ErrorObject(
        code=code,
        message=message,
        parameter=parameter,
        taskType=task_type if isinstance(task_type, str) else None,
        taskUUID=task_uuid if isinstance(task_uuid, str) else None,
        documentation=DOCS_URL,
    )


def overall_status(failures: Sequence[Failure]) -> int:
    """The HTTP status of a response in which every task failed."""
    statuses = {f.status for f in failures}
    for status in STATUS_PRIORITY:
        if status in statuses:
            return status
    return max(statuses) if statuses else 400


@dataclass
class Reply:
    """A response body with its HTTP status and extra headers."""

    body: dict[str, Any]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def reply_from(data: list[dict[str, Any]], failures: list[Failure]) -> Reply:
    """``data`` and ``errors`` side by side: 200 if anything succeeded, else the top status."""
    body: dict[str, Any] = {}
    if data or not failures:
        body["data"] = data
    if failures:
        body["errors"] = [f.error.wire() for f in failures]
    if data:
        return Reply(body)
    status = overall_status(failures)
    headers = {}
    retry = [f.retry_after for f in failures if f.retry_after is not None]
    if status == 429 and retry:
        headers["Retry-After"] = str(max(retry))
    return Reply(body, status, headers)


def request_error(code: str, message: str, status: int) -> Reply:
    """A whole-request error (bad JSON, body too large, ...) as an error-object reply."""
    return reply_from([], [Failure(error(code, message), status)])


def _parse(raw: Any) -> tuple[Any, Failure | None, str]:
    """Validate one raw task: (task model, None, fingerprint) or (None, failure, "")."""
    try:
        task = parse_task(raw)
    except ProtocolError as exc:
        return None, Failure(exc.error, 400), ""
    fp = fingerprint(task.wire()) if isinstance(task, PreprocessTask | ImageUploadTask) else ""
    return task, None, fp


# -- planned tasks ------------------------------------------------------------------------


@dataclass
class _Plan:
    """What to answer for one task, decided before anything is started."""

    raw: Any
    item: dict[str, Any] | None = None  # answered at once
    failure: Failure | None = None  # failed validation
    task: Any = None  # a job to start (PreprocessTask | ImageUploadTask)
    prepared: PreparedRequest | None = None
    fp: str = ""
    job: Job | None = None  # started or joined job
    reuse: bool = False  # an earlier job with the same taskUUID and payload
    poll: Job | None = None  # getResponse target
    full: dict[str, Any] | None = None  # the answered job's result with its inline guide
    expired: bool = False  # ... whose stored guide image is gone (guideImageExpired)

    @property
    def is_async(self) -> bool:
        return isinstance(self.task, PreprocessTask) and self.task.deliveryMethod == "async"

    @property
    def shown(self) -> Job | None:
        """The finished job whose result this plan answers (getResponse, sync run or replay)."""
        if self.failure is not None:
            return None
        if self.poll is not None:
            return self.poll
        return self.job if self.job is not None and not self.is_async else None


class Dispatcher:
    """Owns the server's state (store, jobs, admission, runner) and handles batches."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store = ImageStore(
            config.storage_dir, max_bytes=config.storage_max_bytes, clock=config.clock
        )
        self.jobs = JobRegistry(ttl=config.job_ttl, max_jobs=config.max_jobs, clock=config.clock)
        self.admission = Admission(config.capacity)
        self.runner = Runner(config, self.store)
        self.background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    # -- the batch ----------------------------------------------------------------------

    async def handle(
        self, raw_tasks: list[Any], bearer: str | None, base_url: str, *, offload: bool = True
    ) -> Reply:
        """Answer one batch (already parsed as a JSON array).

        Validating and fingerprinting touch every byte of inline images: with
        ``offload`` (the app sets it for bodies over ``INLINE_PARSE_BYTES``) that runs
        in a thread; small batches are validated on the event loop (~1 ms for a 380 KB
        image), sparing two thread hand-offs on the request's critical path.
        """
        if self.config.auth_required and not authorized(bearer, raw_tasks, self.config.api_keys):
            return self._unauthorized(raw_tasks)
        if offload:
            parsed = await asyncio.to_thread(lambda: [_parse(raw) for raw in raw_tasks])
        else:
            parsed = [_parse(raw) for raw in raw_tasks]
        plans = [self._plan(raw, *result) for raw, result in zip(raw_tasks, parsed, strict=True)]
        self._mark_duplicates(plans)
        self._resolve_existing(plans)
        new = [p for p in plans if p.task is not None and p.job is None and p.failure is None]
        if not self.admission.try_acquire(len(new)):
            return self._over_capacity(raw_tasks, len(new))
        groups = self._batch_groups(new)
        for plan in new:
            plan.job = self.jobs.start(plan.task.taskUUID, plan.task.taskType, plan.fp)
            answer_to = None if plan.is_async else plan
            group = groups.get(id(plan))
            self.spawn(
                self._run_job(plan.job, plan.task, plan.prepared, base_url, answer_to, group)
            )
        waits = [p.job.done.wait() for p in plans if p.job is not None and not p.is_async]
        if waits:
            await asyncio.gather(*waits)
        await self._rebuild_inline(plans)
        return self._answer(plans)

    def _unauthorized(self, raw_tasks: list[Any]) -> Reply:
        message = (
            "Invalid or missing API key: send 'Authorization: Bearer <key>' "
            "or a leading authentication task."
        )
        failures = [
            Failure(error("invalidApiKey", message, parameter="apiKey", raw=raw), 401)
            for raw in raw_tasks
        ]
        log.info("refused a batch of %d task(s): invalid or missing API key", len(raw_tasks))
        return reply_from([], failures)

    def _over_capacity(self, raw_tasks: list[Any], wanted: int) -> Reply:
        cfg = self.config
        if wanted > cfg.capacity:
            message = (
                f"the batch has {wanted} tasks to run but the queue holds at most "
                f"{cfg.capacity}; split it into smaller batches"
            )
        else:
            message = (
                f"queue capacity exceeded ({self.admission.in_flight} of {cfg.capacity} "
                f"tasks queued or running, {wanted} more asked); retry after "
                f"{cfg.retry_after} s with exponential backoff"
            )
        failures = [
            Failure(error("rateLimitExceeded", message, raw=raw), 429, cfg.retry_after)
            for raw in raw_tasks
        ]
        log.info("refused a batch of %d task(s): over capacity", len(raw_tasks))
        return reply_from([], failures)

    # -- planning (no awaits: the whole batch is planned and admitted atomically) ------

    def _plan(self, raw: Any, task: Any, failure: Failure | None, fp: str) -> _Plan:
        plan = _Plan(raw=raw, failure=failure)
        if failure is not None:
            return plan
        try:
            if isinstance(task, AuthenticationTask):
                session = task.connectionSessionUUID or str(uuid.uuid4())
                plan.item = AuthenticationResult(connectionSessionUUID=session).wire()
            elif isinstance(task, PingTask):
                plan.item = PongResult(taskUUID=task.taskUUID).wire()
            elif isinstance(task, GetResponseTask):
                plan.poll = self._find_job(task)
            elif isinstance(task, PreprocessTask):
                plan.prepared = self._validate_preprocess(task)
                plan.task, plan.fp = task, fp
            elif isinstance(task, ImageUploadTask):
                self.runner.check_upload_ref(task.image)
                plan.task, plan.fp = task, fp
        except GuideflowError as exc:
            plan.failure = Failure.of(
                exc, task_type=task.taskType, task_uuid=getattr(task, "taskUUID", None)
            )
        return plan

    def _find_job(self, task: GetResponseTask) -> Job:
        job = self.jobs.get(task.taskUUID)
        if job is None:
            raise GuideflowError(
                f"no task with taskUUID {task.taskUUID} (never submitted, or its record expired)",
                code="taskNotFound",
                http_status=404,
                parameter="taskUUID",
            )
        return job

    def _validate_preprocess(self, task: PreprocessTask) -> PreparedRequest:
        """Every check that needs no image bytes, before the task may be queued."""
        prepared = self.runner.engine.prepare(
            task.preprocessor,
            task.engine_settings(),
            width=task.width,
            height=task.height,
            output_format=task.outputFormat,
            output_quality=task.outputQuality,
        )
        self.runner.check_image_ref(task.image, image_parameter(task))
        for name in ("webhookURL", "uploadEndpoint"):
            url = getattr(task, name)
            if url is not None and not url.lower().startswith(("http://", "https://")):
                raise InvalidParameter(f"{name} must be an http(s) URL", parameter=name)
        return prepared

    def _mark_duplicates(self, plans: list[_Plan]) -> None:
        """Every repeat of a job task's taskUUID in the batch (valid or not) is a conflict."""
        seen: set[str] = set()
        for plan in plans:
            raw = plan.raw
            if not isinstance(raw, dict) or raw.get("taskType") not in JOB_TASK_TYPES:
                continue
            task_uuid = raw.get("taskUUID")
            if not isinstance(task_uuid, str):
                continue
            if task_uuid in seen:
                plan.failure = Failure(
                    error(
                        "conflictTaskUUID",
                        f"taskUUID {task_uuid} appears more than once in this request; "
                        "every task needs its own",
                        parameter="taskUUID",
                        raw=raw,
                    ),
                    409,
                )
                plan.task = None
            seen.add(task_uuid)

    def _resolve_existing(self, plans: list[_Plan]) -> None:
        """Idempotent retries: same taskUUID + same payload joins or replays the earlier job."""
        for plan in plans:
            if plan.task is None or plan.failure is not None:
                continue
            job = self.jobs.get(plan.task.taskUUID)
            if job is None or job.status == "error":  # unknown, or a failure worth retrying
                continue
            if job.fingerprint != plan.fp:
                plan.failure = Failure(
                    error(
                        "conflictTaskUUID",
                        f"taskUUID {job.task_uuid} was already used for a "
                        "different task; use a new taskUUID",
                        parameter="taskUUID",
                        raw=plan.raw,
                    ),
                    409,
                )
                continue
            plan.job, plan.reuse = job, True

    # -- running ------------------------------------------------------------------------

    def _batch_groups(self, plans: list[_Plan]) -> dict[int, BatchGroup]:
        """Group this POST's preprocess tasks that can share forward passes.

        Tasks with the same preprocessor and identical validated settings, size and output
        options, for a preprocessor that batches them, form groups of up to
        ``GUIDEFLOW_MAX_BATCH`` (several groups may run on several workers at once).
        Returns ``id(plan) → group`` for members of groups of two or more.
        """
        same: dict[tuple[Any, ...], list[_Plan]] = {}
        for plan in plans:
            prepared = plan.prepared
            if isinstance(plan.task, PreprocessTask) and prepared is not None and prepared.batches:
                same.setdefault(prepared.batch_key, []).append(plan)
        limit = batch_limit()
        groups: dict[int, BatchGroup] = {}
        for members in same.values():
            for start in range(0, len(members), limit):
                chunk = members[start : start + limit]
                if len(chunk) < 2:
                    continue
                assert chunk[0].prepared is not None
                group = BatchGroup(self.runner, chunk[0].prepared, len(chunk))
                groups.update((id(plan), group) for plan in chunk)
        return groups

    async def _run_job(
        self,
        job: Job,
        task: Any,
        prepared: PreparedRequest | None,
        base_url: str,
        answer_to: _Plan | None = None,
        group: BatchGroup | None = None,
    ) -> None:
        """Run ``task`` and finish ``job``; the full result item (inline guide included)
        goes to ``answer_to`` (the request that started a sync task) and the webhook, not
        to the job record, which keeps it without the inline image (see ``Job.finish``)."""
        started = time.perf_counter()
        result: dict[str, Any] | None = None
        try:
            if isinstance(task, PreprocessTask):
                assert prepared is not None
                result = await self.runner.preprocess(task, prepared, base_url, group)
            else:
                result = await self.runner.image_upload(task, base_url)
        except GuideflowError as exc:
            job.finish(
                self.config.clock(),
                failure=Failure.of(exc, task_type=task.taskType, task_uuid=task.taskUUID),
            )
        except asyncio.CancelledError:  # server shutdown: leave no job "processing" forever
            exc = GuideflowError(
                "the server shut down before the task finished",
                code="serverShuttingDown",
                http_status=503,
                retryable=True,
            )
            job.finish(
                self.config.clock(),
                failure=Failure.of(exc, task_type=task.taskType, task_uuid=task.taskUUID),
            )
            raise
        except Exception:
            log.exception("task %s (%s) crashed", task.taskUUID, task.taskType)
            exc = GuideflowError("internal error while processing the task", code="internalError")
            job.finish(
                self.config.clock(),
                failure=Failure.of(exc, task_type=task.taskType, task_uuid=task.taskUUID),
            )
        else:
            if answer_to is not None:
                answer_to.full = result
            job.finish(self.config.clock(), result=result)
        finally:
            self.admission.release(1)
        outcome = job.failure.error.code if job.failure else "success"
        log.info(
            "task %s %s: %s in %.0f ms",
            task.taskType,
            task.taskUUID,
            outcome,
            (time.perf_counter() - started) * 1000,
        )
        url = getattr(task, "webhookURL", None)
        if url:
            job.webhook = {
                "url": clip(redact_url(url)),
                "status": "pending",
                "attempts": 0,
                "lastStatus": None,
            }
            payload = job.status_item(result)
            payload.pop("webhook", None)
            self.spawn(self.runner.deliver_webhook(url, payload, job.webhook))

    # -- answering ----------------------------------------------------------------------

    async def _rebuild_inline(self, plans: list[_Plan]) -> None:
        """Replays, joins and polls of inline-answered tasks: the guide field from the store.

        Sets each such plan's ``full`` result, or ``expired`` when the stored guide image
        has expired or been evicted (answered as ``guideImageExpired``; never recomputed).
        Reads may touch disk, so they run in a thread; nothing to do costs no hand-off.
        """
        todo = [
            p
            for p in plans
            if p.full is None
            and (job := p.shown) is not None
            and job.status == "success"
            and job.inline is not None
        ]
        if not todo:
            return

        def rebuild() -> None:
            for plan in todo:
                job = plan.shown
                assert job is not None and job.inline is not None
                found = self.store.read(job.inline.image_uuid)
                if found is None:
                    plan.expired = True
                else:
                    plan.full = job.full_result(found[1])

        await asyncio.to_thread(rebuild)

    def _answer(self, plans: list[_Plan]) -> Reply:
        data: list[dict[str, Any]] = []
        failures: list[Failure] = []
        for plan in plans:
            if plan.failure is not None:
                failures.append(plan.failure)
            elif plan.item is not None:
                data.append(plan.item)
            elif plan.poll is not None:
                job = plan.poll
                if job.inline is not None and plan.full is None and not plan.expired:
                    # finished while _rebuild_inline ran: answer what it was when looked at
                    data.append(
                        {
                            "taskType": job.task_type,
                            "taskUUID": job.task_uuid,
                            "status": "processing",
                        }
                    )
                    continue
                failure = job.expired_failure() if plan.expired else job.failure
                data.append(job.status_item(plan.full, failure=failure))
                if failure is not None:
                    failures.append(failure)
            elif plan.job is not None and plan.is_async:
                job = plan.job
                data.append(
                    {"taskType": job.task_type, "taskUUID": job.task_uuid, "status": job.status}
                )
            elif plan.job is not None:
                if plan.expired:
                    failures.append(plan.job.expired_failure())
                elif plan.job.result is not None:
                    data.append(plan.full if plan.full is not None else plan.job.result)
                elif plan.job.failure is not None:
                    failures.append(plan.job.failure)
        return reply_from(data, failures)

    # -- lifecycle ----------------------------------------------------------------------

    def sweep(self) -> tuple[int, int]:
        """Drop expired images and job records (images: blocking file I/O)."""
        return self.store.sweep(), self.jobs.sweep()

    async def aclose(self) -> None:
        for task in list(self.background):
            task.cancel()
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        self.runner.close()
        self.store.close()
