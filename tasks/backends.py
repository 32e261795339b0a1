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
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from connectors import storage
from engine import imageio
from engine.api import Engine
from guideflow import netguard
from guideflow.errors import GuideflowError
from guideflow.pricing import PriceTable
from guideflow.protocol import ErrorObject, PreprocessResult, PreprocessTask, new_task_uuid
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
    """

    name = "local"

    def __init__(
        self, config: RunConfig, engine: Engine | None = None, prices: PriceTable | None = None
    ):
        self.config = config
        self.engine = engine or Engine()
        self.prices = prices or PriceTable.load()
        self._pool = ThreadPoolExecutor(max_workers=_cpu_workers(), thread_name_prefix="engine")
        self._http: httpx.AsyncClient | None = None

    async def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        by_image: dict[str, list[WorkItem]] = defaultdict(list)
        for item in items:
            by_image[item.input_uri].append(item)
        groups = await asyncio.gather(*(self._run_image(g) for g in by_image.values()))
        return [outcome for group in groups for outcome in group]

    async def _run_image(self, items: list[WorkItem]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        started = time.time()
        try:
            data = await self._read_input(items[0].input_uri)
            rgb = await loop.run_in_executor(
                self._pool, imageio.decode_image, data, self.engine.limits
            )
        except GuideflowError as exc:
            return [Outcome.failed(item, exc, started=started) for item in items]
        except Exception as exc:  # never let one image fail its whole shard
            error = _unexpected(exc)
            return [Outcome.failed(item, error, started=started) for item in items]
        return list(await asyncio.gather(*(self._run_item(item, rgb) for item in items)))

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

    async def _run_item(self, item: WorkItem, rgb: Any) -> Outcome:
        loop = asyncio.get_running_loop()
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
            guide = await loop.run_in_executor(
                self._pool, lambda: self.engine.run(req, rgb, task_uuid=item.task_uuid)
            )
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

    async def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        started = time.time()
        refs: dict[str, str | GuideflowError] = {}
        uses: dict[str, int] = defaultdict(int)
        for item in items:
            uses[item.input_uri] += 1
        await asyncio.gather(*(self._image_ref(uri, uses[uri], refs) for uri in uses))
        tasks: list[PreprocessTask] = []
        sendable: list[WorkItem] = []
        outcomes: dict[int, Outcome] = {}
        for index, item in enumerate(items):
            ref = refs[item.input_uri]
            if isinstance(ref, GuideflowError):
                outcomes[index] = Outcome.failed(item, ref, started=started)
                continue
            # A fresh taskUUID per task sent (the ledger records it): Runware wants each
            # task's UUID unique, and guideflow serve answers a known taskUUID carrying a
            # different payload (new presigned URLs, a new upload UUID: every re-run, forced
            # run or shard retry) with conflictTaskUUID. The client's own retries re-send
            # the same task object, so a lost response is still replayed, not redone.
            item = replace(item, task_uuid=new_task_uuid())
            try:
                tasks.append(await self._task(item, ref))
            except GuideflowError as exc:
                outcomes[index] = Outcome.failed(item, exc, started=started)
                continue
            sendable.append(item)
        try:
            results = await self.client.preprocess_many(tasks) if tasks else []
        except Exception as exc:  # retries exhausted for the whole batch: every task failed
            results = [exc] * len(tasks)
        finished_items = iter(zip(sendable, results, strict=True))
        out: list[Outcome] = []
        for index in range(len(items)):
            if index in outcomes:
                out.append(outcomes[index])
                continue
            sent, result = next(finished_items)
            out.append(await self._outcome(sent, result, started))
        return out

    async def _image_ref(self, uri: str, uses: int, refs: dict[str, str | GuideflowError]) -> None:
        """How the service gets the input: presigned GET, the URL itself, or bytes; uploaded
        once if reused. http(s) URLs go as they are: the service fetches them (under its
        own SSRF policy), and connectors.storage refuses them."""
        try:
            if storage.is_s3(uri):
                ref = await storage.presign_get(uri, expires=self.config.presign_expiry_s)
            elif urlsplit(uri).scheme.lower() in ("http", "https"):
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

    async def _task(self, item: WorkItem, image_ref: str) -> PreprocessTask:
        fields: dict[str, Any] = {
            "width": item.width,
            "height": item.height,
            "outputFormat": item.output_format,
            "outputQuality": item.output_quality,
            "includeCost": True,
        }
        if storage.is_s3(item.output_uri):
            fields["uploadEndpoint"] = await storage.presign_put(
                item.output_uri,
                content_type=item.content_type,
                expires=self.config.presign_expiry_s,
            )
            fields["outputType"] = "URL"
            fields["ttl"] = SERVICE_TTL_S
        else:
            fields["outputType"] = "base64Data"
        return PreprocessTask.build(
            item.preprocessor,
            image_ref,
            settings=item.settings or None,
            task_uuid=item.task_uuid,
            **{k: v for k, v in fields.items() if v is not None},
        )

    async def _outcome(self, item: WorkItem, result: Any, started: float) -> Outcome:
        if not isinstance(result, PreprocessResult):
            return Outcome.failed(item, _as_error_object(result), started=started)
        try:
            if not storage.is_s3(item.output_uri):
                data = result.guide_bytes()
                if data is None:
                    raise GuideflowError(
                        "the service returned no image bytes", code="invalidResponse"
                    )
                await storage.write_bytes(item.output_uri, data, content_type=item.content_type)
        except GuideflowError as exc:
            return Outcome.failed(item, exc, started=started)
        finished = time.time()
        cost = result.cost if result.cost is not None else self.prices.price(item.preprocessor)
        return Outcome(
            status="success",
            item=item,
            guide_image_uuid=result.guideImageUUID,
            cost_usd=float(cost),
            latency_ms=(finished - started) * 1000,
            started_at=started,
            finished_at=finished,
            method=getattr(result, "method", None),
        )

    async def aclose(self) -> None:
        await self.client.aclose()


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
