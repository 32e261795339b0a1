"""The in-process engine: bytes in, guide image out, with Runware's resize and output semantics.

This is the single entry point that the CLI, the HTTP server and the pipeline's
local backend all call, so the three can never disagree about what a request means::

    engine = Engine()
    guide = engine.preprocess(png_bytes, "canny", {"lowThresholdCanny": 50}, width=512)
    Path("edges.png").write_bytes(guide.data)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import imageio, registry
from engine.imageio import DEFAULT_LIMITS, ImageLimits
from engine.models.store import ModelStore, default_store
from engine.registry import ProcessContext, derive_seed


@dataclass(frozen=True)
class GuideImage:
    """A finished guide image and what produced it."""

    data: bytes
    array: np.ndarray
    preprocessor: str
    variant: str
    output_format: str
    width: int
    height: int
    settings: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return imageio.content_type(self.output_format)

    @property
    def extension(self) -> str:
        return imageio.file_extension(self.output_format)


@dataclass(frozen=True)
class PreparedRequest:
    """A request whose every parameter has been validated (no image decoded yet)."""

    preprocessor: registry.Preprocessor
    settings: dict[str, Any]
    width: int | None
    height: int | None
    output_format: str
    output_quality: int

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Equal for requests that may share one :meth:`Engine.run_batch` call."""
        return (
            self.preprocessor.name,
            tuple(sorted(self.settings.items())),
            self.width,
            self.height,
            self.output_format,
            self.output_quality,
        )

    @property
    def batches(self) -> bool:
        """Whether grouping images of this request saves work (shared forward passes)."""
        return self.preprocessor.batches(self.settings)


class Engine:
    """Runs the registered preprocessors in-process.

    Stateless apart from the shared model store and ONNX sessions, so one
    instance may be used from many threads at once.
    """

    def __init__(self, models: ModelStore | None = None, limits: ImageLimits = DEFAULT_LIMITS):
        self.models = models
        self.limits = limits

    @property
    def model_store(self) -> ModelStore:
        return self.models or default_store()

    def prepare(
        self,
        preprocessor: str,
        settings: Mapping[str, Any] | None = None,
        *,
        width: Any = None,
        height: Any = None,
        output_format: str = "JPG",
        output_quality: Any = 95,
    ) -> PreparedRequest:
        """Validate everything that does not need the image; raise the first Runware error."""
        proc = registry.get(preprocessor)
        return PreparedRequest(
            preprocessor=proc,
            settings=proc.validate(settings),
            width=imageio.validate_dimension(width, "width"),
            height=imageio.validate_dimension(height, "height"),
            output_format=imageio.normalize_format(output_format),
            output_quality=imageio.validate_quality(output_quality),
        )

    def preprocess(
        self,
        image: bytes | np.ndarray,
        preprocessor: str,
        settings: Mapping[str, Any] | None = None,
        *,
        width: Any = None,
        height: Any = None,
        output_format: str = "JPG",
        output_quality: Any = 95,
        task_uuid: str | None = None,
    ) -> GuideImage:
        """Decode ``image``, downscale it if asked, run the preprocessor, encode the result.

        ``width``/``height`` only ever downscale (see :func:`engine.imageio.target_size`).
        ``task_uuid`` seeds randomised preprocessors so a retried task is reproducible.
        """
        req = self.prepare(
            preprocessor,
            settings,
            width=width,
            height=height,
            output_format=output_format,
            output_quality=output_quality,
        )
        return self.run(req, image, task_uuid=task_uuid)

    def run(
        self, req: PreparedRequest, image: bytes | np.ndarray, *, task_uuid: str | None = None
    ) -> GuideImage:
        """Run an already-validated request on one image (:meth:`run_batch` of one)."""
        (result,) = self.run_batch(req, [image], [task_uuid])
        if isinstance(result, Exception):
            raise result
        return result

    def run_batch(
        self,
        req: PreparedRequest,
        images: Sequence[bytes | np.ndarray],
        task_uuids: Sequence[str | None] | None = None,
    ) -> list[GuideImage | Exception]:
        """Run one validated request on several images; one result per image, in order.

        Each image is decoded and resized on its own, gets its own seed (from its task
        UUID, else its bytes) and its own ``meta``; then all go through one
        ``process_batch`` call, so model-based preprocessors share forward passes, and
        each guide is encoded. A failure belongs to its image: a ``GuideflowError`` for
        anything user-caused (a corrupt file...), any other exception for a bug, returned
        rather than raised so the other images still finish.
        """
        uuids = list(task_uuids) if task_uuids is not None else [None] * len(images)
        if len(uuids) != len(images):
            raise ValueError(f"{len(images)} images but {len(uuids)} task UUIDs")
        results: list[GuideImage | Exception | None] = [None] * len(images)
        loaded: list[tuple[int, np.ndarray, int]] = []  # (index, rgb at output size, seed)
        for index, (image, task_uuid) in enumerate(zip(images, uuids, strict=True)):
            try:
                loaded.append((index, *self._load(req, image, task_uuid)))
            except Exception as exc:
                results[index] = exc
        outputs = self._process(req, [rgb for _, rgb, _ in loaded], [s for _, _, s in loaded])
        for (index, rgb, _), (out, ctx) in zip(loaded, outputs, strict=True):
            if isinstance(out, Exception):
                results[index] = out
                continue
            try:
                results[index] = self._finish(req, rgb, out, ctx)
            except Exception as exc:
                results[index] = exc
        return [r for r in results if r is not None]

    def _load(
        self, req: PreparedRequest, image: bytes | np.ndarray, task_uuid: str | None
    ) -> tuple[np.ndarray, int]:
        """Decode (or take) the image, downscale it to the output size; and its seed."""
        if isinstance(image, np.ndarray):
            rgb = imageio.hwc3(image)
            seed_source: bytes | None = None if task_uuid else rgb.tobytes()[: 1 << 16]
        else:
            rgb = imageio.decode_image(image, self.limits)
            seed_source = None if task_uuid else image
        size = imageio.target_size(rgb.shape[1], rgb.shape[0], req.width, req.height)
        return imageio.resize_to(rgb, size), derive_seed(task_uuid, seed_source)

    def _process(
        self, req: PreparedRequest, rgbs: list[np.ndarray], seeds: list[int]
    ) -> list[tuple[np.ndarray | Exception, ProcessContext]]:
        """One ``process_batch`` call; if it raises, each image alone, so errors stay its own."""
        if not rgbs:
            return []
        ctxs = [ProcessContext(seed=seed, models=self.model_store) for seed in seeds]
        try:
            outs = req.preprocessor.process_batch(rgbs, req.settings, ctxs)
            if len(outs) != len(rgbs):
                raise AssertionError(
                    f"{req.preprocessor.name} returned {len(outs)} images for {len(rgbs)}"
                )
            return [(out, ctx) for out, ctx in zip(outs, ctxs, strict=True)]
        except Exception as exc:
            if len(rgbs) == 1:
                return [(exc, ctxs[0])]
        results: list[tuple[np.ndarray | Exception, ProcessContext]] = []
        for rgb, seed in zip(rgbs, seeds, strict=True):
            ctx = ProcessContext(seed=seed, models=self.model_store)  # no meta from the batch
            try:
                results.append((req.preprocessor.process(rgb, req.settings, ctx), ctx))
            except Exception as exc:
                results.append((exc, ctx))
        return results

    @staticmethod
    def _finish(
        req: PreparedRequest, rgb: np.ndarray, out: np.ndarray, ctx: ProcessContext
    ) -> GuideImage:
        """Check the preprocessor's output against its input ``rgb`` and encode it."""
        if out.shape[:2] != rgb.shape[:2] or out.ndim != 3 or out.shape[2] != 3:
            raise AssertionError(
                f"{req.preprocessor.name} returned {out.shape}, expected {rgb.shape}"
            )  # a programming error in a preprocessor, never user input
        data = imageio.encode_image(out, req.output_format, req.output_quality)
        return GuideImage(
            data=data,
            array=out,
            preprocessor=req.preprocessor.name,
            variant=req.settings.get("variant", req.preprocessor.default_variant),
            output_format=req.output_format,
            width=out.shape[1],
            height=out.shape[0],
            settings=dict(req.settings),
            meta=dict(ctx.meta),
        )
