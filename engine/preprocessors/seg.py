"""seg: ADE20K semantic segmentation painted with the ADE20K palette ControlNet was trained on.

ControlNet's seg model reads a picture in which every pixel is painted with the
colour of its ADE20K class (the mmseg palette in :mod:`._ade20k`); which network
produced the labels matters less than the exact colours. ControlNet 1.0 used
UniFormer-UperNet, 1.1 OneFormer; neither has permissively licensed ONNX
weights that can be pinned by revision and sha256.

Model choice (the only variant, ``deeplabv3``): DeepLabV3 with a MobileNetV2
backbone trained on ADE20K (TF Hub ``lite-model/deeplabv3-mobilenetv2-ade20k/1``,
Apache-2.0), converted to ONNX with tf2onnx. Considered and rejected:

* SegFormer (NVIDIA): its weights are under NVIDIA's non-commercial licence.
* UperNet-ConvNeXt (openmmlab, MIT): an ONNX export exists on the Hub, but no
  revision or sha256 could be verified to pin it.
* OneFormer / UniFormer: no ONNX export; licences vary by checkpoint.

DeepLabV3-MobileNetV2 is small (2.4 MB) and fast, and finds the large stuff
classes (wall, floor, ceiling, sky, road, bed, ...) that matter for a guide
image; it is coarser than UperNet on small objects. Its ONNX is not published,
so the store finds it only locally (``$GUIDEFLOW_MODELS_DIR``); the message of
``modelUnavailable`` says where to put it.

Pipeline:

1. The RGB image is resized (stretched) to 513×513 and scaled to ``x/127.5 - 1``
   (NHWC float32, input ``sub_7``).
2. Output ``ResizeBilinear_2`` holds ``1×513×513×151`` logits: class 0 is
   "other", 1..150 are the ADE20K classes in the standard order.
3. Argmax at 513×513, then nearest-neighbour resize of the label map to the
   output size (cheaper than resizing 151 logit planes, and it never invents a
   label between two regions).
4. Paint: class ``k`` gets palette colour ``k - 1``; "other" is painted black,
   a colour no ADE20K class uses, so the ControlNet reads it as "no condition".

``ctx.meta["seg_classes"]`` lists the classes covering at least 1% of the
picture with their pixel fractions, largest first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import cv2
import numpy as np

from engine.models.onnx import map_batched, session_for
from engine.models.store import ModelSpec
from engine.preprocessors._ade20k import ADE20K_CLASSES, paint
from engine.preprocessors._common import resize
from engine.registry import BatchedPreprocessor, ProcessContext, Setting, register

DEEPLAB_SIZE = 513
DEEPLAB_INPUT = "sub_7"
DEEPLAB_OUTPUT = "ResizeBilinear_2"
#: Classes below this share of the picture are left out of ``ctx.meta["seg_classes"]``.
META_MIN_FRACTION = 0.01

DEEPLAB_ADE20K = ModelSpec(
    name="deeplabv3_mnv2_ade20k",
    filename="deeplabv3_mnv2_ade20k.onnx",
    sha256="ae697fd33553ca25ef39ea78e696774df029fd463e30b875d82d317f1b6df5e8",
    size=2_426_719,
    license="Apache-2.0",
    description="DeepLabV3 MobileNetV2, ADE20K 150 classes + other, 513×513 NHWC (seg)",
    source=(
        "TF Hub lite-model/deeplabv3-mobilenetv2-ade20k/1 (TFLite), converted to ONNX "
        "with tf2onnx, opset 17"
    ),
    directory="seg_deeplabv3_ade20k",
)


def deeplab_input(rgb: np.ndarray) -> np.ndarray:
    """``H×W×3`` uint8 RGB → ``1×513×513×3`` float32 in [-1, 1] (the TF Hub convention)."""
    x = resize(rgb, DEEPLAB_SIZE, DEEPLAB_SIZE).astype(np.float32)
    x = x / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(x[None])


def labels_from_logits(logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """``1×h×w×151`` logits → ``height×width`` uint8 dataset class ids (0 = other).

    Argmax at the model's resolution, then nearest-neighbour resize to the output size.
    """
    labels = np.argmax(logits[0], axis=-1).astype(np.uint8)
    if labels.shape != (height, width):
        labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
    return labels


def class_fractions(
    labels: np.ndarray, min_fraction: float = META_MIN_FRACTION
) -> dict[str, float]:
    """``{class name: share of pixels}`` for classes covering at least ``min_fraction``."""
    counts = np.bincount(labels.ravel(), minlength=len(ADE20K_CLASSES) + 1)
    total = float(labels.size)
    out: dict[str, float] = {}
    for cls in np.argsort(counts[1:])[::-1] + 1:
        share = counts[cls] / total
        if share < min_fraction:
            break
        out[ADE20K_CLASSES[cls - 1]] = round(float(share), 4)
    return out


def segment_batch(rgbs: Sequence[np.ndarray], ctxs: Sequence[ProcessContext]) -> list[np.ndarray]:
    """ADE20K class ids (0 = other, 1..150) per pixel of each image, at its height and width.

    Every image is stretched to 513×513, so all of them can share forward passes.
    """
    session = session_for(DEEPLAB_ADE20K, ctxs[0].models)

    def finish(rgb: np.ndarray, x: np.ndarray, outs: list[Any]) -> np.ndarray:
        height, width = rgb.shape[:2]
        return labels_from_logits(outs[0], width, height)

    return map_batched(
        session,
        list(rgbs),
        deeplab_input,
        finish,
        output_names=[DEEPLAB_OUTPUT],
        input_name=DEEPLAB_INPUT,
    )


def segment(rgb: np.ndarray, ctx: ProcessContext) -> np.ndarray:
    """:func:`segment_batch` of one image."""
    return segment_batch([rgb], [ctx])[0]


@register
class Seg(BatchedPreprocessor):
    """ADE20K semantic segmentation in the mmseg/ControlNet palette."""

    name = "seg"
    summary = "Segmentation: ADE20K classes painted in the ControlNet/mmseg palette."
    price_class = "depth"
    variants: ClassVar[tuple[str, ...]] = ("deeplabv3",)
    settings: ClassVar[tuple[Setting, ...]] = ()

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        return (DEEPLAB_ADE20K,)

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        out = []
        for labels, ctx in zip(segment_batch(images, ctxs), ctxs, strict=True):
            ctx.meta["seg_classes"] = class_fractions(labels)
            out.append(paint(labels))
        return out
