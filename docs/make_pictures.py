"""Regenerate the README's before/after pictures: ``python docs/make_pictures.py``.

For every preprocessor, with its default variant or else the first variant whose
weights resolve, run the real engine on a real photo and save ``docs/<name>.png``:
the input on the left, the guide image on the right, both 320 px high. Preprocessors
with no weights at all are listed and skipped, so the pictures always show real
output, never a placeholder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "testdata" / "images"
PHOTO_FOR = {"openpose": "human.png", "mlsd": "room.png", "seg": "room.png", "shuffle": "bird.png"}
HEIGHT = 320


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    if "GUIDEFLOW_MODELS_DIR" not in os.environ and (REPO.parent / "shared" / "models").is_dir():
        os.environ["GUIDEFLOW_MODELS_DIR"] = str(REPO.parent / "shared" / "models")

    from engine import Engine, imageio, registry
    from guideflow.errors import GuideflowError

    engine = Engine()
    for name in registry.PREPROCESSOR_NAMES:
        photo = args.images / PHOTO_FOR.get(name, "room.png")
        data = photo.read_bytes()
        source = imageio.decode_image(data)
        guide = None
        for variant in registry.get(name).variants:  # the default first, then the others
            try:
                guide = engine.preprocess(
                    data, name, {"variant": variant}, output_format="PNG", task_uuid=f"docs-{name}"
                )
                break
            except GuideflowError as exc:
                print(f"{name:14s} {variant:18s} skipped: {exc.code}")
        if guide is None:
            continue
        width = round(source.shape[1] * HEIGHT / source.shape[0])
        left = imageio.resize_to(source, (width, HEIGHT))
        right = imageio.resize_to(guide.array, (width, HEIGHT))
        gap = np.full((HEIGHT, 8, 3), 255, np.uint8)
        sheet = np.concatenate([left, gap, right], axis=1)
        target = args.out / f"{name}.png"
        target.write_bytes(imageio.encode_image(sheet, "PNG"))
        print(f"{name:14s} {guide.variant:18s} -> {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
