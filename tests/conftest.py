"""Shared fixtures: the real photos and real weights in ../shared (test data only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3", "tests.prefect_harness"]

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GUIDEFLOW_SHARED", REPO.parent / "shared"))
IMAGES_DIR = SHARED / "testdata" / "images"
MODELS_DIR = SHARED / "models"

# Tests never download: the model store is pointed at ../shared/models and kept offline.
os.environ.setdefault("GUIDEFLOW_MODELS_DIR", str(MODELS_DIR))
os.environ.setdefault("GUIDEFLOW_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def photo_paths() -> list[Path]:
    """Every real photo in ../shared/testdata/images (sorted, for stable test ids)."""
    return sorted(IMAGES_DIR.glob("*.png"))


@pytest.fixture(scope="session")
def images_dir() -> Path:
    if not IMAGES_DIR.is_dir():
        pytest.fail(f"test photos missing: {IMAGES_DIR} (set GUIDEFLOW_SHARED)")
    return IMAGES_DIR


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not MODELS_DIR.is_dir():
        pytest.fail(f"test weights missing: {MODELS_DIR} (set GUIDEFLOW_SHARED)")
    return MODELS_DIR


@pytest.fixture()
def photo_bytes(images_dir: Path):
    """Return the raw bytes of one named photo, e.g. photo_bytes('room.png')."""

    def _read(name: str) -> bytes:
        return (images_dir / name).read_bytes()

    return _read


def thumbnails(names: list[str] | tuple[str, ...], max_side: int) -> dict[str, bytes]:
    """Real photos (``<name>.png`` in ../shared) as PNG bytes downscaled to ``max_side``.

    RGBA is kept, like the originals, so the pipeline's alpha handling still runs.
    """
    import io

    from PIL import Image

    out = {}
    for name in names:
        with Image.open(IMAGES_DIR / f"{name}.png") as im:
            im.load()
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "PNG")
        out[name] = buf.getvalue()
    return out
