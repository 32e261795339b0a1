"""ONNX Runtime sessions: created once per (process, model file), shared by threads.

``InferenceSession.run`` is thread-safe, so one session per model serves every
worker thread. The CUDA provider is used when onnxruntime-gpu sees a GPU,
otherwise the CPU provider with intra-op threads set from the CPU count.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from engine.models.store import ModelSpec, ModelStore, default_store
from guideflow.errors import ModelCorrupt

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
