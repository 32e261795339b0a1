"""normalbae: a surface-normal map (ControlNet 1.1's Normal guide).

Variants (the first is the default):

* ``normalbae`` — Bae et al.'s normal estimator (``scannet.pt``, the network behind
  ControlNet 1.1's ``Normal BAE``) when its ONNX export is configured. If those weights are
  not available, normals are **derived from the depth model** instead (next variant), and
  ``ctx.meta["normal_method"]`` says which method ran: ``"normalbae"`` or
  ``"depth_sobel"`` (the engine copies it into the response and the ledger).
* ``depth`` — always derive normals from the depth model (Depth Anything V2 Small).

**NormalBAE I/O.** No published ONNX copy of ``scannet.pt`` could be pinned, so
:data:`NORMALBAE` is unpinned (empty sha256): export ``NNET`` from
``lllyasviel/Annotators/scannet.pt`` yourself and place it where the store looks. Expected:
input float32 ``[1,3,H,W]`` RGB/255 with ImageNet mean/std (H, W multiples of 64 here:
ControlNet's detect-resolution rule, shorter side 512); output ``[1,3,H,W]`` normals
(x, y, z) in [-1, 1], or ``[1,4,H,W]`` with the concentration κ last (ignored). The map is
converted exactly as ControlNet's annotator does: ``((n + 1) / 2).clip(0, 1) * 255``, no
renormalisation, x → R, y → G, z → B.

**Normals from depth** follow ControlNet 1.0's ``normal_midas`` rule on the depth model's
relative inverse depth ``d`` (larger = nearer): ``x = Sobel_x(d)``, ``y = Sobel_y(d)``
(3×3), ``z = 2π``; where the normalised depth is below :data:`BG_THRESHOLD` (the far
background) ``x = y = 0``; the vector is normalised and mapped with ``n * 127.5 + 127.5``.
So a surface facing the camera is (128, 128, 255); R > 128 where the surface turns to the
left (it comes nearer towards the right of the image), G > 128 where it turns upward (it
comes nearer towards the bottom, like a floor). ControlNet applied the Sobel to the raw
network output, whose scale depends on the model; here ``d`` is first min-max normalised
and scaled so its full range spans the image's longer side in pixels, which makes the
tilt independent of the depth model and of the image size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from engine.models.onnx import map_batched, session_for
from engine.models.store import ModelSpec
from engine.preprocessors import depth as depth_module
from engine.preprocessors._common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    fit_size,
    resize,
    static_input_hw,
    to_nchw,
)
from engine.registry import BatchedPreprocessor, ProcessContext, register
from guideflow.errors import ModelCorrupt, ModelUnavailable

NORMALBAE = ModelSpec(
    name="normalbae_scannet",
    directory="normalbae",
    filename="normalbae_scannet.onnx",
    sha256="",  # unpinned: a user export, there is no published ONNX copy to pin
    size=0,
    license="MIT (baegwangbin/surface_normal_uncertainty; lllyasviel/Annotators scannet.pt)",
    description=(
        "NormalBAE (ScanNet-trained NNET) exported to ONNX by the user; checksum not yet "
        "pinned. Input float32 [1,3,H,W] ImageNet-normalised RGB (H, W multiples of 64); "
        "output [1,3|4,H,W] normals in [-1,1] (4th channel kappa, ignored)."
    ),
    source=(
        "export https://huggingface.co/lllyasviel/Annotators/blob/main/scannet.pt "
        "(NNET from ControlNet 1.1's annotator/normalbae) with torch.onnx.export"
    ),
)

#: Shorter side NormalBAE sees (ControlNet's default detect resolution), rounded to 64.
DETECT_RESOLUTION = 512
DETECT_MULTIPLE = 64
MAX_DETECT_SIDE = 2048
#: The depth variant used to derive normals when NormalBAE is not available.
DEPTH_VARIANT = "depth_anything_v2"
#: ControlNet 1.0 ``normal_midas``: z component before normalisation.
NORMAL_Z = 2.0 * math.pi
#: ControlNet 1.0 ``gradio_normal2image`` default: normalised depth below this is background.
BG_THRESHOLD = 0.4

METHOD_NORMALBAE = "normalbae"
METHOD_DEPTH = "depth_sobel"


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """``H×W×3`` normals in [-1, 1] → uint8 RGB: ``((n + 1) / 2).clip(0, 1) * 255``, rounded."""
    rgb = ((normals.astype(np.float32) + 1.0) * 0.5).clip(0.0, 1.0) * 255.0
    return rgb.round().astype(np.uint8)


def normals_from_depth(depth: np.ndarray, bg_threshold: float = BG_THRESHOLD) -> np.ndarray:
    """Unit normals (``H×W×3`` float32) from relative inverse depth (larger = nearer).

    See the module docstring for the rule and its sign convention.
    """
    d = depth_module.normalize_depth(depth)
    scaled = d * np.float32(max(d.shape))
    x = cv2.Sobel(scaled, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(scaled, cv2.CV_32F, 0, 1, ksize=3)
    background = d < bg_threshold
    x[background] = 0.0
    y[background] = 0.0
    z = np.full_like(x, NORMAL_Z)
    n = np.stack([x, y, z], axis=2)
    n /= np.sqrt(np.sum(n * n, axis=2, keepdims=True))
    return n


def normalbae_input(rgb: np.ndarray, session: Any) -> np.ndarray:
    """NCHW ImageNet-normalised float32 at the detect size (or the graph's fixed size)."""
    h, w = rgb.shape[:2]
    fixed = static_input_hw(session)
    if fixed is not None:
        dh, dw = fixed
    else:
        dw, dh = fit_size(w, h, DETECT_RESOLUTION, DETECT_MULTIPLE, MAX_DETECT_SIDE)
    small = resize(rgb, dw, dh)
    return to_nchw(small, scale=1.0 / 255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def normalbae_normals(
    rgbs: Sequence[np.ndarray], ctxs: Sequence[ProcessContext]
) -> list[np.ndarray]:
    """NormalBAE's normals per image, ``H×W×3`` float32 at its size (raises if unavailable).

    Same-size network inputs share forward passes.
    """
    spec = NORMALBAE
    session = session_for(spec, ctxs[0].models)

    def finish(item: tuple[np.ndarray, ProcessContext], x: np.ndarray, outs: list[Any]) -> Any:
        rgb, ctx = item
        out = np.asarray(outs[0], dtype=np.float32)
        if out.ndim != 4 or out.shape[0] != 1 or out.shape[1] < 3:
            raise ModelCorrupt(
                f"'{spec.name}' returned an output of shape {out.shape}; expected [1,3|4,H,W]",
                parameter="model",
            )
        normals = np.ascontiguousarray(out[0, :3].transpose(1, 2, 0))
        ctx.meta["normalModel"] = spec.name
        ctx.meta["normalDetectSize"] = [int(x.shape[3]), int(x.shape[2])]
        h, w = rgb.shape[:2]
        if normals.shape[:2] != (h, w):
            normals = cv2.resize(normals, (w, h), interpolation=cv2.INTER_LINEAR)
        return normals

    return map_batched(
        session,
        list(zip(rgbs, ctxs, strict=True)),
        lambda item: normalbae_input(item[0], session),
        finish,
        output_names=[session.get_outputs()[0].name],
    )


def depth_normals(rgbs: Sequence[np.ndarray], ctxs: Sequence[ProcessContext]) -> list[np.ndarray]:
    """Normals derived from the depth model's output for each image (``H×W×3`` float32)."""
    depths = depth_module.estimate_depths(rgbs, DEPTH_VARIANT, ctxs)
    return [normals_from_depth(depth) for depth in depths]


@register
class NormalBae(BatchedPreprocessor):
    """Surface normals: NormalBAE where configured, else derived from the depth model."""

    name = "normalbae"
    summary = (
        "Surface-normal map (NormalBAE where its weights are configured, else derived "
        "from Depth Anything V2); meta 'normal_method' says which ran."
    )
    variants = ("normalbae", "depth")
    price_class = "depth"

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        depth_spec = depth_module.depth_spec(DEPTH_VARIANT)
        if variant == "depth":
            return (depth_spec,)
        return (NORMALBAE, depth_spec)

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        variant = params.get("variant", self.default_variant)
        method = METHOD_DEPTH
        if variant == "depth":
            normals = depth_normals(images, ctxs)
        else:
            try:
                normals = normalbae_normals(images, ctxs)
                method = METHOD_NORMALBAE
            except ModelUnavailable as missing:
                normals = self._fallback(images, ctxs, missing)
        for ctx in ctxs:
            ctx.meta["normal_method"] = method
        return [normals_to_rgb(n) for n in normals]

    @staticmethod
    def _fallback(
        images: Sequence[np.ndarray], ctxs: Sequence[ProcessContext], missing: ModelUnavailable
    ) -> list[np.ndarray]:
        """Depth-derived normals; if the depth model is missing too, say how to fix either."""
        try:
            return depth_normals(images, ctxs)
        except ModelUnavailable as no_depth:
            raise ModelUnavailable(
                f"{no_depth.message} (NormalBAE is not configured either: {missing.message})",
                parameter=no_depth.parameter,
            ) from no_depth
