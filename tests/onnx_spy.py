"""Record what the preprocessors really feed to onnxruntime (for tiny stand-in graphs).

``spy_feeds(monkeypatch)`` wraps :func:`engine.models.onnx.load_session` so every session
the engine obtains records the arrays passed to ``run``; the graph still runs normally.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.models import onnx as onnx_mod


class RecordingSession:
    """Delegates to a real InferenceSession and keeps a copy of every feed dict."""

    def __init__(self, session: Any, feeds: list[dict[str, np.ndarray]]) -> None:
        self._session = session
        self._feeds = feeds

    def get_inputs(self) -> Any:
        return self._session.get_inputs()

    def get_outputs(self) -> Any:
        return self._session.get_outputs()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self._feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self._session.run(names, feeds)


def spy_feeds(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[dict[str, np.ndarray]]]:
    """Patch session loading; the returned callable lists the feeds seen so far, in order."""
    feeds: list[dict[str, np.ndarray]] = []
    original = onnx_mod.load_session
    wrappers: dict[int, tuple[Any, RecordingSession]] = {}

    def load(path: Path) -> RecordingSession:
        # one wrapper per real (cached, shared) session, so the wrapper's identity is as
        # stable as the session's (the engine remembers per session which cannot batch)
        session = original(path)
        if id(session) not in wrappers:
            wrappers[id(session)] = (session, RecordingSession(session, feeds))
        return wrappers[id(session)][1]

    monkeypatch.setattr(onnx_mod, "load_session", load)
    return lambda: list(feeds)
