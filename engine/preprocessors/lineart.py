"""lineart: white line drawing on black (ControlNet 1.1's Lineart guide).

Variants (the first is the default):

* ``realistic`` — ControlNet 1.1's ``lineart_realistic``: the informative-drawings
  generator (``sk_model.pth`` in ``lllyasviel/Annotators``), here its ONNX export
  ``lineart/lineart.onnx`` from ``deepghs/imgutils-models``.
* ``coarse`` — ``lineart_coarse``: the same network with ``sk_model2.pth`` weights
  (``lineart/lineart_coarse.onnx``): bolder, richer lines.
* ``standard`` — sd-webui-controlnet's classical ``lineart_standard`` (no weights): how
  much darker each pixel is than its Gaussian-blurred surroundings. Its settings
  ``gaussianSigma`` (default 6.0) and ``intensityThreshold`` (default 8) apply to this
  variant only; naming them with another variant is ``invalidParameter``.

**Network I/O** (both model variants): input ``input`` float32 ``[1,3,H,W]``, RGB/255, no
normalisation, at ControlNet's detect resolution (shorter side 512, sides rounded to 64);
output ``output`` ``[1,1,H,W]`` in [0, 1], a drawing with *dark* lines on white. As in
ControlNet, it is inverted (``1 - out``) to white lines on black after being resized back
to the output size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from engine.models.onnx import map_batched, session_for
from engine.models.store import ModelSpec
from engine.preprocessors._classical import lineart_standard
from engine.preprocessors._common import (
    fit_size,
    gray_to_rgb,
    resize,
    single_plane,
    to_nchw,
    to_uint8,
)
from engine.registry import BatchedPreprocessor, ProcessContext, Setting, register
from guideflow.errors import InvalidParameter

_REPO = "deepghs/imgutils-models"
#: The commit that published the lineart ONNX exports (unchanged since, through ``main``).
_REVISION = "14f827090de9bab409bfe5179c541cce4d08e5f9"
_LICENSE = (
    "MIT (deepghs/imgutils-models; informative-drawings weights by Caroline Chan, MIT, "
    "as shipped in lllyasviel/Annotators)"
)

LINEART_REALISTIC = ModelSpec(
    name="lineart_realistic",
    directory="lineart",
    filename="lineart.onnx",
    sha256="14570bc70981c7cab28dbd06938b7b25f4b3e969476e816f99cc39ecd8a1c820",
    size=17_327_508,
    license=_LICENSE,
    description=(
        "ControlNet 1.1 lineart_realistic (informative-drawings sk_model.pth) as ONNX. Input "
        "'input' float32 [1,3,H,W] RGB/255; output 'output' [1,1,H,W] in [0,1], dark lines."
    ),
    repo_id=_REPO,
    revision=_REVISION,
    repo_filename="lineart/lineart.onnx",
    source="https://huggingface.co/deepghs/imgutils-models (lineart/lineart.onnx)",
)

LINEART_COARSE = ModelSpec(
    name="lineart_coarse",
    directory="lineart",
    filename="lineart_coarse.onnx",
    sha256="e32fc7b9ffd219ac38f6bd770c5d537c92f1038f81a6a258db03f4d0d501a64c",
    size=17_327_508,
    license=_LICENSE,
    description=(
        "ControlNet 1.1 lineart_coarse (informative-drawings sk_model2.pth) as ONNX; same "
        "I/O as lineart_realistic."
    ),
    repo_id=_REPO,
    revision=_REVISION,
    repo_filename="lineart/lineart_coarse.onnx",
    source="https://huggingface.co/deepghs/imgutils-models (lineart/lineart_coarse.onnx)",
)

#: Variant → name of the module-level spec it uses (looked up at call time).
_VARIANT_SPECS: dict[str, str] = {"realistic": "LINEART_REALISTIC", "coarse": "LINEART_COARSE"}

DETECT_RESOLUTION = 512
DETECT_MULTIPLE = 64
MAX_DETECT_SIDE = 2048
DEFAULT_GAUSSIAN_SIGMA = 6.0
DEFAULT_INTENSITY_THRESHOLD = 8
#: Settings that only the ``standard`` variant accepts.
STANDARD_ONLY = ("gaussianSigma", "intensityThreshold")


def lineart_spec(variant: str) -> ModelSpec:
    """The spec a model variant runs (read from the module at call time)."""
    return globals()[_VARIANT_SPECS[variant]]


def model_lines(
    rgbs: Sequence[np.ndarray], variant: str, ctxs: Sequence[ProcessContext]
) -> list[np.ndarray]:
    """White-on-black line strength in [0, 1] (``H×W`` float32) per image, from ``variant``.

    Images with the same detect size share forward passes.
    """
    spec = lineart_spec(variant)
    session = session_for(spec, ctxs[0].models)

    def prepare(item: tuple[np.ndarray, ProcessContext]) -> np.ndarray:
        h, w = item[0].shape[:2]
        dw, dh = fit_size(w, h, DETECT_RESOLUTION, DETECT_MULTIPLE, MAX_DETECT_SIDE)
        return to_nchw(resize(item[0], dw, dh), scale=1.0 / 255.0)

    def finish(item: tuple[np.ndarray, ProcessContext], x: np.ndarray, outs: list[Any]) -> Any:
        rgb, ctx = item
        drawing = single_plane(np.asarray(outs[0], dtype=np.float32), spec).clip(0.0, 1.0)
        ctx.meta["model"] = spec.name
        ctx.meta["detectSize"] = [int(x.shape[3]), int(x.shape[2])]
        h, w = rgb.shape[:2]
        if drawing.shape != (h, w):
            drawing = cv2.resize(drawing, (w, h), interpolation=cv2.INTER_LINEAR)
        return 1.0 - drawing.clip(0.0, 1.0)

    items = list(zip(rgbs, ctxs, strict=True))
    return map_batched(
        session, items, prepare, finish, output_names=[session.get_outputs()[0].name]
    )


@register
class Lineart(BatchedPreprocessor):
    """Line art: informative-drawings (realistic / coarse) or the classical standard method."""

    name = "lineart"
    summary = "White line drawing on black (ControlNet 1.1 lineart realistic / coarse / standard)."
    variants = ("realistic", "coarse", "standard")
    settings = (
        Setting(
            "gaussianSigma",
            float,
            None,
            f"standard variant only: blur radius (sigma) of the surroundings each pixel is "
            f"compared with (default {DEFAULT_GAUSSIAN_SIGMA}).",
            minimum=0.1,
            maximum=100.0,
        ),
        Setting(
            "intensityThreshold",
            int,
            None,
            f"standard variant only: line strength (0-255) a pixel needs to count towards "
            f"the median used for scaling (default {DEFAULT_INTENSITY_THRESHOLD}).",
            minimum=0,
            maximum=255,
        ),
    )
    price_class = "depth"

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        return () if variant == "standard" else (lineart_spec(variant),)

    def check(self, values: dict[str, Any]) -> None:
        """Refuse standard-only settings with a model variant (they would silently do nothing).

        For the standard variant, fill in their defaults so the effective values are recorded.
        """
        if values["variant"] == "standard":
            if values.get("gaussianSigma") is None:
                values["gaussianSigma"] = DEFAULT_GAUSSIAN_SIGMA
            if values.get("intensityThreshold") is None:
                values["intensityThreshold"] = DEFAULT_INTENSITY_THRESHOLD
            return
        given = [name for name in STANDARD_ONLY if values.get(name) is not None]
        if given:
            raise InvalidParameter(
                f"{self.name}: {', '.join(repr(n) for n in given)} "
                f"appl{'ies' if len(given) == 1 else 'y'} only to the standard variant, "
                f"not to variant '{values['variant']}'",
                parameter=given[0],
            )

    def batches(self, params: Mapping[str, Any]) -> bool:
        return params.get("variant", self.default_variant) != "standard"

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        variant = params.get("variant", self.default_variant)
        if variant == "standard":
            return [self._standard(image, params) for image in images]
        return [gray_to_rgb(to_uint8(lines)) for lines in model_lines(images, variant, ctxs)]

    @staticmethod
    def _standard(image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """The classical ``lineart_standard`` (no model)."""
        sigma = params.get("gaussianSigma")
        threshold = params.get("intensityThreshold")
        lines = lineart_standard(
            image,
            gaussian_sigma=DEFAULT_GAUSSIAN_SIGMA if sigma is None else sigma,
            intensity_threshold=DEFAULT_INTENSITY_THRESHOLD if threshold is None else threshold,
        )
        return gray_to_rgb(lines)
