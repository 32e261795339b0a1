"""tile: "tile_gaussian", a blurred, noised copy of the image for the tile ControlNet.

The tile ControlNet is conditioned on a degraded version of the picture it
should re-detail. Runware's SDK calls this preprocessor ``tile_gaussian``, the
name of sd-webui-controlnet's Gaussian-pyramid tile preprocessor, and we follow
that algorithm:

1. ``y = float32(image)``.
2. ``pyramidLevels`` times: add Gaussian noise ``N(0, noiseSigma)`` to ``y``,
   then ``cv2.pyrDown`` (Gaussian blur, halve each side).
3. ``pyramidLevels`` times: ``cv2.pyrUp`` back to the previous level's exact
   size (so odd sides round-trip exactly, where the reference's plain pyrUp
   would return a larger image; no final resize needed), then add
   ``N(0, noiseSigma)`` noise again.
4. Clip to [0, 255] and truncate to uint8, as the reference does.

Defaults are the reference's: 3 levels (detail finer than ~8 px is gone) and
sigma 16. ``noiseSigma=0`` gives a plain, deterministic pyramid blur.

Randomness: ``numpy.random.default_rng(seed)`` (PCG64) draws float32 standard
normals, so the same seed gives bit-identical output on every run (given the
same numpy and OpenCV versions); it is not the reference's global ``np.random``
stream. The default seed is the engine's per-task seed (task UUID, else input
bytes), so retries reproduce.
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

DEFAULT_LEVELS = 3
DEFAULT_SIGMA = 16.0


def _add_noise(y: np.ndarray, rng: np.random.Generator, sigma: float) -> None:
    """Add ``N(0, sigma)`` float32 noise to ``y`` in place (nothing when sigma is 0)."""
    if sigma > 0:
        noise = rng.standard_normal(y.shape, dtype=np.float32)
        noise *= np.float32(sigma)
        y += noise


def tile_gaussian(
    image: np.ndarray, seed: int, levels: int = DEFAULT_LEVELS, sigma: float = DEFAULT_SIGMA
) -> np.ndarray:
    """Gaussian-pyramid degradation of ``image`` (``H×W×C`` uint8), same size out."""
    rng = np.random.default_rng(seed)
    y = image.astype(np.float32)
    sizes: list[tuple[int, int]] = []
    for _ in range(levels):
        _add_noise(y, rng, sigma)
        sizes.append((y.shape[1], y.shape[0]))
        y = cv2.pyrDown(y)
    for size in reversed(sizes):
        y = cv2.pyrUp(y, dstsize=size)
        _add_noise(y, rng, sigma)
    np.clip(y, 0, 255, out=y)
    return y.astype(np.uint8)


@register
class Tile(Preprocessor):
    """tile_gaussian: pyramid down and up with Gaussian noise at every level."""

    name = "tile"
    summary = "Tile (tile_gaussian): a blurred, noised copy of the image."
    price_class = "canny"
    settings: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "pyramidLevels",
            int,
            DEFAULT_LEVELS,
            "How many times the image is halved (and restored): each level removes detail "
            "twice as coarse.",
            minimum=1,
            maximum=4,
        ),
        Setting(
            "noiseSigma",
            float,
            DEFAULT_SIGMA,
            "Standard deviation, in 8-bit levels, of the Gaussian noise added at every "
            "pyramid level; 0 gives a plain blur.",
            minimum=0,
            maximum=50,
        ),
        seed_setting("the noise"),
    )

    def process(
        self, image: np.ndarray, params: Mapping[str, Any], ctx: ProcessContext
    ) -> np.ndarray:
        seed = resolve_seed(params, ctx)
        return tile_gaussian(image, seed, params["pyramidLevels"], params["noiseSigma"])
