"""canny: Canny edge map, white edges on black (ControlNet 1.1's ``annotator/canny``).

OpenCV's Canny runs directly on the 3-channel RGB image (it takes, per pixel,
the channel with the strongest gradient), exactly as ControlNet 1.1 calls it, so
the guide image is pixel-identical to the reference for the same input pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import cv2
import numpy as np

from engine.preprocessors._common import gray_to_rgb
from engine.registry import Preprocessor, ProcessContext, Setting, register
from guideflow.errors import InvalidParameter


@register
class Canny(Preprocessor):
    """Canny edges with Runware's ``lowThresholdCanny`` / ``highThresholdCanny``."""

    name = "canny"
    summary = "Canny edge detection: white edges on black."
    price_class = "canny"
    settings: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "lowThresholdCanny",
            int,
            100,
            "Lower hysteresis threshold: weaker gradients are never edges; "
            "those between the two thresholds are kept only when joined to a strong edge.",
            minimum=0,
            maximum=255,
            aliases=("low", "lowThreshold"),
        ),
        Setting(
            "highThresholdCanny",
            int,
            200,
            "Upper hysteresis threshold: gradients above it always start an edge. "
            "Must be greater than lowThresholdCanny.",
            minimum=0,
            maximum=255,
            aliases=("high", "highThreshold"),
        ),
    )

    def check(self, values: dict[str, Any]) -> None:
        """Reject ``low >= high``: hysteresis needs a strictly lower low threshold."""
        low, high = values["lowThresholdCanny"], values["highThresholdCanny"]
        if low >= high:
            raise InvalidParameter(
                f"canny: 'lowThresholdCanny' ({low}) must be lower than "
                f"'highThresholdCanny' ({high})",
                parameter="lowThresholdCanny",
            )

    def process(
        self, image: np.ndarray, params: Mapping[str, Any], ctx: ProcessContext
    ) -> np.ndarray:
        edges = cv2.Canny(image, params["lowThresholdCanny"], params["highThresholdCanny"])
        return gray_to_rgb(edges)
