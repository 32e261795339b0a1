"""mlsd: straight line segments (M-LSD), drawn as 1-px white lines on black.

ControlNet 1.1 runs M-LSD *large* through ``annotator/mlsd/utils.py::pred_lines``; the
weights shipped here are M-LSD *tiny* (512×512, Apache-2.0), decoded with the same rule:

1. the image is resized to 512×512 (area interpolation when shrinking) and a fourth channel
   of ones is appended: float32 NHWC ``[1, 512, 512, 4]`` with RGB in 0..255 (this export
   rescales inside the graph);
2. the graph already returns the top-200 line centres (``Identity``, int32 ``(y, x)`` on the
   256×256 output grid), their scores (``Identity_1``) and the displacement map
   (``Identity_2``, ``[1, 256, 256, 4]``: start dx, dy, end dx, dy);
3. a centre is kept when ``score > scoreThreshold`` and its segment length
   ``|start − end|`` (in 256-grid units, as ControlNet measures it) ``> distanceThreshold``;
4. the segment is ``start = centre + disp[0:2]``, ``end = centre + disp[2:4]``, ×2 to 512
   space, then scaled by ``W/512`` and ``H/512`` to the output size;
5. each segment is drawn with ``cv2.line`` (thickness 1, end points truncated to int as
   ControlNet does) on a black canvas of the output size.

Drawing at the output size (ControlNet draws at its detect size and resizes bilinearly)
keeps every line exactly 1 px wide and pure white at any output size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from engine.models.onnx import map_batched, session_for
from engine.models.store import ModelSpec, ModelStore
from engine.preprocessors._common import gray_to_rgb, resize
from engine.registry import BatchedPreprocessor, ProcessContext, Setting, register
from guideflow.errors import ModelCorrupt

MLSD_TINY = ModelSpec(
    name="mlsd_tiny",
    directory="mlsd_tiny",
    filename="mlsd_tiny_512.onnx",
    sha256="d6b4aadb8ff3d7561ccf8e93044e16ff1237f94435fa4e9806486c337abe6366",
    size=2_515_406,
    license="Apache-2.0",
    description=(
        "M-LSD tiny line segment detector, 512×512. Input 'input_image_with_alpha:0' float32 "
        "[1,512,512,4] (RGB 0..255 + ones); outputs top-200 centres, scores, displacements."
    ),
    url=(
        "https://raw.githubusercontent.com/hpc203/M-LSD-onnxrun-cpp-py/"
        "cbe65521b99c32ce9458d2bdbc0a19f63bb4d85a/weights/model_512x512_tiny.onnx"
    ),
    source="navervision/mlsd tiny weights; ONNX export from github.com/hpc203/M-LSD-onnxrun-cpp-py",
)

#: Side of the square the network sees; its outputs live on a grid of half this size.
INPUT_SIZE = 512
GRID_SIZE = INPUT_SIZE // 2


def mlsd_input(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 RGB → float32 ``[1, 512, 512, 4]``: RGB 0..255 resized, plus ones."""
    small = resize(rgb, INPUT_SIZE, INPUT_SIZE).astype(np.float32)
    ones = np.ones((INPUT_SIZE, INPUT_SIZE, 1), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate([small, ones], axis=2)[None])


def decode_lines(
    centres: np.ndarray,
    scores: np.ndarray,
    displacement: np.ndarray,
    score_threshold: float,
    distance_threshold: float,
) -> np.ndarray:
    """ControlNet's ``pred_lines`` decoding → ``N×4`` float ``(x0, y0, x1, y1)`` in 512 space.

    ``centres`` is ``K×2`` ``(y, x)`` on the 256 grid, ``scores`` ``K``, ``displacement``
    ``256×256×4``. Kept: ``score > score_threshold`` and ``|start − end| > distance_threshold``
    (256-grid units).
    """
    grid_h, grid_w = displacement.shape[:2]
    ys = np.clip(centres[:, 0].astype(np.int64), 0, grid_h - 1)
    xs = np.clip(centres[:, 1].astype(np.int64), 0, grid_w - 1)
    disp = displacement[ys, xs].astype(np.float64)  # K×4: start dx, dy, end dx, dy
    length = np.hypot(disp[:, 0] - disp[:, 2], disp[:, 1] - disp[:, 3])
    keep = (
        (scores.astype(np.float64) > score_threshold)
        & (length > distance_threshold)
        & np.isfinite(disp).all(axis=1)
    )
    x, y, d = xs[keep].astype(np.float64), ys[keep].astype(np.float64), disp[keep]
    segments = np.stack([x + d[:, 0], y + d[:, 1], x + d[:, 2], y + d[:, 3]], axis=1)
    return segments * (INPUT_SIZE / GRID_SIZE)


def draw_lines(lines: np.ndarray, width: int, height: int) -> np.ndarray:
    """Draw 512-space segments as 1-px white lines on a black ``height×width`` canvas."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    if len(lines) == 0:
        return canvas
    scaled = lines * np.array([width, height, width, height], dtype=np.float64) / INPUT_SIZE
    # Far-off end points are clipped by cv2.line; bound them so int() stays in int32.
    scaled = scaled.clip(-8 * max(width, height), 8 * max(width, height))
    for x0, y0, x1, y1 in scaled:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return canvas


def detect_lines_batch(
    rgbs: Sequence[np.ndarray],
    score_threshold: float,
    distance_threshold: float,
    store: ModelStore | None,
) -> list[np.ndarray]:
    """Run M-LSD tiny on each image; its kept segments in 512 space (``N×4``) per image.

    Every image is resized to 512×512, so all of them can share forward passes.
    """
    spec = MLSD_TINY
    session = session_for(spec, store)

    def finish(rgb: np.ndarray, x: np.ndarray, outs: list[Any]) -> np.ndarray:
        centres, scores, displacement = outs
        try:
            return decode_lines(
                np.asarray(centres).reshape(-1, 2),
                np.asarray(scores).reshape(-1),
                np.asarray(displacement).reshape(GRID_SIZE, GRID_SIZE, 4),
                score_threshold,
                distance_threshold,
            )
        except ValueError as exc:  # wrong output shapes: not the documented model
            raise ModelCorrupt(
                f"'{spec.name}' returned outputs of unexpected shape: {exc}", parameter="model"
            ) from exc

    return map_batched(session, list(rgbs), mlsd_input, finish)


def detect_lines(
    rgb: np.ndarray,
    score_threshold: float,
    distance_threshold: float,
    store: ModelStore | None,
) -> np.ndarray:
    """:func:`detect_lines_batch` of one image."""
    return detect_lines_batch([rgb], score_threshold, distance_threshold, store)[0]


@register
class MLSD(BatchedPreprocessor):
    """M-LSD straight lines, white 1-px segments on black."""

    name = "mlsd"
    summary = "Straight line segments (M-LSD), 1-px white lines on black."
    settings = (
        Setting(
            "scoreThreshold",
            float,
            0.1,
            "Keep a line whose centre score is above this (ControlNet's value threshold).",
            minimum=0.0,
            maximum=1.0,
            aliases=("valueThreshold",),
        ),
        Setting(
            "distanceThreshold",
            float,
            0.1,
            "Keep a line longer than this, in units of the model's 256×256 grid "
            "(ControlNet's distance threshold).",
            minimum=0.0,
            maximum=20.0,
            aliases=("distThreshold",),
        ),
    )
    price_class = "depth"

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        return (MLSD_TINY,)

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        found = detect_lines_batch(
            images,
            float(params.get("scoreThreshold", 0.1)),
            float(params.get("distanceThreshold", 0.1)),
            ctxs[0].models,
        )
        out = []
        for image, lines, ctx in zip(images, found, ctxs, strict=True):
            ctx.meta["model"] = MLSD_TINY.name
            ctx.meta["lines"] = len(lines)
            h, w = image.shape[:2]
            out.append(gray_to_rgb(draw_lines(lines, w, h)))
        return out
