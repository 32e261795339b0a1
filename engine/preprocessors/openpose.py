"""openpose: OpenPose-format skeletons (body; optionally hands and face) on black.

The drawing style is ControlNet 1.1's, see :mod:`._pose_draw`. Two detectors:

``dwpose`` (default): DWPose whole-body (yzd-v/DWPose, Apache-2.0), the
detector sd-webui-controlnet and controlnet_aux ship as ``dw_openpose_full``.
Its two ONNX files are pinned by revision and sha256 and downloaded on first
use. The pipeline follows DWPose's own ONNX annotator:

1. **Person boxes**, YOLOX-L (``yolox_l.onnx``): the image is letterboxed into
   640×640 (scaled by ``r = min(640/h, 640/w)`` with bilinear resize, placed
   top-left, padding 114), fed as ``1×3×640×640`` float32 0..255. We feed BGR,
   the channel order YOLOX was trained with (DWPose's annotator passes its RGB
   frame unchanged). The output is the raw head ``1×8400×85`` (decode_in_inference
   off): per anchor ``(x, y, log w, log h)`` relative to its grid cell on strides
   8/16/32, then objectness and 80 class probabilities (already sigmoided).
   Boxes are decoded, divided by ``r``, scored ``objectness × P(person)``,
   kept above 0.3 and de-duplicated by NMS at IoU 0.45. DWPose falls back to the
   whole frame when no box is found, which draws skeletons on empty scenes; we
   return nobody instead.
2. **Keypoints**, DWPose-L 384×288 (``dw-ll_ucoco_384.onnx``, an RTMPose SimCC
   head): each box is grown by 1.25, widened or heightened to the model's 3:4
   aspect, and affine-warped (bilinear, black border) to 288×384 (w×h); RGB,
   normalised with mean (123.675, 116.28, 103.53) and std (58.395, 57.12,
   57.375), NCHW. Outputs ``simcc_x`` ``1×133×576`` and ``simcc_y``
   ``1×133×768``: the keypoint is at the argmax bin / 2 (split ratio 2.0) in
   crop pixels, its score the smaller of the two maxima; it is mapped back to
   the image through the inverse of the crop.
3. The 133 COCO-WholeBody points give the 18 OpenPose body points (17 COCO
   body points re-ordered, neck = midpoint of the shoulders, present when
   both are), the two hands (21 each) and the face (68). Points scoring at or
   below ``keypointThreshold`` (default 0.3, DWPose's) are dropped.

``movenet``: Google MoveNet SinglePose Lightning v4 int8 (Apache-2.0), body
only, **one person at most**. The image is padded to a square (image top-left,
black), resized to 192×192 and fed as uint8 NHWC; the output ``1×1×17×3`` holds
(y, x, score) normalised to the padded square. The 17 COCO points become the
18 OpenPose ones as above. A person is reported when at least 4 of the 17
points score above ``keypointThreshold`` (default 0.4; OpenPose's own parser
likewise drops skeletons with fewer than 4 parts): MoveNet always answers 17
points, and on empty scenes its quantised scores reach 0.36. It cannot find
hands or faces, so ``includeHandsAndFaceOpenPose=true`` with it is an
``invalidParameter`` error rather than a silently body-only picture. Its ONNX
(converted from the TFLite release) is not published, so the store only finds
it locally.

:func:`detect` returns the people found (keypoints in pixels) for callers and
tests that want geometry rather than a picture; :func:`detect_batch` does the same for
several images, sharing forward passes: one YOLOX batch for the images, one pose batch
for the person crops of all of them (when the graphs' batch dims are dynamic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import cv2
import numpy as np

from engine.models.onnx import map_batched, session_for
from engine.models.store import ModelSpec, ModelStore
from engine.preprocessors._common import resize
from engine.preprocessors._pose_draw import Person, draw_pose
from engine.registry import BatchedPreprocessor, ProcessContext, Setting, register
from guideflow.errors import InvalidParameter

HANDS_AND_FACE = "includeHandsAndFaceOpenPose"
THRESHOLD = "keypointThreshold"
DEFAULT_THRESHOLDS: dict[str, float] = {"dwpose": 0.3, "movenet": 0.4}

# -- model pins ---------------------------------------------------------------------------------

DWPOSE_REVISION = "f7c16a3d45ad3783db41471848c80fbc281cabac"

YOLOX_L = ModelSpec(
    name="dwpose_yolox_l",
    filename="yolox_l.onnx",
    sha256="7860ae79de6c89a3c1eb72ae9a2756c0ccfbe04b7791bb5880afabd97855a411",
    size=216_746_733,
    license="Apache-2.0",
    description="YOLOX-L person detector, 640×640, raw 1×8400×85 head (openpose dwpose)",
    repo_id="yzd-v/DWPose",
    revision=DWPOSE_REVISION,
    source="https://huggingface.co/yzd-v/DWPose",
    directory="pose_dwpose",
)

DWPOSE_LL = ModelSpec(
    name="dwpose_ll_ucoco_384",
    filename="dw-ll_ucoco_384.onnx",
    sha256="724f4ff2439ed61afb86fb8a1951ec39c6220682803b4a8bd4f598cd913b1843",
    size=134_399_116,
    license="Apache-2.0",
    description="DWPose-L whole body, 133 keypoints, 288×384 SimCC (openpose dwpose)",
    repo_id="yzd-v/DWPose",
    revision=DWPOSE_REVISION,
    source="https://huggingface.co/yzd-v/DWPose",
    directory="pose_dwpose",
)

MOVENET_LIGHTNING = ModelSpec(
    name="movenet_singlepose_lightning_int8",
    filename="movenet_singlepose_lightning_int8_4.onnx",
    sha256="a6e9dfd29ab7043e35ad79c83808a3f8d6e524c0043d43378720ba0854eabef4",
    size=2_933_027,
    license="Apache-2.0",
    description="MoveNet SinglePose Lightning v4 int8, 17 COCO keypoints, 192×192 (openpose)",
    source="TF Hub movenet/singlepose/lightning/4 (TFLite int8), converted with tf2onnx",
    directory="pose_movenet",
)

# -- keypoint bookkeeping -----------------------------------------------------------------------

#: For each OpenPose body point, its COCO-17 index (None: the neck, computed from the shoulders).
COCO_TO_OPENPOSE: tuple[int | None, ...] = (
    0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3,
)  # fmt: skip
COCO_LEFT_SHOULDER, COCO_RIGHT_SHOULDER = 5, 6
WHOLEBODY_FACE = slice(23, 91)
WHOLEBODY_LEFT_HAND = slice(91, 112)
WHOLEBODY_RIGHT_HAND = slice(112, 133)
MOVENET_MIN_KEYPOINTS = 4


def _present(points: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """``points`` with NaN rows where the score is at or below ``threshold``."""
    out = points.astype(np.float64, copy=True)
    out[~(scores > threshold)] = np.nan
    return out


def body_from_coco(points: np.ndarray, scores: np.ndarray, threshold: float) -> Person:
    """17 COCO body points (x, y) and scores → an OpenPose-18 :class:`Person`.

    The neck is the midpoint of the shoulders, present when both are.
    """
    coco = _present(points[:17], scores[:17], threshold)
    body = np.full((18, 2), np.nan)
    body_scores = np.zeros(18)
    for op, co in enumerate(COCO_TO_OPENPOSE):
        if co is None:
            continue
        body[op] = coco[co]
        body_scores[op] = scores[co]
    left, right = coco[COCO_LEFT_SHOULDER], coco[COCO_RIGHT_SHOULDER]
    if np.all(np.isfinite(left)) and np.all(np.isfinite(right)):
        body[1] = (left + right) / 2.0
        body_scores[1] = min(scores[COCO_LEFT_SHOULDER], scores[COCO_RIGHT_SHOULDER])
    return Person(body=body, body_scores=body_scores)


# -- MoveNet ------------------------------------------------------------------------------------

MOVENET_SIZE = 192
MOVENET_INPUT = "serving_default_input:0"
MOVENET_OUTPUT = "StatefulPartitionedCall:0"


def movenet_input(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """Pad to a square (image top-left, black), resize to 192: ``1×192×192×3`` uint8, side."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[:h, :w] = rgb
    return resize(square, MOVENET_SIZE, MOVENET_SIZE)[None], side


def detect_movenet_batch(
    rgbs: Sequence[np.ndarray], threshold: float, models: ModelStore | None = None
) -> list[list[Person]]:
    """Per image, the single person MoveNet sees, or nobody (fewer than 4 confident points)."""
    session = session_for(MOVENET_LIGHTNING, models)

    def finish(rgb: np.ndarray, x: np.ndarray, outs: list[Any]) -> list[Person]:
        yxs = np.asarray(outs[0]).reshape(17, 3).astype(np.float64)
        points = yxs[:, [1, 0]] * max(rgb.shape[:2])  # normalised to the padded square
        scores = yxs[:, 2]
        if int(np.count_nonzero(scores > threshold)) < MOVENET_MIN_KEYPOINTS:
            return []
        return [body_from_coco(points, scores, threshold)]

    return map_batched(
        session,
        list(rgbs),
        lambda rgb: movenet_input(rgb)[0],
        finish,
        output_names=[MOVENET_OUTPUT],
        input_name=MOVENET_INPUT,
    )


def detect_movenet(
    rgb: np.ndarray, threshold: float, models: ModelStore | None = None
) -> list[Person]:
    """:func:`detect_movenet_batch` of one image."""
    return detect_movenet_batch([rgb], threshold, models)[0]


# -- DWPose: YOLOX person boxes -----------------------------------------------------------------

YOLOX_SIZE = 640
YOLOX_STRIDES = (8, 16, 32)
YOLOX_PAD_VALUE = 114
PERSON_SCORE = 0.3
NMS_IOU = 0.45


def yolox_ratio(rgb: np.ndarray, size: int = YOLOX_SIZE) -> float:
    """The letterbox scale of ``rgb`` into ``size``²."""
    h, w = rgb.shape[:2]
    return min(size / h, size / w)


def yolox_input(rgb: np.ndarray, size: int = YOLOX_SIZE) -> tuple[np.ndarray, float]:
    """Letterbox (top-left, pad 114) into ``size``², BGR: ``1×3×size×size`` float32, ratio."""
    h, w = rgb.shape[:2]
    r = yolox_ratio(rgb, size)
    new_w, new_h = int(w * r), int(h * r)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    scaled = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    padded = np.full((size, size, 3), YOLOX_PAD_VALUE, dtype=np.uint8)
    padded[:new_h, :new_w] = scaled
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32), r


def yolox_grid(size: int = YOLOX_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Per-anchor grid cell (x, y) and stride, in the head's output order."""
    cells, strides = [], []
    for stride in YOLOX_STRIDES:
        n = size // stride
        ys, xs = np.mgrid[0:n, 0:n]
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full(n * n, stride))
    return np.concatenate(cells).astype(np.float64), np.concatenate(strides).astype(np.float64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression (pixel-inclusive areas, as YOLOX's demo); kept indices."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        best, rest = order[0], np.asarray(order[1:], dtype=int)
        keep.append(int(best))
        if rest.size == 0:
            break
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = list(rest[overlap <= iou])
    return keep


def decode_yolox(raw: np.ndarray, ratio: float, size: int = YOLOX_SIZE) -> np.ndarray:
    """Raw ``1×N×85`` head → ``k×4`` person boxes (x1, y1, x2, y2) in image pixels."""
    pred = raw[0].astype(np.float64)
    cells, strides = yolox_grid(size)
    if pred.shape[0] != cells.shape[0]:
        raise ValueError(f"YOLOX head has {pred.shape[0]} anchors, expected {cells.shape[0]}")
    centre = (pred[:, :2] + cells) * strides[:, None]
    half = np.exp(pred[:, 2:4]) * strides[:, None] / 2.0
    boxes = np.concatenate([centre - half, centre + half], axis=1) / ratio
    scores = pred[:, 4] * pred[:, 5]
    mask = scores > PERSON_SCORE
    boxes, scores = boxes[mask], scores[mask]
    if boxes.shape[0] == 0:
        return np.zeros((0, 4))
    return boxes[nms(boxes, scores, NMS_IOU)]


def detect_people_boxes_batch(
    rgbs: Sequence[np.ndarray], models: ModelStore | None = None
) -> list[np.ndarray]:
    """Person boxes (x1, y1, x2, y2) found by YOLOX-L in each image (one 640² batch)."""
    session = session_for(YOLOX_L, models)
    return map_batched(
        session,
        list(rgbs),
        lambda rgb: yolox_input(rgb)[0],
        lambda rgb, x, outs: decode_yolox(outs[0], yolox_ratio(rgb)),
    )


def detect_people_boxes(rgb: np.ndarray, models: ModelStore | None = None) -> np.ndarray:
    """Person boxes (x1, y1, x2, y2) found by YOLOX-L."""
    return detect_people_boxes_batch([rgb], models)[0]


# -- DWPose: whole-body keypoints ---------------------------------------------------------------

POSE_INPUT_SIZE = (288, 384)  # (w, h), DWPose-L 384×288
BOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0
POSE_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
POSE_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def box_to_crop(box: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Box → crop centre and size (w, h): grown by 1.25, then fitted to the model's aspect."""
    x1, y1, x2, y2 = (float(v) for v in box)
    centre = np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0])
    w, h = (x2 - x1) * BOX_PADDING, (y2 - y1) * BOX_PADDING
    aspect = input_size[0] / input_size[1]
    scale = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    return centre, scale


def crop_matrix(centre: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """The 2×3 affine map from image pixels to crop pixels (no rotation)."""
    k = input_size[0] / scale[0]  # equal to input_size[1] / scale[1] after the aspect fit
    return np.array(
        [
            [k, 0.0, input_size[0] / 2.0 - k * centre[0]],
            [0.0, k, input_size[1] / 2.0 - k * centre[1]],
        ]
    )


def pose_input(
    rgb: np.ndarray, centre: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]
) -> np.ndarray:
    """The normalised ``1×3×h×w`` crop around one person."""
    matrix = crop_matrix(centre, scale, input_size)
    crop = cv2.warpAffine(rgb, matrix, input_size, flags=cv2.INTER_LINEAR)
    x = (crop.astype(np.float32) - POSE_MEAN) / POSE_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def decode_simcc(
    simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = SIMCC_SPLIT_RATIO
) -> tuple[np.ndarray, np.ndarray]:
    """``K×Wx`` and ``K×Wy`` SimCC maps → ``K×2`` crop-pixel points and ``K`` scores.

    The point is each axis's argmax bin divided by the split ratio; its score the
    smaller of the two maxima.
    """
    xs = np.argmax(simcc_x, axis=-1)
    ys = np.argmax(simcc_y, axis=-1)
    points = np.stack([xs, ys], axis=-1).astype(np.float64) / split_ratio
    scores = np.minimum(simcc_x.max(axis=-1), simcc_y.max(axis=-1)).astype(np.float64)
    return points, scores


def crop_to_image(
    points: np.ndarray, centre: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]
) -> np.ndarray:
    """Crop pixels → image pixels (the inverse of :func:`crop_matrix`)."""
    return points / np.asarray(input_size, dtype=np.float64) * scale + centre - scale / 2.0


def pose_input_size(session: Any) -> tuple[int, int]:
    """The pose model's (w, h), read from its input shape (DWPose-L's 288×384 if dynamic)."""
    shape = session.get_inputs()[0].shape
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int):
        return (w, h)
    return POSE_INPUT_SIZE


def wholebody_person(points: np.ndarray, scores: np.ndarray, threshold: float) -> Person:
    """133 COCO-WholeBody points → an OpenPose :class:`Person` with hands and face."""
    person = body_from_coco(points, scores, threshold)
    person.hands = [
        _present(points[WHOLEBODY_LEFT_HAND], scores[WHOLEBODY_LEFT_HAND], threshold),
        _present(points[WHOLEBODY_RIGHT_HAND], scores[WHOLEBODY_RIGHT_HAND], threshold),
    ]
    person.face = _present(points[WHOLEBODY_FACE], scores[WHOLEBODY_FACE], threshold)
    return person


def detect_dwpose_batch(
    rgbs: Sequence[np.ndarray], threshold: float, models: ModelStore | None = None
) -> list[list[Person]]:
    """Everyone YOLOX finds in each image, with DWPose's 133 whole-body keypoints each.

    The person crops of all images (all 288×384) go through the pose model together, in
    batches of up to ``GUIDEFLOW_MAX_BATCH`` when its batch dim is dynamic.
    """
    boxes = detect_people_boxes_batch(rgbs, models)
    people: list[list[Person]] = [[] for _ in rgbs]
    if not any(b.shape[0] for b in boxes):
        return people
    session = session_for(DWPOSE_LL, models)
    size = pose_input_size(session)
    crops = [(index, *box_to_crop(box, size)) for index, found in enumerate(boxes) for box in found]

    def prepare(crop: tuple[int, np.ndarray, np.ndarray]) -> np.ndarray:
        index, centre, scale = crop
        return pose_input(rgbs[index], centre, scale, size)

    def finish(crop: tuple[int, np.ndarray, np.ndarray], x: np.ndarray, outs: list[Any]) -> Person:
        _, centre, scale = crop
        points, scores = decode_simcc(outs[0][0], outs[1][0])
        return wholebody_person(crop_to_image(points, centre, scale, size), scores, threshold)

    for crop, person in zip(crops, map_batched(session, crops, prepare, finish), strict=True):
        people[crop[0]].append(person)
    return people


def detect_dwpose(
    rgb: np.ndarray, threshold: float, models: ModelStore | None = None
) -> list[Person]:
    """:func:`detect_dwpose_batch` of one image."""
    return detect_dwpose_batch([rgb], threshold, models)[0]


# -- the preprocessor ---------------------------------------------------------------------------


def detect_batch(
    rgbs: Sequence[np.ndarray],
    *,
    variant: str = "dwpose",
    threshold: float | None = None,
    models: ModelStore | None = None,
) -> list[list[Person]]:
    """People in each image (``H×W×3`` uint8), keypoints in its pixel coordinates."""
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[variant]
    if variant == "movenet":
        return detect_movenet_batch(rgbs, threshold, models)
    if variant == "dwpose":
        return detect_dwpose_batch(rgbs, threshold, models)
    raise InvalidParameter(f"openpose: unknown variant {variant!r}", parameter="variant")


def detect(
    rgb: np.ndarray,
    *,
    variant: str = "dwpose",
    threshold: float | None = None,
    models: ModelStore | None = None,
) -> list[Person]:
    """People in ``rgb`` (``H×W×3`` uint8), keypoints in its pixel coordinates."""
    return detect_batch([rgb], variant=variant, threshold=threshold, models=models)[0]


@register
class OpenPose(BatchedPreprocessor):
    """OpenPose skeletons from DWPose (whole body) or MoveNet (body only, one person)."""

    name = "openpose"
    summary = "OpenPose: body skeletons (and optionally hands and face) on black."
    price_class = "depth"
    variants: ClassVar[tuple[str, ...]] = ("dwpose", "movenet")
    settings: ClassVar[tuple[Setting, ...]] = (
        Setting(
            HANDS_AND_FACE,
            bool,
            False,
            "Also draw hands (21 points each) and face (68 points), as ControlNet's "
            "openpose_full. Needs the dwpose variant.",
        ),
        Setting(
            THRESHOLD,
            float,
            None,
            "Keypoints scoring at or below this are left out. Default: 0.3 for dwpose "
            "(DWPose's own), 0.4 for movenet.",
            minimum=0.0,
            maximum=1.0,
        ),
    )

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        if variant == "movenet":
            return (MOVENET_LIGHTNING,)
        return (YOLOX_L, DWPOSE_LL)

    def check(self, values: dict[str, Any]) -> None:
        if values[HANDS_AND_FACE] and values["variant"] == "movenet":
            raise InvalidParameter(
                f"openpose: {HANDS_AND_FACE}=true needs the dwpose variant; movenet detects "
                "body keypoints only and cannot find hands or faces",
                parameter=HANDS_AND_FACE,
            )

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        variant = params["variant"]
        threshold = params[THRESHOLD]
        if threshold is None:
            threshold = DEFAULT_THRESHOLDS[variant]
        found = detect_batch(images, variant=variant, threshold=threshold, models=ctxs[0].models)
        out = []
        for image, people, ctx in zip(images, found, ctxs, strict=True):
            ctx.meta["people"] = len(people)
            ctx.meta[THRESHOLD] = threshold
            height, width = image.shape[:2]
            out.append(draw_pose(people, height, width, hands_and_face=params[HANDS_AND_FACE]))
        return out
