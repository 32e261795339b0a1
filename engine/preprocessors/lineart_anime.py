"""lineart_anime: anime-style white line drawing on black (ControlNet 1.1's Lineart Anime).

ControlNet 1.1's ``LineartAnimeDetector`` runs a pix2pix U-Net (8 down-samplings,
``netG.pth`` in ``lllyasviel/Annotators``); here its ONNX export
``lineart/lineart_anime.onnx`` from ``deepghs/imgutils-models``.

**I/O, as in ControlNet.** The image is taken to the detect resolution (shorter side 512,
sides rounded to 64) and then up to the next multiples of 256 (the U-Net halves the size 8
times); the input ``input`` is float32 ``[1,3,H,W]`` RGB scaled to [-1, 1]
(``x/127.5 - 1``). The output ``output`` ``[1,1,H,W]`` is a tanh drawing in [-1, 1] with
dark lines; ``(out + 1)/2`` is resized back (bicubic) to the output size, clipped, and
inverted, giving white lines on black.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from engine.models.onnx import map_batched, session_for
from engine.models.store import ModelSpec
from engine.preprocessors._common import (
    fit_size,
    gray_to_rgb,
    resize,
    single_plane,
    to_nchw,
    to_uint8,
)
from engine.registry import BatchedPreprocessor, ProcessContext, register

LINEART_ANIME = ModelSpec(
    name="lineart_anime",
    directory="lineart",
    filename="lineart_anime.onnx",
    sha256="7d0ae15de36f510b307eef3b2bce261f260286a025177f55c6f61c4e8992f709",
    size=217_961_700,
    license=(
        "MIT (deepghs/imgutils-models ONNX export of lllyasviel/Annotators netG.pth; "
        "upstream weight licence not restated there)"
    ),
    description=(
        "ControlNet 1.1 lineart_anime U-Net (netG.pth) as ONNX. Input 'input' float32 "
        "[1,3,H,W] RGB/127.5-1 with H, W multiples of 256; output 'output' [1,1,H,W] in "
        "[-1,1], dark lines."
    ),
    repo_id="deepghs/imgutils-models",
    revision="14f827090de9bab409bfe5179c541cce4d08e5f9",
    repo_filename="lineart/lineart_anime.onnx",
    source="https://huggingface.co/deepghs/imgutils-models (lineart/lineart_anime.onnx)",
)

DETECT_RESOLUTION = 512
DETECT_MULTIPLE = 64
MAX_DETECT_SIDE = 2048
#: The U-Net down-samples 8 times: its input sides must be multiples of 2**8.
UNET_MULTIPLE = 256


def unet_size(width: int, height: int) -> tuple[int, int]:
    """``(w, h)`` the U-Net runs at: the detect size, then up to multiples of 256."""
    dw, dh = fit_size(width, height, DETECT_RESOLUTION, DETECT_MULTIPLE, MAX_DETECT_SIDE)
    return (
        UNET_MULTIPLE * math.ceil(dw / UNET_MULTIPLE),
        UNET_MULTIPLE * math.ceil(dh / UNET_MULTIPLE),
    )


def anime_lines(rgbs: Sequence[np.ndarray], ctxs: Sequence[ProcessContext]) -> list[np.ndarray]:
    """White-on-black line strength in [0, 1] (``H×W`` float32) per image.

    Images with the same U-Net input size share forward passes.
    """
    spec = LINEART_ANIME
    session = session_for(spec, ctxs[0].models)

    def prepare(item: tuple[np.ndarray, ProcessContext]) -> np.ndarray:
        h, w = item[0].shape[:2]
        uw, uh = unet_size(w, h)
        return to_nchw(resize(item[0], uw, uh), scale=1.0 / 127.5, mean=(1.0, 1.0, 1.0))

    def finish(item: tuple[np.ndarray, ProcessContext], x: np.ndarray, outs: list[Any]) -> Any:
        rgb, ctx = item
        drawing = (single_plane(np.asarray(outs[0], dtype=np.float32), spec) + 1.0) * 0.5
        ctx.meta["model"] = spec.name
        ctx.meta["detectSize"] = [int(x.shape[3]), int(x.shape[2])]
        h, w = rgb.shape[:2]
        if drawing.shape != (h, w):
            drawing = cv2.resize(drawing, (w, h), interpolation=cv2.INTER_CUBIC)
        return 1.0 - drawing.clip(0.0, 1.0)

    items = list(zip(rgbs, ctxs, strict=True))
    return map_batched(
        session, items, prepare, finish, output_names=[session.get_outputs()[0].name]
    )


@register
class LineartAnime(BatchedPreprocessor):
    """Anime line art from ControlNet 1.1's lineart_anime U-Net."""

    name = "lineart_anime"
    summary = "Anime-style white line drawing on black (ControlNet 1.1 lineart_anime)."
    price_class = "depth"

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        return (LINEART_ANIME,)

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        return [gray_to_rgb(to_uint8(lines)) for lines in anime_lines(images, ctxs)]
