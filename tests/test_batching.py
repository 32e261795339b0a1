"""Batched inference: several images with the same settings share ONNX forward passes.

What is checked, and with what:

* :func:`engine.models.onnx.map_batched` / ``process_batch`` with **tiny stand-in graphs**
  (a 3×3 convolution in place of Depth Anything V2, built with ``tests/onnx_graphs``):
  a dynamic-batch graph gets one ``session.run`` per input-shape group and gives exactly
  the arrays N ``process`` calls give; a graph fixed at batch 1 gets one call per image.
* **Real weights**: a dynamic-batch copy of the real PiDiNet-small (made here with the
  ``onnx`` package: graph input/output dim 0 renamed to a symbol) against per-image runs
  on real photos. M-LSD tiny, DeepLabV3 and MoveNet cannot be batched that way: their
  tf2onnx exports contain Reshape nodes that hard-code batch 1 (``Transpose__305`` in
  M-LSD, ``Transpose__337`` in DeepLabV3, a bias reshape in MoveNet); a dynamic copy of
  M-LSD is used to check that such a graph falls back to one image per call.
* :meth:`Engine.run_batch`: per-image errors, order, seeds and meta.
* The server (one POST, several same-settings tasks) and the pipeline's local backend.
"""

from __future__ import annotations

import base64
import io
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

from connectors.manifest import ManifestSpec
from engine import imageio, registry
from engine.api import Engine, GuideImage, PreparedRequest
from engine.models import onnx as onnx_mod
from engine.models.store import ModelStore
from engine.preprocessors import depth as depth_mod
from engine.preprocessors import mlsd as mlsd_mod
from engine.preprocessors import softedge as softedge_mod
from engine.registry import BatchedPreprocessor, ProcessContext, derive_seed
from guideflow.errors import GuideflowError, InvalidImage
from tasks.backends import LocalBackend
from tasks.work import RunConfig, WorkItem
from tests.conftest import IMAGES_DIR, thumbnails
from tests.live_server import run_server, test_config
from tests.onnx_graphs import const, install, make_model, value_info
from tests.onnx_spy import spy_feeds

# -- helpers ------------------------------------------------------------------------------------


def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A real photo as RGB uint8, optionally resized to ``size`` (w, h)."""
    rgb = imageio.decode_image((IMAGES_DIR / f"{name}.png").read_bytes())
    return rgb if size is None else cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def tiny_depth_graph(batch: int | str) -> bytes:
    """Stand-in for Depth Anything V2: ``pixel_values [B,3,H,W]`` → 3×3 conv → ``[B,H,W]``.

    ``batch`` is the declared batch dim: a symbol (dynamic) or 1 (fixed).
    """
    weights = np.random.default_rng(7).normal(size=(1, 3, 3, 3)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("Conv", ["pixel_values", "w"], ["conv"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Squeeze", ["conv", "axis1"], ["predicted_depth"]),
    ]
    return make_model(
        nodes,
        [value_info("pixel_values", np.float32, [batch, 3, "h", "w"])],
        [value_info("predicted_depth", np.float32, [batch, "h", "w"])],
        [const("w", weights), const("axis1", np.array([1], dtype=np.int64))],
    )


def dynamic_batch_copy(path: Path) -> bytes:
    """``path``'s graph with dim 0 of every graph input and output made symbolic ("batch")."""
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    del model.graph.value_info[:]  # inferred intermediate shapes still say batch 1
    return model.SerializeToString()


def contexts(store: ModelStore, n: int) -> list[ProcessContext]:
    return [ProcessContext(seed=i, models=store) for i in range(n)]


def batch_sizes(feeds: list[dict[str, np.ndarray]]) -> list[int]:
    """Batch size of every ``session.run`` seen, in call order."""
    return [next(iter(f.values())).shape[0] for f in feeds]


class CountingEngine(Engine):
    """The real engine, recording (preprocessor, number of images) of every run_batch call."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def run_batch(
        self,
        req: PreparedRequest,
        images: Sequence[bytes | np.ndarray],
        task_uuids: Sequence[str | None] | None = None,
    ) -> list[GuideImage | Exception]:
        with self._lock:
            self.calls.append((req.preprocessor.name, len(images)))
        return super().run_batch(req, images, task_uuids)


@pytest.fixture()
def tiny_store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models", allow_download=False)


@pytest.fixture(scope="module")
def real_store(models_dir: Path) -> ModelStore:
    return ModelStore(models_dir, allow_download=False)


# Same aspect ratio (3:2) at two sizes and from two photos → one Depth Anything input size;
# a square image → another. So: two shape groups, of 3 and 1 images.
MIXED = [("room", (300, 200)), ("building", (256, 256)), ("room", (600, 400)), ("man", (300, 200))]


# -- tiny stand-in graphs -----------------------------------------------------------------------


def test_dynamic_batch_graph_runs_once_per_shape_group(
    tiny_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny dynamic-batch stand-in for Depth Anything V2: 4 images of 2 network-input sizes
    → exactly 2 ``session.run`` calls (batches of 3 and 1), and every output (array and
    meta) is bit-identical to what ``process`` gives for that image alone."""
    spec = install(tiny_store.models_dir, depth_mod.DEPTH_ANYTHING_V2, tiny_depth_graph("B"))
    monkeypatch.setattr(depth_mod, "DEPTH_ANYTHING_V2", spec)
    feeds = spy_feeds(monkeypatch)
    images = [photo(name, size) for name, size in MIXED]
    proc = registry.get("depth")
    params = proc.validate({})

    ctxs = contexts(tiny_store, len(images))
    batched = proc.process_batch(images, params, ctxs)
    assert sorted(batch_sizes(feeds())) == [1, 3]

    for image, out, ctx in zip(images, batched, ctxs, strict=True):
        alone = ProcessContext(seed=0, models=tiny_store)
        expected = proc.process(image, params, alone)
        assert out.shape == (*image.shape[:2], 3)
        np.testing.assert_array_equal(out, expected)
        assert ctx.meta == alone.meta
    assert len(feeds()) == 2 + len(images)  # the single runs: one call each
    # The groups really differ in input size (else the test would prove nothing).
    assert ctxs[0].meta["depthDetectSize"] == ctxs[2].meta["depthDetectSize"]
    assert ctxs[0].meta["depthDetectSize"] != ctxs[1].meta["depthDetectSize"]


def test_batch_limit_splits_a_group(
    tiny_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GUIDEFLOW_MAX_BATCH=2``: a group of 3 same-size images → runs of 2 and 1."""
    spec = install(tiny_store.models_dir, depth_mod.DEPTH_ANYTHING_V2, tiny_depth_graph("B"))
    monkeypatch.setattr(depth_mod, "DEPTH_ANYTHING_V2", spec)
    monkeypatch.setenv("GUIDEFLOW_MAX_BATCH", "2")
    feeds = spy_feeds(monkeypatch)
    images = [photo(name, (300, 200)) for name in ("room", "man", "human")]
    proc = registry.get("depth")
    outs = proc.process_batch(images, proc.validate({}), contexts(tiny_store, 3))
    assert batch_sizes(feeds()) == [2, 1]
    assert len(outs) == 3 and not np.array_equal(outs[0], outs[1])


def test_fixed_batch_graph_falls_back_to_one_call_per_image(
    tiny_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny stand-in declared with batch dim 1: every image is its own ``session.run``, and
    the results are the same as with the dynamic-batch graph run batched."""
    images = [photo(name, size) for name, size in MIXED]
    proc = registry.get("depth")
    params = proc.validate({})
    results = {}
    for batch in ("B", 1):
        store = ModelStore(tiny_store.models_dir / str(batch), allow_download=False)
        spec = install(store.models_dir, depth_mod.DEPTH_ANYTHING_V2, tiny_depth_graph(batch))
        monkeypatch.setattr(depth_mod, "DEPTH_ANYTHING_V2", spec)
        feeds = spy_feeds(monkeypatch)
        results[batch] = proc.process_batch(images, params, contexts(store, len(images)))
        if batch == 1:
            assert batch_sizes(feeds()) == [1, 1, 1, 1]
    for a, b in zip(results["B"], results[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_run_batched_splits_outputs_per_image(tiny_store: ModelStore) -> None:
    """``run_batched`` returns, per image, its outputs with batch dim 1, in order."""
    spec = install(tiny_store.models_dir, depth_mod.DEPTH_ANYTHING_V2, tiny_depth_graph("B"))
    session = onnx_mod.session_for(spec, tiny_store)
    x = np.random.default_rng(1).normal(size=(5, 3, 8, 6)).astype(np.float32)
    outs = onnx_mod.run_batched(session, "pixel_values", x, max_batch=2)
    assert len(outs) == 5
    for i, (out,) in enumerate(outs):
        (alone,) = session.run(None, {"pixel_values": x[i : i + 1]})
        assert out.shape == (1, 8, 6)
        np.testing.assert_array_equal(out, alone)


# -- real weights -------------------------------------------------------------------------------


def test_real_pidinet_dynamic_copy_batches_like_single_runs(
    real_store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real PiDiNet-small, made dynamic-batch, on real photos: batched == one by one.

    Three photos of different sizes (564×848, 564×846, 563×855) share a detect size
    (512×768) and room.png (564×752 → 512×704) has its own, so the network runs twice,
    with batches of 3 and 1. Tolerance: at most one
    grey level, since onnxruntime may block a convolution differently for a batch and
    move a float sum across a rounding edge; measured on this machine: identical.
    """
    real = real_store.resolve(softedge_mod.PIDINET_SMALL)
    store = ModelStore(tmp_path, allow_download=False)
    spec = install(tmp_path, softedge_mod.PIDINET_SMALL, dynamic_batch_copy(real))
    monkeypatch.setattr(softedge_mod, "PIDINET_SMALL", spec)
    images = [photo("building"), photo("room"), photo("man"), photo("pose1")]
    proc = registry.get("softedge")
    params = proc.validate({})

    feeds = spy_feeds(monkeypatch)
    batched = proc.process_batch(images, params, contexts(store, len(images)))
    assert sorted(batch_sizes(feeds())) == [1, 3]
    for image, out in zip(images, batched, strict=True):
        alone = proc.process(image, params, ProcessContext(seed=0, models=store))
        diff = np.abs(out.astype(np.int16) - alone.astype(np.int16))
        assert diff.max() <= 1
        assert (diff == 0).mean() > 0.999
        assert out[..., 0].mean() > 10  # real edges, not an empty map


def test_graph_that_hardcodes_batch_one_falls_back(
    real_store: ModelStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real M-LSD tiny with its batch dim declared dynamic: its internal Reshape nodes still
    assume batch 1, so the batched call fails; the batch is re-run one image per call (and
    the session remembered as batch-1), giving the same lines as single runs."""
    real = real_store.resolve(mlsd_mod.MLSD_TINY)
    store = ModelStore(tmp_path, allow_download=False)
    spec = install(tmp_path, mlsd_mod.MLSD_TINY, dynamic_batch_copy(real))
    monkeypatch.setattr(mlsd_mod, "MLSD_TINY", spec)
    images = [photo("room", (256, 384)), photo("building", (256, 384))]
    proc = registry.get("mlsd")
    params = proc.validate({})

    feeds = spy_feeds(monkeypatch)
    batched = proc.process_batch(images, params, contexts(store, 2))
    assert batch_sizes(feeds()) == [2, 1, 1]  # the failed batch, then one by one
    assert "fails on a batch of 2" in caplog.text
    proc.process_batch(images, params, contexts(store, 2))
    assert batch_sizes(feeds())[3:] == [1, 1]  # no second attempt
    for image, out in zip(images, batched, strict=True):
        alone = proc.process(image, params, ProcessContext(seed=0, models=store))
        np.testing.assert_array_equal(out, alone)
        assert (out > 0).mean() > 0.005  # it did find lines


# -- Engine.run_batch ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_photos() -> list[bytes]:
    names = ("room", "building", "human")
    return list(thumbnails(names, 192).values())


def test_run_batch_keeps_errors_per_image_and_order(
    real_store: ModelStore, small_photos: list[bytes]
) -> None:
    """A corrupt image in the middle gets its own invalidImage error; the others give the
    same bytes as single runs, in the order given."""
    engine = Engine(models=real_store)
    req = engine.prepare("softedge", {"pidinetModel": "tiny"}, output_format="PNG")
    images = [small_photos[0], b"\x89PNG\r\n\x1a\nnot really", small_photos[1], small_photos[2]]
    uuids = [str(uuid.uuid4()) for _ in images]
    results = engine.run_batch(req, images, uuids)
    assert len(results) == 4
    assert isinstance(results[1], GuideflowError) and results[1].code == "invalidImage"
    for index in (0, 2, 3):
        got = results[index]
        assert isinstance(got, GuideImage)
        assert got.data == engine.run(req, images[index], task_uuid=uuids[index]).data
        assert got.meta["model"] == "pidinet_tiny"
    assert results[0].data != results[2].data  # different photos, in their places


@pytest.mark.parametrize("name", ["shuffle", "tile"])
def test_run_batch_seeds_each_image_from_its_task(name: str, small_photos: list[bytes]) -> None:
    """Randomised preprocessors: each image of a batch is seeded from its own task UUID,
    exactly as in a single run; the same photo under three UUIDs gives three pictures."""
    engine = Engine()
    req = engine.prepare(name, {}, output_format="PNG")
    uuids = [str(uuid.uuid4()) for _ in range(3)]
    results = engine.run_batch(req, [small_photos[0]] * 3, uuids)
    for got, task_uuid in zip(results, uuids, strict=True):
        assert isinstance(got, GuideImage)
        assert got.meta["seed"] == derive_seed(task_uuid, None)
        assert got.data == engine.run(req, small_photos[0], task_uuid=task_uuid).data
    assert len({r.data for r in results if isinstance(r, GuideImage)}) == 3


class _FailsOnBlack(BatchedPreprocessor):
    """A test-only batched preprocessor: a batch containing a black image raises."""

    name = "canny"  # any registered name; this instance is never registered
    summary = "test"

    def process_batch(
        self, images: Sequence[np.ndarray], params: Any, ctxs: Sequence[ProcessContext]
    ) -> list[np.ndarray]:
        if any(int(image.max()) == 0 for image in images):
            raise InvalidImage("black image", parameter="inputImage")
        for ctx in ctxs:
            ctx.meta["batch"] = len(images)
        return [255 - image for image in images]


def test_run_batch_reruns_one_by_one_when_the_batch_raises() -> None:
    """If ``process_batch`` raises, each image is re-run alone: only the culprit fails."""
    engine = Engine()
    proc = _FailsOnBlack()
    req = PreparedRequest(proc, proc.validate({}), None, None, "PNG", 95)
    grey = np.full((8, 8, 3), 100, np.uint8)
    black = np.zeros((8, 8, 3), np.uint8)
    results = engine.run_batch(req, [grey, black, grey])
    assert isinstance(results[1], InvalidImage)
    for got in (results[0], results[2]):
        assert isinstance(got, GuideImage)
        assert (got.array == 155).all() and got.meta == {"batch": 1}


# -- server -------------------------------------------------------------------------------------


def _task(image: bytes, preprocessor: str = "softedge", **settings: Any) -> dict[str, Any]:
    task = {
        "taskType": "imageControlNetPreProcess",
        "taskUUID": str(uuid.uuid4()),
        "preProcessorType": preprocessor,
        "inputImage": base64.b64encode(image).decode(),
        "outputType": "base64Data",
        "outputFormat": "PNG",
    }
    return {**task, "settings": settings} if settings else task


def test_server_runs_same_settings_tasks_of_a_post_as_one_batch(
    small_photos: list[bytes],
) -> None:
    """One POST: 3 softedge tasks + a corrupt softedge task (same settings) + a canny task.

    The four softedge tasks go through one ``run_batch`` call; canny runs alone. Every
    answer (guide bytes, the corrupt task's error) is what separate POSTs give.
    """
    engine = CountingEngine()
    corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    inputs = [*small_photos, corrupt]
    with run_server(test_config(engine=engine)) as base:
        tasks = [_task(image, pidinetModel="tiny") for image in inputs]
        tasks.append(_task(small_photos[0], "canny"))
        together = httpx.post(f"{base}/v1", json=tasks, timeout=60).json()
        assert sorted(engine.calls) == [("canny", 1), ("softedge", 4)]

        engine.calls.clear()
        separate = [
            httpx.post(f"{base}/v1", json=[{**task, "taskUUID": str(uuid.uuid4())}]).json()
            for task in tasks
        ]
        assert sorted(engine.calls) == [("canny", 1)] + [("softedge", 1)] * 4

    data = {item["taskUUID"]: item for item in together["data"]}
    assert len(data) == 4 and len(together["errors"]) == 1
    for task, alone in zip(tasks, separate, strict=True):
        if task["inputImage"] == base64.b64encode(corrupt).decode():
            (error,) = [e for e in together["errors"] if e["taskUUID"] == task["taskUUID"]]
            fields = ("code", "parameter", "taskType")  # the message names a BytesIO address
            assert [error[k] for k in fields] == [alone["errors"][0][k] for k in fields]
            assert error["code"] == "invalidImage" and error["parameter"] == "inputImage"
            continue
        got = data[task["taskUUID"]]["guideImageBase64Data"]
        assert got == alone["data"][0]["guideImageBase64Data"]
        assert (
            Image.open(io.BytesIO(base64.b64decode(got))).size
            == Image.open(io.BytesIO(task_image(task))).size
        )


def task_image(task: dict[str, Any]) -> bytes:
    return base64.b64decode(task["inputImage"])


# -- pipeline, local backend --------------------------------------------------------------------


def _items(tmp_path: Path, photos: dict[str, bytes], preprocessor: str) -> list[WorkItem]:
    items = []
    for row, (name, data) in enumerate(photos.items()):
        src = tmp_path / f"{name}.png"
        src.write_bytes(data)
        items.append(
            WorkItem(
                shard=0,
                row=row,
                image_id=name,
                input_uri=str(src),
                preprocessor=preprocessor,
                settings={"pidinetModel": "tiny"} if preprocessor == "softedge" else {},
                width=None,
                height=None,
                output_format="PNG",
                output_quality=95,
                settings_hash="h",
                task_uuid=str(uuid.uuid4()),
                output_uri=str(tmp_path / "out" / f"{preprocessor}-{name}.png"),
            )
        )
    return items


@pytest.mark.parametrize(("max_batch", "expected"), [(8, [3]), (2, [2, 1])])
async def test_local_backend_batches_same_settings_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_batch: int, expected: list[int]
) -> None:
    """Local backend: three images' softedge items run as ``run_batch`` calls of at most
    ``GUIDEFLOW_MAX_BATCH``; canny items (not batched) one by one; every written guide
    equals a single engine run."""
    monkeypatch.setenv("GUIDEFLOW_MAX_BATCH", str(max_batch))
    photos = thumbnails(("room", "building", "human"), 160)
    items = _items(tmp_path, photos, "softedge") + _items(tmp_path, photos, "canny")
    engine = CountingEngine()
    config = RunConfig(
        manifest=ManifestSpec(url=str(tmp_path / "m.csv")),
        preprocessors=("softedge", "canny"),
        output=str(tmp_path / "out"),
        ledger=str(tmp_path / "ledger"),
    )
    backend = LocalBackend(config, engine=engine)
    try:
        outcomes = await backend.run(items)
    finally:
        await backend.aclose()
    assert [o.status for o in outcomes] == ["success"] * len(items)
    assert [o.item for o in outcomes] == items
    assert sorted(n for p, n in engine.calls if p == "softedge") == sorted(expected)
    assert [n for p, n in engine.calls if p == "canny"] == [1, 1, 1]
    assert_written_as_single_runs(engine, items, photos)


def assert_written_as_single_runs(
    engine: Engine, items: list[WorkItem], photos: dict[str, bytes]
) -> None:
    for item in items:
        req = engine.prepare(item.preprocessor, item.settings, output_format="PNG")
        alone = engine.run(req, photos[item.image_id], task_uuid=item.task_uuid)
        assert Path(item.output_uri).read_bytes() == alone.data


async def test_local_backend_bad_input_fails_only_its_items(tmp_path: Path) -> None:
    """An unreadable input fails its own items; the batch of the others still succeeds."""
    photos = thumbnails(("room", "building"), 128)
    photos["broken"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    items = _items(tmp_path, photos, "softedge")
    engine = CountingEngine()
    config = RunConfig(
        manifest=ManifestSpec(url=str(tmp_path / "m.csv")),
        preprocessors=("softedge",),
        output=str(tmp_path / "out"),
        ledger=str(tmp_path / "ledger"),
    )
    backend = LocalBackend(config, engine=engine)
    try:
        outcomes = await backend.run(items)
    finally:
        await backend.aclose()
    assert [o.status for o in outcomes] == ["success", "success", "error"]
    assert outcomes[2].error is not None and outcomes[2].error.code == "invalidImage"
    assert engine.calls == [("softedge", 2)]


def test_prepared_batch_key_and_batches() -> None:
    """Same validated request → same key; any difference (settings, size, format) → not."""
    engine = Engine()
    a = engine.prepare("softedge", {"pidinetModel": "tiny"}, width=256, output_format="PNG")
    b = engine.prepare("softedge", {"pidinetModel": "tiny"}, width=256, output_format="PNG")
    assert a.batch_key == b.batch_key and a.batches
    for other in (
        engine.prepare("softedge", {}, width=256, output_format="PNG"),
        engine.prepare("softedge", {"pidinetModel": "tiny"}, width=128, output_format="PNG"),
        engine.prepare("softedge", {"pidinetModel": "tiny"}, width=256, output_format="JPG"),
    ):
        assert other.batch_key != a.batch_key
    assert not engine.prepare("canny").batches
    assert not engine.prepare("scribble", {"variant": "xdog"}).batches
    assert not engine.prepare("lineart", {"variant": "standard"}).batches
    assert engine.prepare("lineart").batches
