"""Batched inference: milliseconds per image at batch sizes 1, 4 and 8 (CPU or GPU).

Usage::

    .venv/bin/python bench/batching.py [--size 512] [--batches 1 4 8] [--repeat 3] [--only pidinet]

For every model-based preprocessor whose real weights resolve (``$GUIDEFLOW_MODELS_DIR``,
default ``../shared/models``), a copy of its ONNX file with a *dynamic* batch dim is made
here with the ``onnx`` package (graph input/output dim 0 renamed to a symbol) and tried on
a batch of 2. Where that works, the preprocessor runs on the copy; where the graph hard-codes
batch 1 inside (a Reshape with a literal 1, typical of tf2onnx exports) the shipped file
is used and the engine falls back to one ``session.run`` per image, so its row shows what
batching costs there: nothing, and gains nothing.

Each cell is ``Preprocessor.process_batch`` on ``B`` real photos resized to ``S×S``
(pre-processing, forward pass(es), post-processing), divided by ``B``: one warm-up call,
then the median of ``--repeat`` calls, the batch sizes taking turns.
``GUIDEFLOW_MAX_BATCH`` is raised to the largest batch so each cell is a single forward
pass. Skips with a message when ``onnx`` is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_shared_models = REPO.parent / "shared" / "models"
if "GUIDEFLOW_MODELS_DIR" not in os.environ and _shared_models.is_dir():
    os.environ["GUIDEFLOW_MODELS_DIR"] = str(_shared_models)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from engine import imageio, registry  # noqa: E402
from engine.models.onnx import intra_op_threads, providers  # noqa: E402
from engine.models.store import ModelSpec, ModelStore  # noqa: E402
from engine.preprocessors import mlsd, seg, softedge  # noqa: E402
from engine.registry import ProcessContext  # noqa: E402
from guideflow.errors import GuideflowError  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One row: a preprocessor with settings, and the module-level spec it runs."""

    label: str
    preprocessor: str
    settings: dict[str, object]
    module: ModuleType
    attribute: str


CASES: tuple[Case, ...] = (
    Case("softedge / PiDiNet small", "softedge", {}, softedge, "PIDINET_SMALL"),
    Case("softedge / PiDiNet tiny", "softedge", {"pidinetModel": "tiny"}, softedge, "PIDINET_TINY"),
    Case("mlsd / M-LSD tiny", "mlsd", {}, mlsd, "MLSD_TINY"),
    Case("seg / DeepLabV3-MNv2", "seg", {}, seg, "DEEPLAB_ADE20K"),
)


def dynamic_copy(src: Path) -> bytes:
    """``src``'s graph with dim 0 of its inputs and outputs made symbolic."""
    import onnx

    model = onnx.load(str(src))
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    del model.graph.value_info[:]
    return model.SerializeToString()


def batches_really(data: bytes) -> bool:
    """Whether the graph runs a batch of 2 with outputs of batch 2."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=providers())
    inp = session.get_inputs()[0]
    shape = [2, *(d if isinstance(d, int) else 64 for d in inp.shape[1:])]
    dtype = np.uint8 if inp.type == "tensor(uint8)" else np.float32
    try:
        outs = session.run(None, {inp.name: np.zeros(shape, dtype)})
    except Exception:  # onnxruntime's own error types
        return False
    return all(np.ndim(o) and np.shape(o)[0] == 2 for o in outs)


def prepare_case(case: Case, store: ModelStore, tmp: Path) -> tuple[ModelStore, str] | None:
    """Point ``case`` at a dynamic-batch copy if one works; (store to use, batch-dim note)."""
    spec: ModelSpec = getattr(case.module, case.attribute)
    try:
        real = store.resolve(spec)
    except GuideflowError:
        return None
    data = dynamic_copy(real)
    if not batches_really(data):
        return store, "fixed (graph hard-codes 1)"
    path = tmp / spec.local_relpath()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    pinned = replace(spec, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    setattr(case.module, case.attribute, pinned)
    return ModelStore(tmp, allow_download=False), "dynamic (copy)"


def load_photos(size: int, count: int) -> list[np.ndarray]:
    folder = REPO.parent / "shared" / "testdata" / "images"
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise SystemExit(f"no photos in {folder}")
    photos = [imageio.decode_image(p.read_bytes()) for p in paths]
    photos = [cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in photos]
    return [photos[i % len(photos)] for i in range(count)]


def ms_per_image(
    case: Case, store: ModelStore, photos: Sequence[np.ndarray], batches: Sequence[int], repeat: int
) -> list[float]:
    """Median ms per image for each batch size; the sizes are interleaved call by call, so
    a change in machine load (other jobs on shared cores) hits every column alike."""
    proc = registry.get(case.preprocessor)
    params = proc.validate(case.settings)

    def once(batch: int) -> float:
        ctxs = [ProcessContext(seed=i, models=store) for i in range(batch)]
        start = time.perf_counter()
        proc.process_batch(list(photos[:batch]), params, ctxs)
        return (time.perf_counter() - start) * 1000 / batch

    for batch in batches:
        once(batch)  # warm-up: session load, first-touch allocations
    times: dict[int, list[float]] = {batch: [] for batch in batches}
    for _ in range(repeat):
        for batch in batches:
            times[batch].append(once(batch))
    return [statistics.median(times[batch]) for batch in batches]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="square image side")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeat", type=int, default=3, help="timed calls per cell (median)")
    p.add_argument("--only", default="", help="run rows whose label contains this text")
    args = p.parse_args(argv)
    try:
        import onnx  # noqa: F401
    except ImportError:
        print("skipped: the 'onnx' package is needed to make dynamic-batch copies")
        return 0
    os.environ["GUIDEFLOW_MAX_BATCH"] = str(max(args.batches))
    store = ModelStore(allow_download=False)
    photos = load_photos(args.size, max(args.batches))
    print(
        f"# {platform.machine()} {os.cpu_count()} CPUs, providers {providers()}, "
        f"intra-op threads {intra_op_threads()}, {args.size}², median of {args.repeat}\n"
    )
    head = ["preprocessor / model", "batch dim", *[f"B={b} ms/img" for b in args.batches]]
    head.append(f"B={max(args.batches)} vs B=1")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        for case in (c for c in CASES if args.only.lower() in c.label.lower()):
            prepared = prepare_case(case, store, Path(tmp))
            if prepared is None:
                print(f"| {case.label} | skipped: no weights |" + " |" * (len(head) - 2))
                continue
            case_store, note = prepared
            cells = ms_per_image(case, case_store, photos, args.batches, args.repeat)
            gain = cells[0] / cells[-1]
            row = [case.label, note, *[f"{c:.1f}" for c in cells], f"{gain:.2f}×"]
            print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
