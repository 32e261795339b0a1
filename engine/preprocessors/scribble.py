"""scribble: binary scribble strokes, white on black, as ControlNet 1.1 synthesises them.

Variants:

* ``pidinet`` (default) — PiDiNet soft edges turned into strokes (ControlNet 1.1's
  ``scribble_pidinet`` annotator).
* ``hed`` — the same from HED soft edges (``scribble_hed``); needs the user-exported HED
  ONNX described in :mod:`engine.preprocessors.softedge`.
* ``xdog`` — a difference-of-Gaussians sketch, no model (``scribble_xdog``).

**Why PiDiNet is the default.** ``gradio_scribble.py`` of ControlNet 1.1 pre-selects
``Scribble_HED``, but ``control_v11p_sd15_scribble`` was trained on scribbles synthesised
from both HED and PiDiNet, the two go through the identical stroke step below, and the
AUTOMATIC1111 ControlNet extension (the interface most Runware-style pipelines mirror)
defaults to ``scribble_pidinet``. PiDiNet is also the soft-edge network whose weights this
project can pin and ship, so the default runs out of the box; ``hed`` stays available.

**Strokes from soft edges** (ControlNet's ``gradio_scribble.py`` / controlnet_aux
``scribble=True``): the soft edge map is computed as for ``softedge`` and brought to the
output size as 8 bits, then

1. ``nms(map, 127, 3.0)`` (``annotator.util.nms``): Gaussian blur σ=3, keep pixels that
   are a maximum along at least one of 4 directions (3×3 line-kernel dilations: horizontal,
   vertical, both diagonals), and set those above 127 to 255 — thin ridge lines;
2. Gaussian blur σ=3 of those lines, and every pixel above 4 becomes 255, all else 0 —
   even, hand-drawn-looking strokes about a dozen pixels wide.

Settings that belong to another variant (``pidinetModel`` for ``xdog``/``hed``,
``xdogThreshold`` for the neural ones) are rejected with ``invalidParameter``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from engine.models.store import ModelSpec
from engine.preprocessors import softedge
from engine.preprocessors._classical import scribble_xdog
from engine.preprocessors._common import gray_to_rgb, to_uint8
from engine.registry import BatchedPreprocessor, ProcessContext, Setting, register
from guideflow.errors import InvalidParameter

#: ControlNet's scribble constants: nms threshold and sigma, stroke blur sigma and cut.
NMS_THRESHOLD = 127
NMS_SIGMA = 3.0
STROKE_SIGMA = 3.0
STROKE_CUT = 4
DEFAULT_XDOG_THRESHOLD = 32

# The four 3×3 line kernels of ControlNet's nms: a pixel survives if no neighbour along
# one of these directions is brighter.
_LINE_KERNELS: tuple[np.ndarray, ...] = (
    np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),  # horizontal
    np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),  # vertical
    np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),  # diagonal ↘
    np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),  # diagonal ↙
)


def nms(edge: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """ControlNet's ``annotator.util.nms``: thin ridge lines of a soft map, 0/255 uint8.

    The map is blurred (σ = ``sigma``); a pixel is a ridge if it equals the maximum of its
    3-pixel neighbourhood along any of the 4 directions; ridges above ``threshold`` → 255.
    """
    blurred = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), sigma)
    ridge = np.zeros(blurred.shape, dtype=bool)
    for kernel in _LINE_KERNELS:
        ridge |= cv2.dilate(blurred, kernel) == blurred
    return np.where(ridge & (blurred > threshold), np.uint8(255), np.uint8(0))


def strokes_from_soft_edges(edge_u8: np.ndarray) -> np.ndarray:
    """ControlNet's scribble step: ``nms(127, 3.0)``, blur σ=3, ``> 4`` → 255 (H×W uint8)."""
    lines = nms(edge_u8, NMS_THRESHOLD, NMS_SIGMA)
    spread = cv2.GaussianBlur(lines, (0, 0), STROKE_SIGMA)
    return np.where(spread > STROKE_CUT, np.uint8(255), np.uint8(0))


@register
class Scribble(BatchedPreprocessor):
    """Binary scribble strokes from PiDiNet/HED soft edges, or from XDoG."""

    name = "scribble"
    summary = "Binary scribble strokes (PiDiNet, HED or XDoG), white on black."
    variants = ("pidinet", "hed", "xdog")
    settings = (
        softedge.PIDINET_MODEL_SETTING,
        Setting(
            "xdogThreshold",
            int,
            None,
            f"Stroke threshold of the xdog variant (default {DEFAULT_XDOG_THRESHOLD}; lower "
            "keeps fainter strokes). Not accepted with the other variants.",
            minimum=1,
            maximum=64,
        ),
    )
    price_class = "depth"

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        if variant == "xdog":
            return ()
        if variant == "hed":
            return (softedge.CONTROLNET_HED,)
        return (softedge.PIDINET_SMALL, softedge.PIDINET_TINY)

    def check(self, values: dict[str, Any]) -> None:
        softedge.reject_pidinet_model_for_hed(values, self.name)
        if values.get("xdogThreshold") is not None and values["variant"] != "xdog":
            raise InvalidParameter(
                f"scribble: 'xdogThreshold' applies only to the xdog variant, "
                f"not to variant '{values['variant']}'",
                parameter="xdogThreshold",
            )

    def batches(self, params: Mapping[str, Any]) -> bool:
        return params.get("variant", self.default_variant) != "xdog"

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        variant = params.get("variant", self.default_variant)
        if variant == "xdog":
            threshold = int(params.get("xdogThreshold") or DEFAULT_XDOG_THRESHOLD)
            for ctx in ctxs:
                ctx.meta["method"] = "xdog"
            return [gray_to_rgb(scribble_xdog(image, threshold=threshold)) for image in images]
        edges = softedge.soft_edges_batch(images, variant, params.get("pidinetModel"), ctxs)
        return [gray_to_rgb(strokes_from_soft_edges(to_uint8(edge))) for edge in edges]
