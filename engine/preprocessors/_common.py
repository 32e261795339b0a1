"""Small helpers shared by the model-based preprocessors (no registration here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from guideflow.errors import ModelCorrupt

if TYPE_CHECKING:
    from engine.models.store import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize with INTER_AREA when shrinking and INTER_CUBIC when growing (ControlNet's choice)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    interp = cv2.INTER_AREA if width * height < w * h else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interp)


def to_nchw(
    rgb: np.ndarray,
    *,
    scale: float = 1.0 / 255.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """``H×W×3`` uint8 → ``1×3×H×W`` float32, scaled then optionally normalised per channel."""
    x = rgb.astype(np.float32) * np.float32(scale)
    if mean is not None:
        x -= np.asarray(mean, dtype=np.float32)
    if std is not None:
        x /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """``H×W`` uint8 → ``H×W×3`` uint8 (the guide-image convention)."""
    if gray.dtype == np.uint8 and gray.ndim == 2:
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)  # same pixels, ~15× faster than np.repeat
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float map in [0, 1] → uint8 in [0, 255], rounded and clipped like ControlNet."""
    return (x * 255.0).clip(0, 255).round().astype(np.uint8)


def fit_size(
    width: int, height: int, short_side: int, multiple: int, max_side: int
) -> tuple[int, int]:
    """``(w, h)`` a network runs at: shorter side → ``short_side``, sides rounded to ``multiple``.

    ControlNet's ``resize_image`` rule (it uses ``multiple=64``), generalised for networks
    with other strides (Depth Anything's 14-pixel patches). The longer side is capped at
    ``max_side`` so extreme aspect ratios stay affordable, and no side drops below one
    ``multiple``.
    """
    k = short_side / min(width, height)
    longest = max(width, height) * k
    if longest > max_side:
        k *= max_side / longest
    w = max(multiple, round(width * k / multiple) * multiple)
    h = max(multiple, round(height * k / multiple) * multiple)
    return w, h


def static_input_hw(session: Any) -> tuple[int, int] | None:
    """``(h, w)`` when the graph's first input has fixed spatial dims, else ``None``."""
    shape = session.get_inputs()[0].shape
    if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
        return shape[2], shape[3]
    return None


def single_plane(out: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """``[1,H,W]`` or ``[1,1,H,W]`` output → ``H×W`` float32; other shapes: ``modelCorrupt``."""
    if out.ndim < 2 or int(np.prod(out.shape[:-2])) != 1 or 0 in out.shape[-2:]:
        raise ModelCorrupt(
            f"'{spec.name}' returned an output of shape {out.shape}; expected [1,H,W]",
            parameter="model",
        )
    return out.reshape(out.shape[-2:])
