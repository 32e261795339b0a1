"""ONNX Runtime sessions: created once per (process, model file), shared by threads.

``InferenceSession.run`` is thread-safe, so one session per model serves every
worker thread. The CUDA provider is used when onnxruntime-gpu sees a GPU,
otherwise the CPU provider with intra-op threads set from the CPU count.

Several images with the same settings can share forward passes: :func:`map_batched`
prepares each image's input, stacks inputs of identical shape and runs them through
:func:`run_batched` (up to :func:`batch_limit` per call, ``GUIDEFLOW_MAX_BATCH``) when the
graph's batch dim is dynamic, or one call per image when it is fixed at 1.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from engine.models.store import ModelSpec, ModelStore, default_store
from guideflow.errors import ModelCorrupt

log = logging.getLogger("guideflow.engine")

_sessions: dict[str, Any] = {}
_lock = threading.Lock()


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, else CPU.

    ``GUIDEFLOW_ORT_PROVIDERS`` (comma-separated) overrides the order.
    """
    import onnxruntime as ort

    wanted = os.environ.get("GUIDEFLOW_ORT_PROVIDERS")
    available = ort.get_available_providers()
    if wanted:
        return [p for p in wanted.split(",") if p in available] or ["CPUExecutionProvider"]
    order = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in available] or available


def intra_op_threads() -> int:
    env = os.environ.get("GUIDEFLOW_ORT_THREADS")
    if env:
        return max(1, int(env))
    return max(
        1,
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
    )


def load_session(path: Path) -> Any:
    """Load (or reuse) the session for a verified model file."""
    import onnxruntime as ort

    key = str(path.resolve())
    with _lock:
        sess = _sessions.get(key)
        if sess is not None:
            return sess
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers())
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelCorrupt(
                f"model file {path} could not be loaded by onnxruntime: {exc}", parameter="model"
            ) from exc
        _sessions[key] = sess
        return sess


def session_for(spec: ModelSpec, store: ModelStore | None = None) -> Any:
    """Resolve ``spec`` through the store (verifying its sha256) and return its shared session."""
    path = (store or default_store()).resolve(spec)
    return load_session(path)


def clear_sessions() -> None:
    """Drop every cached session (tests that swap model files)."""
    with _lock:
        _sessions.clear()


# -- batched forward passes ---------------------------------------------------------------------

#: Default for :func:`batch_limit` (``GUIDEFLOW_MAX_BATCH``).
DEFAULT_MAX_BATCH = 8

#: Sessions whose graph declared a dynamic batch dim but failed on a batch > 1 (a reshape that
#: hard-codes batch 1, say): they get one image per call from then on.
_batch_of_one: weakref.WeakSet[Any] = weakref.WeakSet()

T = TypeVar("T")
R = TypeVar("R")


def batch_limit() -> int:
    """Most images sent to a network in one ``run`` call: ``GUIDEFLOW_MAX_BATCH``, default 8.

    Bounds the memory of one forward pass (activations grow with the batch: a 513×513×151
    segmentation output is 159 MB per image) and the latency of the first image of a batch.
    On a GPU, larger batches fill the device better; on a few CPU cores the gain is small.
    """
    env = os.environ.get("GUIDEFLOW_MAX_BATCH")
    return max(1, int(env)) if env else DEFAULT_MAX_BATCH


def batch_dim_is_dynamic(session: Any, input_name: str | None = None) -> bool:
    """Whether the input's first (batch) dim is symbolic / unknown rather than a fixed int."""
    inputs = session.get_inputs()
    inp = next((i for i in inputs if i.name == input_name), inputs[0])
    shape = inp.shape
    return bool(shape) and not (isinstance(shape[0], int) and shape[0] > 0)


def run_batched(
    session: Any,
    input_name: str,
    batch: np.ndarray,
    *,
    max_batch: int | None = None,
    output_names: Sequence[str] | None = None,
) -> list[list[np.ndarray]]:
    """Run ``batch`` (``N×...``) through ``session``; per image, its outputs with batch dim 1.

    When the graph's batch dim is dynamic, chunks of up to ``max_batch`` images go through
    one ``session.run`` each; when it is a fixed int (1), or the graph turns out to fail on
    a batch > 1, one call per image. Either way the caller gets ``result[i][k]``: output
    ``k`` of image ``i``, shaped as for a batch of one. A float16 input is cast to float16.
    """
    inp = next(i for i in session.get_inputs() if i.name == input_name)
    if inp.type == "tensor(float16)":
        batch = batch.astype(np.float16)
    names = list(output_names) if output_names is not None else None
    limit = max(1, max_batch if max_batch is not None else batch_limit())
    if not batch_dim_is_dynamic(session, input_name) or session in _batch_of_one:
        limit = 1
    result: list[list[np.ndarray]] = []
    for start in range(0, batch.shape[0], limit):
        result.extend(_run_chunk(session, input_name, batch[start : start + limit], names))
    return result


def _run_chunk(
    session: Any, input_name: str, chunk: np.ndarray, names: list[str] | None
) -> list[list[np.ndarray]]:
    """One ``run`` for ``chunk``; split back per image (falls back to one call per image)."""
    n = chunk.shape[0]
    if n == 1:
        return [list(session.run(names, {input_name: chunk}))]
    try:
        outs = session.run(names, {input_name: chunk})
    except Exception:  # onnxruntime's own error types: the graph is batch-1 inside
        outs = None
    if outs is None or any(np.ndim(o) == 0 or np.shape(o)[0] != n for o in outs):
        where = getattr(session, "_model_path", "a model")
        log.warning(
            "%s declares a dynamic batch dim but fails on a batch of %d; "
            "running it one image at a time",
            where,
            n,
        )
        _batch_of_one.add(session)
        return [list(session.run(names, {input_name: chunk[i : i + 1]})) for i in range(n)]
    return [[o[i : i + 1] for o in outs] for i in range(n)]


def map_batched(
    session: Any,
    items: Sequence[T],
    prepare: Callable[[T], np.ndarray],
    finish: Callable[[T, np.ndarray, list[np.ndarray]], R],
    *,
    output_names: Sequence[str] | None = None,
    input_name: str | None = None,
) -> list[R]:
    """Preprocess each item, run same-shape inputs together, postprocess each: results in order.

    ``prepare(item)`` gives the item's network input with batch dim 1. Inputs of identical
    shape and dtype form a group (a model with an aspect-dependent input size can only
    stack equal sizes; nothing is padded, so every image sees exactly what it would alone);
    each group goes through :func:`run_batched` in chunks of :func:`batch_limit`, and
    ``finish(item, x, outputs)`` turns the item's outputs (batch dim 1) into its result
    before the next chunk runs, so only one chunk's outputs are held at a time.
    """
    name = input_name or session.get_inputs()[0].name
    xs = [prepare(item) for item in items]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, x in enumerate(xs):
        groups.setdefault((x.shape, x.dtype.str), []).append(index)
    limit = batch_limit()
    results: list[Any] = [None] * len(xs)
    for indices in groups.values():
        for start in range(0, len(indices), limit):
            chunk = indices[start : start + limit]
            batch = xs[chunk[0]] if len(chunk) == 1 else np.concatenate([xs[i] for i in chunk])
            outs = run_batched(
                session, name, batch, max_batch=len(chunk), output_names=output_names
            )
            for index, out in zip(chunk, outs, strict=True):
                results[index] = finish(items[index], xs[index], out)
    return results
