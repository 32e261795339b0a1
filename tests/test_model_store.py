"""The model store: resolution order, sha256 pinning, offline errors, atomic downloads, sessions."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.models import onnx as ort_sessions
from engine.models.store import ModelSpec, ModelStore
from guideflow.errors import ModelCorrupt, ModelUnavailable
from tests.onnx_graphs import make_model, value_info

PAYLOAD = b"pretend these are weights" * 100


def spec_for(data: bytes, **kw: object) -> ModelSpec:
    base = ModelSpec(
        name="toy",
        filename="toy.onnx",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        license="Apache-2.0",
        description="test model",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_resolves_from_models_dir_and_verifies(tmp_path: Path) -> None:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.onnx").write_bytes(PAYLOAD)
    store = ModelStore(tmp_path, allow_download=False)
    assert store.resolve(spec_for(PAYLOAD)) == tmp_path / "toy" / "toy.onnx"


def test_directory_field_lets_models_share_a_folder(tmp_path: Path) -> None:
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "toy.onnx").write_bytes(PAYLOAD)
    store = ModelStore(tmp_path, allow_download=False)
    assert store.resolve(spec_for(PAYLOAD, directory="family")).parent.name == "family"


def test_explicit_override_wins_over_models_dir(tmp_path: Path) -> None:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.onnx").write_bytes(b"stale and wrong")
    explicit = tmp_path / "elsewhere.onnx"
    explicit.write_bytes(PAYLOAD)
    store = ModelStore(tmp_path, overrides={"toy": explicit}, allow_download=False)
    assert store.resolve(spec_for(PAYLOAD)) == explicit


def test_env_var_sets_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUIDEFLOW_MODELS_DIR", str(tmp_path))
    assert ModelStore().models_dir == tmp_path


def test_hugging_face_cache_is_third(tmp_path: Path) -> None:
    """A real HF cache layout (refs + snapshots) is found through huggingface_hub itself."""
    revision = "a" * 40
    repo_dir = tmp_path / "hf" / "models--org--toy"
    snap = repo_dir / "snapshots" / revision / "onnx"
    snap.mkdir(parents=True)
    (snap / "model.onnx").write_bytes(PAYLOAD)
    spec = spec_for(PAYLOAD, repo_id="org/toy", revision=revision, repo_filename="onnx/model.onnx")
    store = ModelStore(tmp_path / "empty", cache_dir=tmp_path / "hf", allow_download=False)
    assert store.resolve(spec) == snap / "model.onnx"


def test_offline_and_missing_is_model_unavailable_with_the_fix(tmp_path: Path) -> None:
    spec = spec_for(PAYLOAD, repo_id="org/toy", revision="b" * 40)
    store = ModelStore(tmp_path, cache_dir=tmp_path / "hf", allow_download=False)
    with pytest.raises(ModelUnavailable) as info:
        store.resolve(spec)
    msg = info.value.message
    assert "toy.onnx" in msg
    assert str(tmp_path / "toy" / "toy.onnx") in msg
    assert "guideflow models pull toy" in msg
    assert "GUIDEFLOW_OFFLINE" in msg
    assert info.value.to_error_object()["code"] == "modelUnavailable"


def test_wrong_checksum_is_model_corrupt(tmp_path: Path) -> None:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.onnx").write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(ModelCorrupt) as info:
        ModelStore(tmp_path, allow_download=False).resolve(spec_for(PAYLOAD))
    assert "sha256" in info.value.message


def test_verification_is_cached_but_notices_a_changed_file(tmp_path: Path) -> None:
    (tmp_path / "toy").mkdir()
    path = tmp_path / "toy" / "toy.onnx"
    path.write_bytes(PAYLOAD)
    store = ModelStore(tmp_path, allow_download=False)
    spec = spec_for(PAYLOAD)
    store.resolve(spec)
    path.write_bytes(PAYLOAD + b"tampered")  # new size and mtime invalidate the cache entry
    with pytest.raises(ModelCorrupt):
        store.resolve(spec)


class _Handler(http.server.BaseHTTPRequestHandler):
    body: bytes = PAYLOAD
    truncate: bool = False

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.truncate:
            self.wfile.write(self.body[: len(self.body) // 2])
            self.wfile.flush()
            self.connection.close()
        else:
            self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/toy.onnx", handler
    server.shutdown()
    server.server_close()


def test_download_is_verified_and_moved_into_place(tmp_path: Path, http_server) -> None:
    url, _ = http_server
    store = ModelStore(tmp_path, allow_download=True)
    path = store.resolve(spec_for(PAYLOAD, url=url))
    assert path == tmp_path / "toy" / "toy.onnx"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.onnx"]


def test_download_with_wrong_checksum_leaves_nothing_behind(tmp_path: Path, http_server) -> None:
    url, handler = http_server
    handler.body = b"something else entirely"
    with pytest.raises(ModelCorrupt):
        ModelStore(tmp_path, allow_download=True).resolve(spec_for(PAYLOAD, url=url))
    assert list((tmp_path / "toy").iterdir()) == []


def test_interrupted_download_is_unavailable_and_leaves_no_partial(
    tmp_path: Path, http_server
) -> None:
    url, handler = http_server
    handler.truncate = True
    with pytest.raises(ModelUnavailable) as info:
        ModelStore(tmp_path, allow_download=True).resolve(spec_for(PAYLOAD, url=url))
    assert "could not download" in info.value.message
    assert list((tmp_path / "toy").iterdir()) == []


def _identity_model() -> bytes:
    from onnx import helper

    node = helper.make_node("Identity", ["x"], ["y"])
    return make_model(
        [node], [value_info("x", np.float32, [1, 3])], [value_info("y", np.float32, [1, 3])]
    )


def test_onnx_session_is_loaded_once_and_shared_by_threads(tmp_path: Path) -> None:
    data = _identity_model()
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.onnx").write_bytes(data)
    store = ModelStore(tmp_path, allow_download=False)
    spec = spec_for(data)
    ort_sessions.clear_sessions()
    first = ort_sessions.session_for(spec, store)
    assert ort_sessions.session_for(spec, store) is first

    def run(i: int) -> float:
        x = np.full((1, 3), float(i), dtype=np.float32)
        return float(ort_sessions.session_for(spec, store).run(None, {"x": x})[0].sum())

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, range(16))) == [3.0 * i for i in range(16)]
    assert "CPUExecutionProvider" in first.get_providers()


def test_unloadable_model_file_is_model_corrupt(tmp_path: Path) -> None:
    junk = b"not an onnx graph at all"
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.onnx").write_bytes(junk)
    ort_sessions.clear_sessions()
    with pytest.raises(ModelCorrupt) as info:
        ort_sessions.session_for(spec_for(junk), ModelStore(tmp_path, allow_download=False))
    assert "onnxruntime" in info.value.message


def test_unpinned_spec_accepts_a_user_placed_file_but_never_downloads(
    tmp_path: Path, http_server
) -> None:
    """Weights users must export themselves (no public pinned file) have no sha256 to check."""
    url, _ = http_server
    unpinned = spec_for(PAYLOAD, sha256="", url=url)
    store = ModelStore(tmp_path, allow_download=True)
    with pytest.raises(ModelUnavailable) as info:
        store.resolve(unpinned)
    assert "models pull" not in info.value.message  # nothing to pull: the fix is to place the file
    (tmp_path / "toy").mkdir(exist_ok=True)
    (tmp_path / "toy" / "toy.onnx").write_bytes(b"user exported weights")
    assert store.resolve(unpinned) == tmp_path / "toy" / "toy.onnx"
