"""shuffle: ControlNet 1.1's content shuffle (``annotator/shuffle`` ContentShuffleDetector).

The image is warped through a smooth random flow field: for each output pixel,
the source position is ``(x, y) = (noise_x * (W-1), noise_y * (H-1))`` where each
noise map is a "noise disk": uniform noise on a coarse grid with one cell per
``noiseScale`` pixels (plus a one-cell margin), bicubically upsampled, cropped to
the image and min-max normalised to [0, 1]. ``cv2.remap`` with bilinear
interpolation then samples the image there. The result keeps the image's colours
and textures but scrambles their layout: what the shuffle ControlNet wants.

Randomness: the noise comes from ``numpy.random.default_rng(seed)`` (PCG64), so
the same seed gives bit-identical output on every run (and on every machine
with the same numpy and OpenCV versions). It is not
ControlNet's legacy global ``np.random`` stream, so a given seed does not
reproduce a ControlNet picture; the distribution of pictures is the same. The
default seed is the engine's per-task seed (from the task UUID, else the input
bytes), so retrying a task reproduces its guide image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import cv2
import numpy as np

from engine.registry import (
    Preprocessor,
    ProcessContext,
    Setting,
    register,
    resolve_seed,
    seed_setting,
)

#: ControlNet's ``f``: pixels per noise cell.
DEFAULT_NOISE_SCALE = 256


def noise_disk(
    rng: np.random.Generator, height: int, width: int, scale: int, amplitude: float = 1.0
) -> np.ndarray:
    """A smooth ``height×width`` float32 random field spanning [0, amplitude].

    Uniform noise on a ``(height//scale + 2) × (width//scale + 2)`` grid (one
    cell per ``scale`` pixels) is upsampled bicubically to
    ``(height + 2*scale) × (width + 2*scale)``; the centre ``height×width``
    window (away from the border cells) is min-max normalised to
    ``[0, amplitude]``. A constant window (only possible for a 1-pixel image)
    gives zeros.

    The grid is resized in float64, as in the reference (OpenCV's float64
    bicubic path is also several times faster than its float32 one here), and
    ``cv2.normalize`` rescales and casts to float32 in a single pass.
    """
    grid = rng.random((height // scale + 2, width // scale + 2))
    big = cv2.resize(grid, (width + 2 * scale, height + 2 * scale), interpolation=cv2.INTER_CUBIC)
    window = big[scale : scale + height, scale : scale + width]
    return cv2.normalize(window, None, 0.0, amplitude, cv2.NORM_MINMAX, dtype=cv2.CV_32F)


def content_shuffle(image: np.ndarray, seed: int, scale: int = DEFAULT_NOISE_SCALE) -> np.ndarray:
    """Warp ``image`` (``H×W×C`` uint8) through a random flow field drawn from ``seed``."""
    height, width = image.shape[:2]
    rng = np.random.default_rng(seed)
    # x first, then y, like the reference; two float32 maps avoid building an H×W×2 array.
    map_x = noise_disk(rng, height, width, scale, width - 1)
    map_y = noise_disk(rng, height, width, scale, height - 1)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR)


@register
class Shuffle(Preprocessor):
    """Content shuffle: the image's colours and textures, randomly swirled."""

    name = "shuffle"
    summary = "Content shuffle: warp the image through a smooth random flow field."
    price_class = "canny"
    settings: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "noiseScale",
            int,
            DEFAULT_NOISE_SCALE,
            "Size in pixels of one cell of the random flow field (ControlNet's f): "
            "larger values give broader, smoother swirls.",
            minimum=16,
            maximum=1024,
        ),
        seed_setting("the random flow field"),
    )

    def process(
        self, image: np.ndarray, params: Mapping[str, Any], ctx: ProcessContext
    ) -> np.ndarray:
        seed = resolve_seed(params, ctx)
        return content_shuffle(image, seed, params["noiseScale"])
