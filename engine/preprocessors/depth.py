"""depth: a relative depth map, near = white, far = black (ControlNet's Depth guide).

Variants (the first is the default):

* ``depth_anything_v2`` — Depth Anything V2 Small (Apache-2.0), the ONNX export in
  ``onnx-community/depth-anything-v2-small``. Input ``pixel_values`` float32
  ``[1,3,H,W]``: RGB/255, ImageNet mean/std, the image resized (bicubic, aspect kept) so
  its shorter side is 518 and both sides are multiples of 14 (the ViT patch size).
  Output ``predicted_depth`` ``[1,H,W]``: relative *inverse* depth (larger = nearer).
* ``midas`` — MiDaS v3 DPT-Hybrid, the network behind ControlNet 1.1's ``Depth_Midas``
  (the same ``dpt_hybrid-midas-501f0c75`` weights, as ported to ``Intel/dpt-hybrid-midas``
  and exported to ONNX in ``Xenova/dpt-hybrid-midas``). Input ``pixel_values``
  ``[1,3,384,384]``: RGB/255 normalised with mean = std = 0.5 (that is ``x/127.5 - 1``,
  exactly ControlNet's MiDaS input), resized without keeping the aspect ratio, as the
  export's own preprocessor config does. Output ``predicted_depth`` ``[1,384,384]``,
  relative inverse depth. A graph with fixed input dims is fed at those dims.

Post-processing (both): the map is resized back to the output size (bilinear), then
min-max normalised to 0..255 — since the networks predict inverse depth, the nearest
surface is white and the farthest black, as in ControlNet — and repeated on 3 channels.
A constant map (a blank wall, a flat colour) has no depth range and becomes all black
instead of dividing by zero.

:func:`estimate_depths` is shared with ``normalbae``, which derives surface normals from
this depth when no normal model is configured. Several images run as one batch where
their network inputs have the same size (always for MiDaS's fixed 384×384; for Depth
Anything, images of the same aspect ratio), as long as the graph's batch dim is dynamic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from engine.models.onnx import map_batched, session_for
from engine.models.store import ModelSpec
from engine.preprocessors._common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    fit_size,
    gray_to_rgb,
    resize,
    single_plane,
    static_input_hw,
    to_nchw,
    to_uint8,
)
from engine.registry import BatchedPreprocessor, ProcessContext, register

DEPTH_ANYTHING_V2 = ModelSpec(
    name="depth_anything_v2_small",
    directory="depth_anything_v2_small",
    filename="depth_anything_v2_small.onnx",
    sha256="afb6a5c28f3b6bf1618c6e43f02073ef9dfdc70e937502d51603e57b0a1df10c",
    size=0,  # the Hub page states "99.1 MB"; the exact byte count is not pinned yet
    license="Apache-2.0",
    description=(
        "Depth Anything V2 Small (24.8M params), fp32 ONNX. Input 'pixel_values' float32 "
        "[1,3,H,W] (H, W multiples of 14) ImageNet-normalised RGB; output 'predicted_depth' "
        "[1,H,W] relative inverse depth. About 99.1 MB (exact size not pinned)."
    ),
    repo_id="onnx-community/depth-anything-v2-small",
    revision="02504fff2a0de682e3162e5e89bdeab034e1b96d",
    repo_filename="onnx/model.onnx",
    source="https://huggingface.co/onnx-community/depth-anything-v2-small (onnx/model.onnx)",
)

MIDAS_DPT_HYBRID = ModelSpec(
    name="midas_dpt_hybrid",
    directory="midas_dpt_hybrid",
    filename="dpt_hybrid_midas.onnx",
    sha256="2eca68239006c64af94bdfa68464f34d7627c3dca7bb02932636e616c55a39ff",
    size=0,  # the Hub page states "533 MB"; the exact byte count is not pinned yet
    license=(
        "Apache-2.0 (Intel/dpt-hybrid-midas, a port of isl-org/MiDaS's MIT-licensed "
        "dpt_hybrid weights; the ONNX repo itself states no licence)"
    ),
    description=(
        "MiDaS v3 DPT-Hybrid (ControlNet's Depth_Midas network), fp32 ONNX. Input "
        "'pixel_values' float32 [1,3,384,384], RGB/255 with mean=std=0.5; output "
        "'predicted_depth' [1,384,384] relative inverse depth. About 533 MB (exact size "
        "not pinned)."
    ),
    repo_id="Xenova/dpt-hybrid-midas",
    revision="c9ab952ed178a2f0c085a4602d0a9da35bc54bca",
    repo_filename="onnx/model.onnx",
    source="https://huggingface.co/Xenova/dpt-hybrid-midas (onnx/model.onnx)",
)

#: Variant → name of the module-level spec it uses (looked up at call time, so tests can swap it).
_VARIANT_SPECS: dict[str, str] = {
    "depth_anything_v2": "DEPTH_ANYTHING_V2",
    "midas": "MIDAS_DPT_HYBRID",
}

#: Depth Anything V2: shorter side seen by the network, and its patch size.
DA2_RESOLUTION = 518
DA2_MULTIPLE = 14
#: Longest side the ViT may see (token count grows with area; keeps extreme aspect ratios sane).
DA2_MAX_SIDE = 4 * DA2_RESOLUTION
#: MiDaS DPT-Hybrid's input size, from the export's preprocessor config.
MIDAS_SIZE = 384
#: ControlNet's MiDaS input normalisation (``x/127.5 - 1``).
MIDAS_MEAN = (0.5, 0.5, 0.5)
MIDAS_STD = (0.5, 0.5, 0.5)


def depth_spec(variant: str) -> ModelSpec:
    """The spec a depth variant runs (read from the module at call time)."""
    return globals()[_VARIANT_SPECS[variant]]


def depth_input(rgb: np.ndarray, variant: str, session: Any) -> np.ndarray:
    """The NCHW float32 tensor ``variant``'s network expects for ``rgb`` (H×W×3 uint8)."""
    h, w = rgb.shape[:2]
    fixed = static_input_hw(session)
    if variant == "midas":
        dh, dw = fixed or (MIDAS_SIZE, MIDAS_SIZE)
        small = resize(rgb, dw, dh)
        return to_nchw(small, scale=1.0 / 255.0, mean=MIDAS_MEAN, std=MIDAS_STD)
    if fixed is not None:
        dh, dw = fixed
    else:
        dw, dh = fit_size(w, h, DA2_RESOLUTION, DA2_MULTIPLE, DA2_MAX_SIDE)
    small = rgb if (dw, dh) == (w, h) else cv2.resize(rgb, (dw, dh), interpolation=cv2.INTER_CUBIC)
    return to_nchw(small, scale=1.0 / 255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def estimate_depths(
    rgbs: Sequence[np.ndarray], variant: str, ctxs: Sequence[ProcessContext]
) -> list[np.ndarray]:
    """Relative inverse depth (larger = nearer) of each image, ``H×W`` float32 at its size.

    Images whose network inputs have the same size share forward passes
    (:func:`~engine.models.onnx.map_batched`). Records the model and the size it ran at in
    each context's meta (``depthModel``, ``depthDetectSize``).
    """
    spec = depth_spec(variant)
    session = session_for(spec, ctxs[0].models)

    def finish(item: tuple[np.ndarray, ProcessContext], x: np.ndarray, outs: list[Any]) -> Any:
        rgb, ctx = item
        depth = single_plane(np.asarray(outs[0], dtype=np.float32), spec)
        depth = np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
        ctx.meta["depthModel"] = spec.name
        ctx.meta["depthDetectSize"] = [int(x.shape[3]), int(x.shape[2])]
        h, w = rgb.shape[:2]
        if depth.shape != (h, w):
            depth = cv2.resize(depth, (w, h), interpolation=cv2.INTER_LINEAR)
        return depth

    return map_batched(
        session,
        list(zip(rgbs, ctxs, strict=True)),
        lambda item: depth_input(item[0], variant, session),
        finish,
        output_names=[session.get_outputs()[0].name],
    )


def estimate_depth(rgb: np.ndarray, variant: str, ctx: ProcessContext) -> np.ndarray:
    """:func:`estimate_depths` of one image."""
    return estimate_depths([rgb], variant, [ctx])[0]


def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (nearest = 1); a map with no range (constant) becomes all zeros."""
    lo = float(depth.min())
    span = float(depth.max()) - lo
    if not np.isfinite(span) or span <= 1e-12 * max(1.0, abs(lo)):
        return np.zeros(depth.shape, dtype=np.float32)
    return ((depth - lo) / span).astype(np.float32)


@register
class Depth(BatchedPreprocessor):
    """Relative depth map: Depth Anything V2 Small by default, or MiDaS DPT-Hybrid."""

    name = "depth"
    summary = "Relative depth map, near = white (Depth Anything V2 Small, or MiDaS DPT-Hybrid)."
    variants = tuple(_VARIANT_SPECS)
    price_class = "depth"

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        return (depth_spec(variant),)

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        variant = params.get("variant", self.default_variant)
        depths = estimate_depths(images, variant, ctxs)
        return [gray_to_rgb(to_uint8(normalize_depth(depth))) for depth in depths]
