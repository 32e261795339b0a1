"""Build tiny ONNX graphs in tests, for models whose real weights are not reachable here.

A tiny graph with the real model's input and output names, dtypes and ranks lets the
real loading code (model store, sha256 check, onnxruntime session) and the real pre-
and post-processing run end to end; only the network in the middle is a stand-in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engine.models.store import ModelSpec


def value_info(name: str, dtype: type | np.dtype, shape: Sequence[int | str | None]):
    """A graph input/output declaration (``None``/str dims are dynamic)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return helper.make_tensor_value_info(name, elem, list(shape))


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name=name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
) -> bytes:
    """Serialise a checked ONNX model made of ``nodes``."""
    graph = helper.make_graph(list(nodes), "tiny", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def install(models_dir: Path, spec: ModelSpec, data: bytes) -> ModelSpec:
    """Write ``data`` where the store looks for ``spec`` and return the spec re-pinned to it.

    The returned spec keeps the real spec's name and file name but carries the tiny
    graph's sha256 and size, so the store's checksum verification really runs.
    """
    path = models_dir / spec.local_relpath()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    from dataclasses import replace

    return replace(spec, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
