"""Benchmark every registered preprocessor, variant by variant, on real photos.

Usage::

    .venv/bin/python bench/engine.py [--repeat 5] [--sizes 512 1024] [--only canny,shuffle]
                                     [--images DIR] [--max-photos 3] [--allow-download]

For each preprocessor and each of its variants whose model weights resolve
(otherwise the row says ``skipped: no weights``) it times:

* ``Preprocessor.process`` on the photos resized to exactly ``S×S`` for every
  ``--sizes`` value: one warm-up call (model load, first-touch allocations),
  then ``--repeat`` calls per photo; the table shows the median of those calls;
* the full engine path at ``--engine-size`` (default 512): PNG bytes in,
  decode + process + PNG encode out, timed the same way.

Where ControlNet 1.1 / controlnet_aux / sd-webui-controlnet has a weight-free
reference (canny, shuffle, lineart_standard, tile_gaussian), that code (re-typed
below, numpy + OpenCV) is timed *interleaved* with ours, call for call on the
same inputs, so the "cn" columns compare the two under identical machine load.
controlnet_aux 0.0.10 timings taken on the development machine are printed too
("ref"). The run ends with the process's peak RSS.

Photos come from ``--images`` (default ``../shared/testdata/images`` next to the
repository); weights from ``$GUIDEFLOW_MODELS_DIR`` (default
``../shared/models`` when it exists). Nothing is downloaded unless
``--allow-download`` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_shared_models = REPO.parent / "shared" / "models"
if "GUIDEFLOW_MODELS_DIR" not in os.environ and _shared_models.is_dir():
    os.environ["GUIDEFLOW_MODELS_DIR"] = str(_shared_models)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from engine import imageio, registry  # noqa: E402
from engine.api import Engine  # noqa: E402
from engine.models.store import ModelStore  # noqa: E402
from engine.preprocessors._common import resize  # noqa: E402
from engine.registry import ProcessContext  # noqa: E402
from guideflow.errors import GuideflowError, ModelCorrupt, ModelUnavailable  # noqa: E402

Call = Callable[[np.ndarray], object]

# --- the reference code (ControlNet 1.1 / controlnet_aux, as they write it) -------------------


def cn_canny(img: np.ndarray) -> np.ndarray:
    """ControlNet 1.1's canny: ``cv2.Canny`` then HWC3's concatenate."""
    edges = cv2.Canny(img, 100, 200)[:, :, None]
    return np.concatenate([edges, edges, edges], axis=2)


def _cn_noise_disk(h: int, w: int, f: int) -> np.ndarray:
    noise = np.random.uniform(0, 1, size=(h // f + 2, w // f + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f : f + h, f : f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


def cn_shuffle(img: np.ndarray) -> np.ndarray:
    """ControlNet 1.1's ContentShuffleDetector (float64 noise, global RNG, f=256)."""
    h, w = img.shape[:2]
    x = _cn_noise_disk(h, w, 256) * float(w - 1)
    y = _cn_noise_disk(h, w, 256) * float(h - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


def cn_lineart_standard(img: np.ndarray) -> np.ndarray:
    """controlnet_aux's LineartStandardDetector core."""
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


def cn_tile_gaussian(img: np.ndarray) -> np.ndarray:
    """sd-webui-controlnet's tile_gaussian (3 levels, sigma 16, float64 global-RNG noise)."""
    y = img.astype(np.float32)
    for _ in range(3):
        y += np.random.normal(loc=0.0, scale=16.0, size=y.shape)
        y = cv2.pyrDown(y)
    for _ in range(3):
        y = cv2.pyrUp(y)
        y += np.random.normal(loc=0.0, scale=16.0, size=y.shape)
    return y.clip(0, 255).astype(np.uint8)


#: (preprocessor, variant) → reference code timed interleaved with ours.
INTERLEAVED_REFERENCES: dict[tuple[str, str], Call] = {
    ("canny", "default"): cn_canny,
    ("shuffle", "default"): cn_shuffle,
    ("lineart", "standard"): cn_lineart_standard,
    ("tile", "default"): cn_tile_gaussian,
}

#: controlnet_aux 0.0.10, median ms on the development machine: {(name, variant): {size: ms}}.
REFERENCE_MS: dict[tuple[str, str], dict[int, float]] = {
    ("canny", "default"): {512: 7.1, 1024: 28.9},
    ("shuffle", "default"): {512: 8.3, 1024: 39.0},
    ("lineart", "standard"): {512: 26.0},
}


# --- timing ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    name: str
    variant: str
    model: str
    ms: dict[int, float] = field(default_factory=dict)
    cn_ms: dict[int, float] = field(default_factory=dict)
    engine_ms: float | None = None
    note: str = ""


def _elapsed_ms(fn: Call, item: np.ndarray) -> float:
    start = time.perf_counter()
    fn(item)
    return (time.perf_counter() - start) * 1000.0


def median_ms(fns: Sequence[Call], items: Sequence, repeat: int) -> list[float]:
    """Median ms per call of each of ``fns`` over ``repeat`` passes through ``items``.

    Each function is warmed up once first. When several functions are given,
    their calls alternate (a, b, a, b, ...) so they share the same machine load.
    """
    for fn in fns:
        fn(items[0])
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for item in items:
            for i, fn in enumerate(fns):
                times[i].append(_elapsed_ms(fn, item))
    return [statistics.median(t) for t in times]


def model_names(proc: registry.Preprocessor, variant: str) -> str:
    specs = proc.models(variant)
    return ", ".join(s.name for s in specs) if specs else "-"


def bench_variant(
    proc: registry.Preprocessor,
    variant: str,
    squares: dict[int, list[np.ndarray]],
    pngs: list[bytes],
    store: ModelStore,
    repeat: int,
) -> Row:
    """Time one variant at every size and through the engine; never raises."""
    row = Row(proc.name, variant, model_names(proc, variant))
    reference = INTERLEAVED_REFERENCES.get((proc.name, variant))
    try:
        for spec in proc.models(variant):
            store.resolve(spec)
        params = proc.validate({"variant": variant})
        ctx = ProcessContext(seed=0, models=store)

        def ours(img: np.ndarray) -> np.ndarray:
            return proc.process(img, params, ctx)

        for size, images in squares.items():
            if reference is None:
                (row.ms[size],) = median_ms([ours], images, repeat)
            else:
                row.ms[size], row.cn_ms[size] = median_ms([ours, reference], images, repeat)
        engine = Engine(models=store)
        settings = {"variant": variant}
        (row.engine_ms,) = median_ms(
            [lambda data: engine.preprocess(data, proc.name, settings, output_format="PNG")],
            pngs,
            repeat,
        )
    except (ModelUnavailable, ModelCorrupt):
        row.note = "skipped: no weights"
    except GuideflowError as exc:
        row.note = f"error: {exc}"
    except Exception as exc:  # a bench reports a broken preprocessor instead of stopping
        row.note = f"error: {type(exc).__name__}: {exc}"
    return row


# --- output ------------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(rows: list[Row], sizes: list[int], engine_size: int) -> None:
    headers = ["preprocessor", "variant", "model"]
    headers += [f"ms@{s}" for s in sizes] + [f"engine ms@{engine_size}"]
    headers += [f"cn ms@{s}" for s in sizes] + [f"ref ms@{s}" for s in sizes] + ["note"]
    table = []
    for r in rows:
        ref = REFERENCE_MS.get((r.name, r.variant), {})
        table.append(
            [r.name, r.variant, r.model]
            + [fmt(r.ms.get(s)) for s in sizes]
            + [fmt(r.engine_ms)]
            + [fmt(r.cn_ms.get(s)) for s in sizes]
            + [fmt(ref.get(s)) for s in sizes]
            + [r.note]
        )
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(headers)]
    numeric = {i for i, h in enumerate(headers) if "ms@" in h}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for cells in table:
        print(line(cells))


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="timed calls per photo (after 1 warm-up)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square sizes")
    p.add_argument("--engine-size", type=int, default=512, help="size for the engine-path timing")
    p.add_argument("--only", default="", help="comma-separated preprocessor names")
    p.add_argument(
        "--images",
        type=Path,
        default=REPO.parent / "shared" / "testdata" / "images",
        help="folder of photos (PNG/JPEG/WEBP)",
    )
    p.add_argument(
        "--max-photos", type=int, default=3, help="use the first N photos (0 = all of them)"
    )
    p.add_argument("--allow-download", action="store_true", help="let the model store download")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def load_photos(folder: Path, limit: int) -> list[np.ndarray]:
    """Decode the photos in ``folder`` exactly as the engine does (RGB, alpha over white)."""
    paths = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    )
    if limit > 0:
        paths = paths[:limit]
    if not paths:
        raise SystemExit(f"no photos in {folder} (use --images)")
    return [imageio.decode_image(p.read_bytes()) for p in paths]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    store = ModelStore(allow_download=bool(args.allow_download))
    photos = load_photos(args.images, args.max_photos)
    sizes = list(dict.fromkeys(args.sizes))
    squares = {s: [resize(rgb, s, s) for rgb in photos] for s in sizes}
    engine_inputs = [resize(rgb, args.engine_size, args.engine_size) for rgb in photos]
    pngs = [imageio.encode_image(img, "PNG") for img in engine_inputs]

    wanted = {registry.canonical_name(n) for n in args.only.split(",") if n.strip()}
    procs = [p for n, p in registry.available().items() if not wanted or n in wanted]
    rows: list[Row] = []
    for proc in sorted(procs, key=lambda p: registry.PREPROCESSOR_NAMES.index(p.name)):
        for variant in proc.variants:
            rows.append(bench_variant(proc, variant, squares, pngs, store, args.repeat))
            print(f"  done {proc.name}/{variant}", file=sys.stderr, flush=True)

    print(
        f"\nguideflow engine benchmark: {len(photos)} photo(s) from {args.images}, "
        f"median of {args.repeat}×{len(photos)} calls after 1 warm-up"
    )
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, opencv {cv2.__version__}, "
        f"{os.cpu_count()} CPU(s), cv2 threads {cv2.getNumThreads()}, "
        f"models {os.environ.get('GUIDEFLOW_MODELS_DIR', '(none)')}\n"
    )
    print_table(rows, sizes, args.engine_size)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"\npeak RSS: {peak_kib / 1024:.0f} MiB")
    print(
        "cn = ControlNet 1.1 / controlnet_aux code, timed interleaved with ours in this run; "
        "ref = controlnet_aux 0.0.10 on the development machine (process only, no I/O)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
