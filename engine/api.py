"""The in-process engine: bytes in, guide image out, with Runware's resize and output semantics.

This is the single entry point that the CLI, the HTTP server and the pipeline's
local backend all call, so the three can never disagree about what a request means::

    engine = Engine()
    guide = engine.preprocess(png_bytes, "canny", {"lowThresholdCanny": 50}, width=512)
    Path("edges.png").write_bytes(guide.data)
"""

from __future__ import annotations

from collections.abc import Mapping
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
        """Run an already-validated request on one image."""
        if isinstance(image, np.ndarray):
            rgb = imageio.hwc3(image)
            seed_source: bytes | None = None if task_uuid else rgb.tobytes()[: 1 << 16]
        else:
            rgb = imageio.decode_image(image, self.limits)
            seed_source = None if task_uuid else image
        size = imageio.target_size(rgb.shape[1], rgb.shape[0], req.width, req.height)
        rgb = imageio.resize_to(rgb, size)
        ctx = ProcessContext(seed=derive_seed(task_uuid, seed_source), models=self.model_store)
        out = req.preprocessor.process(rgb, req.settings, ctx)
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
