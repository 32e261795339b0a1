"""Backends turn work items into guide images: in-process, or over the Runware protocol.

Both share one request path: validated :class:`~tasks.work.WorkItem` objects in,
:class:`~tasks.work.Outcome` objects out, never an exception for a bad item.

* :class:`LocalBackend` runs the embedded engine in a thread pool (the event loop
  never does CPU work), reading inputs and writing outputs through fsspec.
* :class:`HttpBackend` speaks Runware's protocol to ``guideflow serve`` or
  api.runware.ai. Inputs in S3 go as presigned GET URLs, outputs to S3 as presigned
  PUT ``uploadEndpoint`` s, so image bytes never pass through the pipeline; an image
  used by several preprocessors is sent once with ``imageUpload`` and then referred
  to by its UUID.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import numpy as np

from connectors import storage
from engine import imageio
from engine.api import Engine, GuideImage, PreparedRequest
from engine.models.onnx import batch_limit
from guideflow import netguard
from guideflow.errors import GuideflowError, InvalidParameter
from guideflow.pricing import PriceTable
from guideflow.protocol import (
    ErrorObject,
    PreprocessResult,
    StampedTask,
    TaskTemplate,
    new_task_uuid,
)
from tasks.work import Outcome, RunConfig, WorkItem

#: Presigned upload URLs and guide images kept by the service live this long (s).
SERVICE_TTL_S = 60


class ServiceBackend(Protocol):
    """What a shard needs from a backend."""

    name: str

    async def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        """Produce every item (all for the same image or not); one outcome per item."""
        ...

    async def aclose(self) -> None: ...


def _cpu_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LocalBackend:
    """The embedded engine, in-process.

    Items for the same input are read and decoded once. CPU work runs in a thread
    pool sized to the CPU count (OpenCV, ONNX Runtime and Pillow release the GIL).
    Engine calls go through an :class:`_EngineQueue`, so items with the same
    preprocessor and settings share forward passes (``Engine.run_batch``, up to
    ``GUIDEFLOW_MAX_BATCH`` images) when they are waiting together: the items of one
    ``run`` call, and items of concurrent calls that arrive while the workers are busy.
    """

    name = "local"

    def __init__(
        self, config: RunConfig, engine: Engine | None = None, prices: PriceTable | None = None
    ):
        self.config = config
        self.engine = engine or Engine()
        self.prices = prices or PriceTable.load()
        workers = _cpu_workers()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine")
        self._queue = _EngineQueue(self.engine, self._pool, slots=workers)
        self._http: httpx.AsyncClient | None = None

    async def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        uris = list(dict.fromkeys(item.input_uri for item in items))
        started = time.time()
        decoded = await asyncio.gather(*(self._decode(uri) for uri in uris))
        images = dict(zip(uris, decoded, strict=True))
        return list(
            await asyncio.gather(
                *(self._run_item(item, images[item.input_uri], started) for item in items)
            )
        )

    async def _decode(self, uri: str) -> np.ndarray | GuideflowError:
        """The input as RGB, or the error every item of this input fails with."""
        loop = asyncio.get_running_loop()
        try:
            data = await self._read_input(uri)
            return await loop.run_in_executor(
                self._pool, imageio.decode_image, data, self.engine.limits
            )
        except GuideflowError as exc:
            return exc
        except Exception as exc:  # never let one image fail its whole shard
            return _unexpected(exc)

    async def _read_input(self, uri: str) -> bytes:
        """The input's bytes: http(s) through the SSRF guard, anything else through fsspec.

        A scheme fsspec does not know (or whose package is missing) is the row's error
        ``unsupportedURLScheme``, not an exception that would fail the shard.
        """
        max_bytes = self.engine.limits.max_bytes
        if urlsplit(uri).scheme.lower() in ("http", "https"):
            if self._http is None:
                self._http = netguard.guarded_client(netguard.NetPolicy.from_env())
            return await netguard.fetch_bytes(
                self._http, uri, max_bytes=max_bytes, parameter="inputImage"
            )
        try:
            return await storage.read_bytes(uri, max_bytes=max_bytes)
        except (ValueError, ImportError) as exc:  # fsspec: unknown protocol / not installed
            raise netguard.UnsupportedURLScheme(
                f"cannot read {netguard.redact_url(uri)}: {exc}", parameter="inputImage"
            ) from exc

    async def _run_item(
        self, item: WorkItem, rgb: np.ndarray | GuideflowError, read_started: float
    ) -> Outcome:
        if isinstance(rgb, GuideflowError):
            return Outcome.failed(item, rgb, started=read_started)
        started = time.time()
        try:
            req = self.engine.prepare(
                item.preprocessor,
                item.settings,
                width=item.width,
                height=item.height,
                output_format=item.output_format,
                output_quality=item.output_quality,
            )
            guide = await self._queue.run(req, rgb, item.task_uuid)
            await storage.write_bytes(item.output_uri, guide.data, content_type=item.content_type)
        except GuideflowError as exc:
            return Outcome.failed(item, exc, started=started)
        except Exception as exc:  # a preprocessor bug on one image: its row, not the shard
            return Outcome.failed(item, _unexpected(exc), started=started)
        finished = time.time()
        return Outcome(
            status="success",
            item=item,
            variant=guide.variant,
            method=_method(guide.meta),
            cost_usd=self.prices.price(item.preprocessor),
            latency_ms=(finished - started) * 1000,
            started_at=started,
            finished_at=finished,
        )

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None


@dataclass
class _Waiting:
    """One image waiting for the engine."""

    req: PreparedRequest
    rgb: np.ndarray
    task_uuid: str | None
    future: asyncio.Future[GuideImage]


class _EngineQueue:
    """Runs engine requests in a thread pool, batching same-settings images that wait together.

    Requests wait in arrival order. Whenever fewer than ``slots`` engine calls are
    running, the oldest waiting request starts, together with up to ``max_batch - 1``
    later ones with the same :attr:`~engine.api.PreparedRequest.batch_key` when its
    preprocessor shares forward passes. A lone item therefore starts at once (nothing is
    held back waiting for company), and items that queue up behind busy workers, or arrive
    together, go through one ``Engine.run_batch`` call.
    """

    def __init__(
        self, engine: Engine, pool: ThreadPoolExecutor, *, slots: int, max_batch: int | None = None
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.slots = max(1, slots)
        self.max_batch = max_batch or batch_limit()
        self.waiting: list[_Waiting] = []
        self.running: set[asyncio.Task[None]] = set()
        self._drain_scheduled = False

    async def run(self, req: PreparedRequest, rgb: np.ndarray, task_uuid: str | None) -> GuideImage:
        """The guide image for ``rgb`` (raises its own error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GuideImage] = loop.create_future()
        self.waiting.append(_Waiting(req, rgb, task_uuid, future))
        if not self._drain_scheduled:  # after this tick, so items arriving together batch
            self._drain_scheduled = True
            loop.call_soon(self._drain)
        return await future

    def _drain(self) -> None:
        self._drain_scheduled = False
        self.waiting = [w for w in self.waiting if not w.future.done()]  # cancelled waiters
        while self.waiting and len(self.running) < self.slots:
            batch = self._take()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.running.add(task)
            task.add_done_callback(self._finished)

    def _take(self) -> list[_Waiting]:
        """The oldest waiting request and the later ones it may share a batch with."""
        first = self.waiting.pop(0)
        if self.max_batch < 2 or not first.req.batches:
            return [first]
        key = first.req.batch_key
        batch, rest = [first], []
        for waiting in self.waiting:
            if len(batch) < self.max_batch and waiting.req.batch_key == key:
                batch.append(waiting)
            else:
                rest.append(waiting)
        self.waiting = rest
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        call = partial(
            self.engine.run_batch,
            batch[0].req,
            [w.rgb for w in batch],
            [w.task_uuid for w in batch],
        )
        try:
            results = await loop.run_in_executor(self.pool, call)
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.future.cancel()
            raise
        except Exception as exc:  # the pool was shut down
            results = [exc] * len(batch)
        for waiting, result in zip(batch, results, strict=True):
            if waiting.future.done():
                continue
            if isinstance(result, Exception):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        if self.waiting and not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)


def _unexpected(exc: Exception) -> GuideflowError:
    """An unexpected exception as the item's ``internalError`` (recorded, retried next run)."""
    return GuideflowError(f"{type(exc).__name__}: {exc}", code="internalError")


def _method(meta: dict[str, Any]) -> str | None:
    """Which method actually ran, when a preprocessor can fall back (normalbae)."""
    value = meta.get("normal_method") or meta.get("method")
    return str(value) if value is not None else None


class HttpBackend:
    """A Runware-compatible service through :class:`connectors.runware.RunwareClient`."""

    name = "http"

    def __init__(self, config: RunConfig, client: Any, prices: PriceTable | None = None):
        self.config = config
        self.client = client
        self.prices = prices or PriceTable.load()
        self._fs: Any = None
        self._templates: dict[tuple[str, str, bool], TaskTemplate] = {}

    async def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        started = time.time()
        uses: dict[str, int] = defaultdict(int)
        for item in items:
            uses[item.input_uri] += 1
        refs = await self._image_refs(uses)
        out: list[Outcome | None] = [None] * len(items)
        tasks: list[StampedTask] = []
        sent: list[tuple[int, WorkItem, str]] = []
        for index, item in enumerate(items):
            ref = refs[item.input_uri]
            if isinstance(ref, GuideflowError):
                out[index] = Outcome.failed(item, ref, started=started)
                continue
            # A fresh taskUUID per task sent (the ledger records it): Runware wants each
            # task's UUID unique, and guideflow serve answers a known taskUUID carrying a
            # different payload (new presigned URLs, a new upload UUID: every re-run, forced
            # run or shard retry) with conflictTaskUUID. The client's own retries re-send
            # the same task object, so a lost response is still replayed, not redone.
            task_uuid = new_task_uuid()
            try:
                tasks.append(await self._task(item, ref, task_uuid))
            except GuideflowError as exc:
                out[index] = Outcome.failed(item, exc, started=started, task_uuid=task_uuid)
                continue
            sent.append((index, item, task_uuid))
        try:
            results = await self.client.preprocess_many(tasks) if tasks else []
        except Exception as exc:  # retries exhausted for the whole batch: every task failed
            results = [exc] * len(tasks)
        for (index, item, task_uuid), result in zip(sent, results, strict=True):
            out[index] = await self._outcome(item, task_uuid, result, started)
        return [o for o in out if o is not None]

    async def _image_refs(self, uses: dict[str, int]) -> dict[str, str | GuideflowError]:
        """Every input's reference for the service (see :meth:`_image_ref`).

        Presigning and passing URLs on need no I/O once a signing template is learned, so
        those are awaited one by one (no task per image); reads and uploads run together.
        """
        refs: dict[str, str | GuideflowError] = {}
        slow: list[str] = []
        for uri, count in uses.items():
            if count == 1 and (storage.is_s3(uri) or _is_http(uri)):
                await self._image_ref(uri, 1, refs)
            else:
                slow.append(uri)
        if slow:
            await asyncio.gather(*(self._image_ref(uri, uses[uri], refs) for uri in slow))
        return refs

    async def _image_ref(self, uri: str, uses: int, refs: dict[str, str | GuideflowError]) -> None:
        """How the service gets the input: presigned GET, the URL itself, or bytes; uploaded
        once if reused. http(s) URLs go as they are: the service fetches them (under its
        own SSRF policy), and connectors.storage refuses them."""
        try:
            if storage.is_s3(uri):
                ref = await storage.presign_get(
                    uri, expires=self.config.presign_expiry_s, fs=self._s3fs()
                )
            elif _is_http(uri):
                ref = uri
            else:
                data = await storage.read_bytes(uri, max_bytes=imageio.DEFAULT_LIMITS.max_bytes)
                ref = _as_data_uri(data)
            if uses > 1:
                uploaded = await self.client.upload_image(ref)
                ref = uploaded.imageUUID
            refs[uri] = ref
        except GuideflowError as exc:
            refs[uri] = exc
        except Exception as exc:  # the client's typed errors carry a Runware code
            refs[uri] = _as_guideflow_error(exc)

    def _s3fs(self) -> Any:
        """The S3 filesystem that signs URLs, resolved once per backend."""
        if self._fs is None:
            self._fs = storage.default_s3_fs()
        return self._fs

    async def _task(self, item: WorkItem, image_ref: str, task_uuid: str) -> StampedTask:
        """The task for ``item``: its (preprocessor, settings) template, stamped."""
        to_s3 = storage.is_s3(item.output_uri)
        key = (item.preprocessor, item.settings_hash, to_s3)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = self._template(item, to_s3)
        upload = None
        if to_s3:
            upload = await storage.presign_put(
                item.output_uri,
                content_type=self._content_type(item.output_format),
                expires=self.config.presign_expiry_s,
                fs=self._s3fs(),
            )
        return template.stamp(task_uuid, image_ref, upload)

    @staticmethod
    @functools.cache
    def _content_type(output_format: str) -> str:
        return imageio.content_type(output_format)

    def _template(self, item: WorkItem, to_s3: bool) -> TaskTemplate:
        fields: dict[str, Any] = {
            "width": item.width,
            "height": item.height,
            "outputFormat": item.output_format,
            "outputQuality": item.output_quality,
            "includeCost": True,
        }
        if to_s3:
            fields["outputType"] = "URL"
            fields["ttl"] = SERVICE_TTL_S
        else:
            fields["outputType"] = "base64Data"
        try:
            return TaskTemplate.build(
                item.preprocessor,
                settings=item.settings or None,
                **{k: v for k, v in fields.items() if v is not None},
            )
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise InvalidParameter(f"cannot build the task: {exc}") from exc

    async def _outcome(
        self, item: WorkItem, task_uuid: str, result: Any, started: float
    ) -> Outcome:
        if not isinstance(result, PreprocessResult):
            error = _as_error_object(result)
            return Outcome.failed(item, error, started=started, task_uuid=task_uuid)
        try:
            if not storage.is_s3(item.output_uri):
                data = result.guide_bytes()
                if data is None:
                    raise GuideflowError(
                        "the service returned no image bytes", code="invalidResponse"
                    )
                await storage.write_bytes(item.output_uri, data, content_type=item.content_type)
        except GuideflowError as exc:
            return Outcome.failed(item, exc, started=started, task_uuid=task_uuid)
        finished = time.time()
        cost = result.cost if result.cost is not None else self.prices.price(item.preprocessor)
        return Outcome(
            status="success",
            item=item,
            task_uuid=task_uuid,
            guide_image_uuid=result.guideImageUUID,
            cost_usd=float(cost),
            latency_ms=(finished - started) * 1000,
            started_at=started,
            finished_at=finished,
            method=(result.model_extra or {}).get("method"),
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def _is_http(uri: str) -> bool:
    scheme, colon, _ = uri.partition(":")
    if colon and scheme.isalnum() and scheme.isascii():  # the usual case, without urlsplit
        return scheme.lower() in ("http", "https")
    return urlsplit(uri).scheme.lower() in ("http", "https")


def _as_data_uri(data: bytes) -> str:
    # unknown bytes go as raw base64: the service sniffs them and answers with a clear error
    return imageio.image_data_uri(data) or imageio.encode_base64(data)


def _as_error_object(exc: Any) -> ErrorObject:
    error = getattr(exc, "error", None)
    if isinstance(error, ErrorObject):
        return error
    if isinstance(exc, GuideflowError):
        return ErrorObject.from_exception(exc)
    return ErrorObject(code="internalError", message=str(exc))


def _as_guideflow_error(exc: Exception) -> GuideflowError:
    obj = _as_error_object(exc)
    return GuideflowError(
        obj.message,
        code=obj.code,
        parameter=obj.parameter,
        retryable=bool(getattr(exc, "retryable", False)),
    )
