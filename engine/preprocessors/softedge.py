"""softedge: ControlNet 1.1's soft edge maps (PiDiNet or HED), white edges on black.

Variants, as ControlNet 1.1 names them (``gradio_softedge.py``; the first is its default):

* ``pidinet`` — PiDiNet's fused edge probability, kept soft (many grey levels).
* ``pidinet_safe`` — the same map through ControlNet's ``safe_step`` (3 levels: 0, ½, 1),
  which hides the fine texture a generator would otherwise copy.
* ``hed`` / ``hed_safe`` — ControlNet's own HED network (``ControlNetHED_Apache2``), plain
  or ``safe_step``-quantised.

**PiDiNet weights.** Two BSDS-trained PiDiNet sizes can run: ``small`` (default, the
closer of the two to ControlNet's full ``table5_pidinet``) and ``tiny`` (half the size,
a bit noisier). The setting ``pidinetModel`` picks one; it applies to the PiDiNet
variants only, and naming it with an HED variant is an ``invalidParameter`` error (a
setting that silently does nothing would hide a mistake). These exports expect
ImageNet-normalised RGB: ``RGB/255``, minus mean (0.485, 0.456, 0.406), divided by std
(0.229, 0.224, 0.225), NCHW with any height and width; their last output (``956``) is the
fused map, already sigmoided. (ControlNet feeds its own checkpoint BGR/255 without
normalisation; these weights run that way too but give sparser edges.)

**HED weights.** No published ONNX copy of ``ControlNetHED.pth`` can be pinned, so the
spec :data:`CONTROLNET_HED` is unpinned (empty sha256): export the checkpoint from
``lllyasviel/Annotators`` yourself and place it where the store looks. The I/O this
module expects is exactly what ``torch.onnx.export`` gives for ControlNet's
``ControlNetHED_Apache2``:

* input (the graph's first, e.g. ``"input"``): float32 ``[1, 3, H, W]``, **RGB in 0..255**,
  not normalised (the network subtracts its own learned ``norm`` inside);
* outputs: one or more float32 ``[1, 1, h_i, w_i]`` **logit** maps (the real network has
  five side outputs at 1, ½, ¼, ⅛ and 1/16 scale).

Post-processing is HED's: every side output is resized to ``H×W`` (bilinear), the maps are
averaged, and the mean goes through a sigmoid. A single full-size logit map is the
one-output case of the same rule.

**Resolution.** Like ControlNet, the network runs at a *detect resolution*: the image
scaled so its shorter side is 512 and both sides rounded to a multiple of 64
(:func:`detect_size`); the probability map is then resized back to the output size, and
only then quantised (``safe``) and converted to 8 bits, so a ``*_safe`` map keeps exactly
three grey levels at any output size.
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
    gray_to_rgb,
    resize,
    to_nchw,
    to_uint8,
)
from engine.registry import BatchedPreprocessor, ProcessContext, Setting, register
from guideflow.errors import GuideflowError, InvalidParameter, ModelCorrupt

#: Shorter side of the image the edge networks see (ControlNet's default detect resolution).
DETECT_RESOLUTION = 512
#: Longest side the network may see, so that extreme aspect ratios stay affordable.
MAX_DETECT_SIDE = 2048

_PIDINET_SOURCE = (
    "hellozhuo/pidinet BSDS-trained weights; ONNX export from "
    "github.com/SwitzerChees/nuxt-document-scanner @942c1d6"
)
_PIDINET_LICENSE = (
    "MIT text (hellozhuo/pidinet) with the authors' note: research purpose only; "
    "commercial use: contact the authors"
)
_PIDINET_URL = (
    "https://raw.githubusercontent.com/SwitzerChees/nuxt-document-scanner/"
    "942c1d6d9f1e25c4f87935c606690b7307dc92c5/src/runtime/public/models/"
)

PIDINET_SMALL = ModelSpec(
    name="pidinet_small",
    directory="softedge_pidinet",
    filename="pidinet_small.onnx",
    sha256="69e9eb412bb372d96de1211bb09148675d2a7cadf19f9602b73c72cceec28f52",
    size=877_295,
    license=_PIDINET_LICENSE,
    description=(
        "PiDiNet-small edge detector (BSDS). Input 'input' float32 [1,3,H,W] ImageNet-"
        "normalised RGB; last output '956' is the fused edge probability."
    ),
    url=_PIDINET_URL + "pidinet_small.onnx",
    source=_PIDINET_SOURCE,
)

PIDINET_TINY = ModelSpec(
    name="pidinet_tiny",
    directory="softedge_pidinet",
    filename="pidinet_tiny.onnx",
    sha256="d25920f3ae92e70b58832458e2a58f6d9b64046338fff8c1a6c9a5813610afae",
    size=463_427,
    license=_PIDINET_LICENSE,
    description=(
        "PiDiNet-tiny edge detector (BSDS), same I/O as pidinet_small; smaller and a "
        "little noisier."
    ),
    url=_PIDINET_URL + "pidinet_tiny.onnx",
    source=_PIDINET_SOURCE,
)

CONTROLNET_HED = ModelSpec(
    name="controlnet_hed",
    directory="softedge_hed",
    filename="ControlNetHED.onnx",
    sha256="",  # unpinned: a user export, there is no published ONNX copy to pin
    size=0,
    license="Apache-2.0 (ControlNetHED_Apache2, lllyasviel/Annotators ControlNetHED.pth)",
    description=(
        "ControlNet 1.1's HED (ControlNetHED_Apache2) exported to ONNX by the user: input "
        "float32 [1,3,H,W] RGB 0..255; outputs: the side-output logit maps [1,1,h,w]."
    ),
    source=(
        "export https://huggingface.co/lllyasviel/Annotators/blob/main/ControlNetHED.pth "
        "(ControlNetHED_Apache2 from controlnet_aux) with torch.onnx.export"
    ),
)

#: ``pidinetModel`` choice → the module-level spec constant it selects (looked up at call time).
_PIDINET_SPECS: dict[str, str] = {"small": "PIDINET_SMALL", "tiny": "PIDINET_TINY"}
DEFAULT_PIDINET_MODEL = "small"

PIDINET_MODEL_SETTING = Setting(
    "pidinetModel",
    str,
    None,
    "PiDiNet weights for the pidinet variants: 'small' (default) or 'tiny'. "
    "Not accepted with the hed variants.",
    choices=tuple(_PIDINET_SPECS),
)


def detect_size(width: int, height: int, resolution: int = DETECT_RESOLUTION) -> tuple[int, int]:
    """Size the network runs at: shorter side → ``resolution``, sides rounded to 64.

    This is ControlNet's ``resize_image`` rule, plus a floor of 64 px per side and a cap
    of :data:`MAX_DETECT_SIDE` on the longer side for extreme aspect ratios.
    """
    k = resolution / min(width, height)
    longest = max(width, height) * k
    if longest > MAX_DETECT_SIDE:
        k *= MAX_DETECT_SIDE / longest
    w = max(64, round(width * k / 64.0) * 64)
    h = max(64, round(height * k / 64.0) * 64)
    return w, h


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """ControlNet's ``safe_step``: quantise a [0, 1] map to ``step + 1`` levels.

    ``floor(x * (step + 1)) / step``, so with ``step=2``: [0, ⅓) → 0, [⅓, ⅔) → ½,
    [⅔, 1] → 1 (an exact 1.0 gives 1.5, clipped later).
    """
    y = (x.astype(np.float32) * np.float32(step + 1)).astype(np.int32)
    return y.astype(np.float32) / np.float32(step)


def pidinet_spec(choice: str | None) -> ModelSpec:
    """The spec for a ``pidinetModel`` value (``None`` → the default, small)."""
    return globals()[_PIDINET_SPECS[choice or DEFAULT_PIDINET_MODEL]]


def pidinet_edges(outs: list[Any], expect: tuple[int, int], spec: ModelSpec) -> np.ndarray:
    """PiDiNet's fused edge probability (its last output) as an ``h×w`` map in [0, 1]."""
    return _single_map(outs[-1], expect, spec).clip(0.0, 1.0)


def hed_edges(sides: list[Any], size: tuple[int, int], spec: ModelSpec) -> np.ndarray:
    """HED's edge probability at ``size`` (h, w): mean of the side logits resized, sigmoid."""
    h, w = size
    logits = np.zeros((h, w), dtype=np.float64)
    for side in sides:
        plane = _single_map(side, None, spec)
        logits += cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR)
    logits /= len(sides)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def soft_edges_batch(
    rgbs: Sequence[np.ndarray],
    method: str,
    pidinet_model: str | None,
    ctxs: Sequence[ProcessContext],
) -> list[np.ndarray]:
    """Soft edge probability of each image at its own size (``H×W`` float32 in [0, 1]).

    ``method`` is ``"pidinet"`` or ``"hed"``. The network runs at :func:`detect_size`
    (images with the same detect size share forward passes); each map is resized back
    bilinearly. Records the model and detect size in each context's meta.
    """
    hed = method == "hed"
    spec = CONTROLNET_HED if hed else pidinet_spec(pidinet_model)
    session = session_for(spec, ctxs[0].models)
    # PiDiNet: only the fused map ('956' in the shipped exports); HED: every side output
    wanted = None if hed else [session.get_outputs()[-1].name]

    def prepare(item: tuple[np.ndarray, ProcessContext]) -> np.ndarray:
        h, w = item[0].shape[:2]
        small = resize(item[0], *detect_size(w, h))
        if hed:
            return to_nchw(small, scale=1.0)  # RGB 0..255; the network normalises inside
        return to_nchw(small, scale=1.0 / 255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def finish(item: tuple[np.ndarray, ProcessContext], x: np.ndarray, outs: list[Any]) -> Any:
        rgb, ctx = item
        dh, dw = int(x.shape[2]), int(x.shape[3])
        edge = hed_edges(outs, (dh, dw), spec) if hed else pidinet_edges(outs, (dh, dw), spec)
        ctx.meta["model"] = spec.name
        ctx.meta["detectSize"] = [dw, dh]
        h, w = rgb.shape[:2]
        if (dw, dh) != (w, h):
            edge = cv2.resize(edge, (w, h), interpolation=cv2.INTER_LINEAR)
        return edge.clip(0.0, 1.0)

    items = list(zip(rgbs, ctxs, strict=True))
    try:
        return map_batched(session, items, prepare, finish, output_names=wanted)
    except GuideflowError:
        raise
    except Exception as exc:  # a user export with other I/O: onnxruntime's own error types
        if not hed:
            raise
        raise ModelCorrupt(
            f"'{spec.name}' did not run on a [1,3,H,W] float32 input: {exc}", parameter="model"
        ) from exc


def soft_edges(
    rgb: np.ndarray,
    method: str,
    pidinet_model: str | None,
    ctx: ProcessContext,
) -> np.ndarray:
    """:func:`soft_edges_batch` of one image."""
    return soft_edges_batch([rgb], method, pidinet_model, [ctx])[0]


def reject_pidinet_model_for_hed(values: Mapping[str, Any], owner: str) -> None:
    """``pidinetModel`` only means something to the PiDiNet variants; refuse it elsewhere."""
    if values.get("pidinetModel") is not None and not values["variant"].startswith("pidinet"):
        raise InvalidParameter(
            f"{owner}: 'pidinetModel' applies only to the pidinet variants, "
            f"not to variant '{values['variant']}'",
            parameter="pidinetModel",
        )


def _single_map(out: np.ndarray, expect: tuple[int, ...] | None, spec: ModelSpec) -> np.ndarray:
    """``[1, 1, h, w]`` (or ``[1, h, w]``) network output → ``h×w`` float32.

    Any other shape means the file is not the model this module documents: ``modelCorrupt``.
    """
    arr = np.asarray(out, dtype=np.float32)
    plane_shape = arr.shape[-2:]
    if arr.ndim < 2 or int(np.prod(arr.shape[:-2])) != 1 or 0 in plane_shape:
        raise ModelCorrupt(
            f"'{spec.name}' returned an output of shape {arr.shape}; expected [1,1,h,w] maps",
            parameter="model",
        )
    plane = arr.reshape(plane_shape)
    if expect is not None and plane.shape != tuple(expect):
        raise ModelCorrupt(
            f"'{spec.name}' returned a {plane.shape} map for a {tuple(expect)} input",
            parameter="model",
        )
    return plane


@register
class SoftEdge(BatchedPreprocessor):
    """Soft edges (PiDiNet by default, or HED), optionally ``safe``-quantised."""

    name = "softedge"
    summary = "Soft edge map (PiDiNet or HED), white on black; *_safe variants use 3 levels."
    variants = ("pidinet", "pidinet_safe", "hed", "hed_safe")
    settings = (PIDINET_MODEL_SETTING,)
    price_class = "depth"

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        if variant.startswith("hed"):
            return (CONTROLNET_HED,)
        return (PIDINET_SMALL, PIDINET_TINY)

    def check(self, values: dict[str, Any]) -> None:
        reject_pidinet_model_for_hed(values, self.name)

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        variant = params.get("variant", self.default_variant)
        method = "hed" if variant.startswith("hed") else "pidinet"
        edges = soft_edges_batch(images, method, params.get("pidinetModel"), ctxs)
        if variant.endswith("_safe"):
            edges = [safe_step(edge) for edge in edges]
        return [gray_to_rgb(to_uint8(edge)) for edge in edges]
