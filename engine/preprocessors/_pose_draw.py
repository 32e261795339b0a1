"""OpenPose-format pose drawings, as ControlNet 1.1's openpose/DWPose annotators paint them.

The openpose ControlNet was trained on skeletons drawn in one exact style, so
the style is part of the contract (``annotator/openpose/util.py`` of
ControlNet-v1-1-nightly, final version; DWPose and controlnet_aux draw the same):

* **Body**, 18 keypoints in OpenPose order (:data:`BODY_KEYPOINTS`), on black.
  Each of the 17 limbs of :data:`LIMB_SEQ` is an ellipse polygon
  (``cv2.ellipse2Poly`` around the limb's midpoint, half-length × ``STICKWIDTH``
  4, angle in whole degrees) filled opaque in its colour; then the whole canvas
  is multiplied by 0.6 (truncated to uint8), so limbs come out at 60% of their
  colour; then every keypoint is a filled circle of radius 4 in full colour.
  Limb ``i`` and keypoint ``i`` both use ``BODY_COLORS[i]``.
* **Hands**, 21 points each: the 20 edges of :data:`HAND_EDGES` as 2-px lines
  whose colour runs round the HSV hue circle (edge ``e`` has hue ``e/20``), then
  every point a filled circle of radius 4 in (0, 0, 255).
* **Face**, 68 points: filled white circles of radius 3.

Coordinates are pixels (float). Positions are truncated to integers where
ControlNet truncates (``int(x)``). As in ControlNet, a hand or face point is
only drawn when its truncated coordinates are both > 0 (its convention for
"missing" is ``-1``); here a missing point is NaN. Body points are drawn
whenever present (they may lie partly off-canvas; OpenCV clips).

ControlNet's limb list has two more pairs (ear–shoulder) that its loop never
draws; they are left out here.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

BODY_KEYPOINTS: tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip

#: The 17 drawn limbs as 0-based pairs of :data:`BODY_KEYPOINTS` indices, in drawing order.
LIMB_SEQ: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip

#: RGB colour of keypoint ``i`` and of limb ``i``.
BODY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0),
    (85, 255, 0), (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255),
    (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255), (170, 0, 255),
    (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip

STICKWIDTH = 4
LIMB_ALPHA = 0.6
BODY_RADIUS = 4

#: Hand skeleton: wrist (0) to each finger's four joints, thumb first.
HAND_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18),
    (18, 19), (19, 20),
)  # fmt: skip
HAND_POINT_COLOR = (0, 0, 255)
HAND_LINE_THICKNESS = 2
HAND_RADIUS = 4
FACE_COLOR = (255, 255, 255)
FACE_RADIUS = 3


def hand_edge_color(edge: int) -> tuple[float, float, float]:
    """Edge ``edge``'s colour: hue ``edge/20`` at full saturation and value, scaled to 0..255.

    Floats, as ControlNet hands them to ``cv2.line`` (OpenCV rounds them).
    """
    r, g, b = colorsys.hsv_to_rgb(edge / float(len(HAND_EDGES)), 1.0, 1.0)
    return (r * 255.0, g * 255.0, b * 255.0)


@dataclass(eq=False)
class Person:
    """One detected person, in pixel coordinates of the image it was found in.

    ``body`` is ``18×2`` (x, y) in :data:`BODY_KEYPOINTS` order with NaN rows
    for keypoints that were not found; ``body_scores`` their confidences.
    ``hands`` holds ``21×2`` arrays (left, right), ``face`` a ``68×2`` array,
    both with NaN for points below the confidence threshold; the body-only
    detector leaves them empty / None.
    """

    body: np.ndarray
    body_scores: np.ndarray
    hands: list[np.ndarray] = field(default_factory=list)
    face: np.ndarray | None = None

    def has(self, index: int) -> bool:
        """Whether body keypoint ``index`` was found."""
        return bool(np.all(np.isfinite(self.body[index])))

    def point(self, name: str) -> np.ndarray:
        """The (x, y) of a body keypoint by name (NaN when not found)."""
        return self.body[BODY_KEYPOINTS.index(name)]


def _limb_polygon(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ControlNet's limb ellipse between points ``a`` and ``b`` (x, y), as a polygon."""
    mx, my = (a[0] + b[0]) / 2.0, (a[1] + b[1]) / 2.0
    dx, dy = a[0] - b[0], a[1] - b[1]
    length = math.hypot(dx, dy)
    angle = math.degrees(math.atan2(dy, dx))
    return cv2.ellipse2Poly(
        (int(mx), int(my)), (int(length / 2), STICKWIDTH), int(angle), 0, 360, 1
    )


def draw_bodies(canvas: np.ndarray, people: Sequence[Person]) -> np.ndarray:
    """Limbs (opaque, then the canvas dimmed to 60%), then keypoint circles; returns the canvas."""
    for i, (a, b) in enumerate(LIMB_SEQ):
        for person in people:
            if person.has(a) and person.has(b):
                polygon = _limb_polygon(person.body[a], person.body[b])
                cv2.fillConvexPoly(canvas, polygon, BODY_COLORS[i])
    canvas = (canvas * LIMB_ALPHA).astype(np.uint8)
    for i, color in enumerate(BODY_COLORS):
        for person in people:
            if person.has(i):
                x, y = person.body[i]
                cv2.circle(canvas, (int(x), int(y)), BODY_RADIUS, color, thickness=-1)
    return canvas


def _drawable(point: np.ndarray) -> tuple[int, int] | None:
    """Truncated pixel position of a hand/face point, or None when ControlNet would skip it."""
    if not np.all(np.isfinite(point)):
        return None
    x, y = int(point[0]), int(point[1])
    return (x, y) if x > 0 and y > 0 else None


def draw_hands(canvas: np.ndarray, hands: Iterable[np.ndarray]) -> np.ndarray:
    """Hue-coded 2-px edges, then blue points (radius 4), in place; returns the canvas."""
    for hand in hands:
        for e, (i, j) in enumerate(HAND_EDGES):
            p, q = _drawable(hand[i]), _drawable(hand[j])
            if p is not None and q is not None:
                cv2.line(canvas, p, q, hand_edge_color(e), thickness=HAND_LINE_THICKNESS)
        for point in hand:
            p = _drawable(point)
            if p is not None:
                cv2.circle(canvas, p, HAND_RADIUS, HAND_POINT_COLOR, thickness=-1)
    return canvas


def draw_faces(canvas: np.ndarray, faces: Iterable[np.ndarray]) -> np.ndarray:
    """White dots of radius 3 for every face landmark, in place; returns the canvas."""
    for face in faces:
        for point in face:
            p = _drawable(point)
            if p is not None:
                cv2.circle(canvas, p, FACE_RADIUS, FACE_COLOR, thickness=-1)
    return canvas


def draw_pose(
    people: Sequence[Person], height: int, width: int, *, hands_and_face: bool = False
) -> np.ndarray:
    """The OpenPose guide image: bodies, then (optionally) hands, then faces, on black."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas = draw_bodies(canvas, people)
    if hands_and_face:
        draw_hands(canvas, [hand for person in people for hand in person.hands])
        draw_faces(canvas, [person.face for person in people if person.face is not None])
    return canvas
