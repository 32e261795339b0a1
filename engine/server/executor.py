"""Running one task: resolve the input image, preprocess in the worker pool, store, upload.

The event loop only awaits: every CPU-bound or blocking step (base64 decode,
image decode, the preprocessor, encoding, file I/O) runs in the bounded
``ThreadPoolExecutor``; outbound HTTP (input URLs, uploadEndpoint, webhooks)
goes through the SSRF-guarded client of :mod:`guideflow.netguard`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from engine import imageio
from engine.api import Engine, GuideImage, PreparedRequest
from engine.server.config import ServerConfig
from engine.server.storage import ImageKind, ImageStore, StoredImage, extension_of
from guideflow.errors import GuideflowError, InvalidImage
from guideflow.netguard import (
    RefusedURL,
    UnsupportedURLScheme,
    UploadFailed,
    WebhookFailed,
    fetch_bytes,
    post_json,
    put_bytes,
    redact_url,
)
from guideflow.protocol import ImageUploadResult, ImageUploadTask, PreprocessResult, PreprocessTask

log = logging.getLogger("guideflow.server")


class ImageNotFound(GuideflowError):
    """An image UUID that was never stored here, or whose image has expired."""

    code = "imageNotFound"
    http_status = 404


def image_parameter(task: PreprocessTask) -> str:
    """The request field that carried the image: ``inputImage`` or ``inputs.image``."""
    return "inputs.image" if task.inputs is not None else "inputImage"


def renamed(exc: GuideflowError, parameter: str) -> GuideflowError:
    """``exc`` with the engine's generic ``inputImage`` parameter renamed to ``parameter``."""
    if exc.parameter == imageio.INPUT_PARAMETER:
        exc.parameter = parameter
    return exc


@dataclass(frozen=True)
class ImageSource:
    """An input image: bytes already at hand, or a reference to decode in the pool."""

    kind: str  # "uuid" | "dataURI" | "base64" | "bytes"
    ref: str = ""
    data: bytes = b""


class BatchGroup:
    """Same-settings preprocess tasks of one POST: their engine step is one ``run_batch``.

    Every member either hands in its input bytes (:meth:`run`) or leaves (its input
    failed before the engine, or it was cancelled). Once each member has done one or the
    other, the images handed in go through :meth:`Engine.run_batch` in the worker pool,
    and each member gets its own guide image or its own error. Fetching inputs, storing,
    uploads and webhooks stay per task, exactly as for a lone task.
    """

    def __init__(self, runner: Runner, prepared: PreparedRequest, size: int) -> None:
        self.runner = runner
        self.prepared = prepared
        self.size = size
        self.members: list[tuple[bytes, str, asyncio.Future[GuideImage]]] = []
        self.left = 0
        self.flush: asyncio.Task[None] | None = None

    async def run(self, data: bytes, task_uuid: str) -> GuideImage:
        """This member's guide image, once the whole group has run (raises its error)."""
        future: asyncio.Future[GuideImage] = asyncio.get_running_loop().create_future()
        self.members.append((data, task_uuid, future))
        self._maybe_start()
        return await future

    def leave(self) -> None:
        """This member will not hand in an image."""
        self.left += 1
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self.flush is None and len(self.members) + self.left >= self.size and self.members:
            self.flush = asyncio.create_task(self._run())

    async def _run(self) -> None:
        members = self.members
        try:
            results = await self.runner._in_pool(
                self.runner.engine.run_batch,
                self.prepared,
                [data for data, _, _ in members],
                [task_uuid for _, task_uuid, _ in members],
            )
        except asyncio.CancelledError:  # the server is stopping
            for _, _, future in members:
                future.cancel()
            raise
        except Exception as exc:  # the pool shut down
            for _, _, future in members:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(members, results, strict=True):
            if future.done():  # its task was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class Runner:
    """Executes validated tasks; owns the worker pool, the engine and the image store."""

    def __init__(self, config: ServerConfig, store: ImageStore) -> None:
        self.config = config
        self.store = store
        self.engine = config.engine or Engine(limits=config.image_limits)
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="guideflow-worker")
        self.client: httpx.AsyncClient | None = None  # set by the app's lifespan

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:  # pragma: no cover - only without the lifespan
            raise GuideflowError("the server's HTTP client is not running", http_status=503)
        return self.client

    # -- input images -------------------------------------------------------------------

    def check_image_ref(self, ref: str, parameter: str) -> None:
        """Cheap checks before a task is admitted: a UUID must name a live stored image."""
        kind = imageio.classify_image_ref(ref)
        if kind == "uuid" and self.store.lookup(ref.strip().lower()) is None:
            raise ImageNotFound(
                f"no uploaded or generated image with UUID {ref.strip()} (unknown or expired)",
                parameter=parameter,
            )
        if kind == "url" and not ref.strip().lower().startswith(("http://", "https://")):
            # the same code netguard (redirect hops) and the pipeline's local backend use
            raise UnsupportedURLScheme(
                f"{redact_url(ref.strip())}: image URLs must use http or https",
                parameter=parameter,
            )

    def check_upload_ref(self, ref: str) -> None:
        """``imageUpload`` takes the image itself: a data URI, base64 or an http(s) URL."""
        if imageio.classify_image_ref(ref) == "uuid":
            raise InvalidImage(
                "imageUpload takes the image itself (data URI, base64 or URL), not a UUID",
                parameter="image",
            )
        self.check_image_ref(ref, "image")

    async def source_of(self, ref: str, parameter: str) -> ImageSource:
        """Fetch URL images (async, guarded, byte-capped); other kinds are decoded later."""
        kind = imageio.classify_image_ref(ref)
        if kind != "url":
            return ImageSource(kind=kind, ref=ref.strip())
        url = ref.strip()
        try:
            data = await fetch_bytes(
                self._client(),
                url,
                max_bytes=self.config.image_limits.max_bytes,
                parameter=parameter,
            )
        except GuideflowError as exc:
            log.info("input fetch failed: %s (%s)", redact_url(url), exc.code)
            raise renamed(exc, parameter) from None
        return ImageSource(kind="bytes", data=data)

    def _materialize(self, src: ImageSource, parameter: str) -> tuple[bytes, str | None]:
        """Bytes of ``src`` and, for a stored image, its UUID (runs in the pool)."""
        if src.kind == "uuid":
            found = self.store.read(src.ref.lower(), touch=True)
            if found is None:
                raise ImageNotFound(
                    f"no uploaded or generated image with UUID {src.ref} (unknown or expired)",
                    parameter=parameter,
                )
            return found[1], found[0].uuid
        if src.kind == "dataURI":
            return imageio.decode_data_uri(src.ref, parameter=parameter), None
        if src.kind == "base64":
            return imageio.decode_base64_image(src.ref, parameter=parameter), None
        return src.data, None

    def _store_input(
        self, data: bytes, kind: ImageKind = "input", *, defer: bool = False
    ) -> StoredImage:
        """Keep an input image addressable by UUID (``upload_ttl`` after its last use)."""
        fmt = imageio.sniff_format(data)
        assert fmt is not None  # it decoded, so it sniffed
        return self.store.put(
            data,
            extension_of(fmt),
            ttl=self.config.upload_ttl,
            kind=kind,
            refresh=True,
            defer=defer,
        )

    # -- controlNetPreprocess -----------------------------------------------------------

    async def preprocess(
        self,
        task: PreprocessTask,
        prepared: PreparedRequest,
        base_url: str,
        group: BatchGroup | None = None,
    ) -> dict[str, Any]:
        """Run one preprocess task to its result item (raises ``GuideflowError``).

        With a ``group`` (same-settings tasks of one POST), the engine step runs in one
        ``run_batch`` call with the group's other members; everything else is per task.
        """
        parameter = image_parameter(task)
        if group is None:
            src = await self.source_of(task.image, parameter)
            guide, guide_entry, input_uuid, inline = await self._in_pool(
                self._preprocess_sync, task, prepared, src, parameter
            )
        else:
            guide, guide_entry, input_uuid, inline = await self._preprocess_grouped(
                task, parameter, group
            )
        if task.uploadEndpoint:
            await self.upload(task.uploadEndpoint, guide.data, guide.content_type)
        result = PreprocessResult(
            taskType=task.taskType,
            taskUUID=task.taskUUID,
            guideImageUUID=guide_entry.uuid,
            inputImageUUID=input_uuid,
            cost=self.config.prices.price(prepared.preprocessor.name) if task.includeCost else None,
        )
        if task.outputType == "URL":
            result.guideImageURL = f"{base_url}/image/{guide_entry.filename}"
        elif task.outputType == "base64Data":
            result.guideImageBase64Data = inline
        else:
            result.guideImageDataURI = inline
        return result.wire()

    def _preprocess_sync(
        self, task: PreprocessTask, prepared: PreparedRequest, src: ImageSource, parameter: str
    ) -> tuple[GuideImage, StoredImage, str, str | None]:
        try:
            data, input_uuid = self._materialize(src, parameter)
            guide = self.engine.run(prepared, data, task_uuid=task.taskUUID)
        except GuideflowError as exc:
            raise renamed(exc, parameter) from None
        return self._keep(task, guide, data, input_uuid)

    async def _preprocess_grouped(
        self, task: PreprocessTask, parameter: str, group: BatchGroup
    ) -> tuple[GuideImage, StoredImage, str, str | None]:
        """Input to bytes (pool), engine with the group (pool, once), results kept (pool)."""
        try:
            src = await self.source_of(task.image, parameter)
            data, input_uuid = await self._in_pool(self._materialize_renamed, src, parameter)
        except BaseException:
            group.leave()  # the others must not wait for an image that will never come
            raise
        try:
            guide = await group.run(data, task.taskUUID)
        except GuideflowError as exc:
            raise renamed(exc, parameter) from None
        return await self._in_pool(self._keep, task, guide, data, input_uuid)

    def _materialize_renamed(self, src: ImageSource, parameter: str) -> tuple[bytes, str | None]:
        try:
            return self._materialize(src, parameter)
        except GuideflowError as exc:
            raise renamed(exc, parameter) from None

    def _keep(
        self, task: PreprocessTask, guide: GuideImage, data: bytes, input_uuid: str | None
    ) -> tuple[GuideImage, StoredImage, str, str | None]:
        """Store the input (if new) and the guide; the inline answer if one is wanted."""
        if input_uuid is None:
            # written behind: the answer does not wait for the file (usable by UUID at once)
            input_uuid = self._store_input(data, defer=True).uuid
        ttl = task.ttl if task.ttl is not None else self.config.ttl
        # a guide answered by URL is on disk before the URL is handed out; one answered
        # inline is kept for reuse by UUID and written behind like the input
        entry = self.store.put(
            guide.data, guide.extension, ttl=ttl, kind="guide", defer=task.outputType != "URL"
        )
        inline: str | None = None
        if task.outputType == "base64Data":
            inline = imageio.encode_base64(guide.data)
        elif task.outputType == "dataURI":
            inline = imageio.encode_data_uri(guide.data, guide.output_format)
        return guide, entry, input_uuid, inline

    async def upload(self, url: str, data: bytes, content_type: str) -> None:
        """PUT ``data`` to ``uploadEndpoint``: a failure fails the task, never silently.

        Raises netguard's ``uploadFailed`` (502 when worth retrying: network errors,
        5xx, 429; else 400) or its refusal (``forbiddenURL``/``unsupportedURLScheme``).
        """
        where = redact_url(url)
        try:
            await put_bytes(self._client(), url, data, content_type, parameter="uploadEndpoint")
        except RefusedURL as exc:
            log.warning("upload refused by network policy: %s", where)
            raise exc.with_parameter("uploadEndpoint") from None
        except GuideflowError as exc:
            log.warning("upload to %s failed: %s", where, exc.code)
            raise
        except httpx.HTTPError as exc:  # pragma: no cover - netguard wraps these
            raise UploadFailed(
                f"uploading the guide image to {where} failed: {type(exc).__name__}",
                parameter="uploadEndpoint",
                retryable=True,
                http_status=502,
            ) from None
        log.info("uploaded guide image to %s", where)

    # -- imageUpload --------------------------------------------------------------------

    async def image_upload(self, task: ImageUploadTask, base_url: str) -> dict[str, Any]:
        """Validate (sniff + full decode) and store an uploaded image; its UUID for later tasks."""
        src = await self.source_of(task.image, "image")
        entry = await self._in_pool(self._upload_sync, src)
        return ImageUploadResult(
            taskType="imageUpload",
            taskUUID=task.taskUUID,
            imageUUID=entry.uuid,
            imageURL=f"{base_url}/image/{entry.filename}",
        ).wire()

    def _upload_sync(self, src: ImageSource) -> StoredImage:
        try:
            data, _ = self._materialize(src, "image")
            imageio.decode_image(data, self.config.image_limits)
        except GuideflowError as exc:
            raise renamed(exc, "image") from None
        return self._store_input(data, "upload")

    # -- webhooks -----------------------------------------------------------------------

    async def deliver_webhook(
        self, url: str, payload: dict[str, Any], record: dict[str, Any]
    ) -> None:
        """POST ``payload`` to ``url``, retrying non-2xx and connection errors with backoff.

        ``record`` (the job's ``webhook`` dict) is updated in place after every attempt:
        ``status`` pending → delivered | failed, ``attempts``, ``lastStatus``, ``error``.
        """
        where = redact_url(url)
        for attempt in range(1, self.config.webhook_attempts + 1):
            record["attempts"] = attempt
            try:
                status = await post_json(self._client(), url, payload, parameter="webhookURL")
            except RefusedURL as exc:  # retrying cannot change the policy's answer
                record.update(status="failed", error=exc.code)
                log.warning("webhook refused by network policy: %s", where)
                return
            except WebhookFailed as exc:
                record.update(lastStatus=exc.status, error=exc.code)
            except (GuideflowError, httpx.HTTPError) as exc:
                record.update(lastStatus=None, error=getattr(exc, "code", type(exc).__name__))
            else:
                record.update(status="delivered", lastStatus=status)
                record.pop("error", None)
                log.info("webhook delivered to %s after %d attempt(s)", where, attempt)
                return
            if attempt < self.config.webhook_attempts:
                await asyncio.sleep(self.config.webhook_backoff * 2 ** (attempt - 1))
        record["status"] = "failed"
        log.warning(
            "webhook to %s failed after %d attempts (last HTTP status %s)",
            where,
            record["attempts"],
            record.get("lastStatus"),
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
