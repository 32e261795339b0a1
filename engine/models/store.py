"""The model store: find pinned model weights, verify them, never leave a partial file.

Resolution order for a :class:`ModelSpec`:

1. an explicit path given in config (``ModelStore(overrides={name: path})``);
2. ``$GUIDEFLOW_MODELS_DIR/<name>/<filename>`` (or ``models_dir=``);
3. the Hugging Face cache (``huggingface_hub.try_to_load_from_cache``) at the pinned revision;
4. a download through ``huggingface_hub`` at the pinned revision (or from ``url``), verified
   against the pinned sha256 before it is used.

Every file is checked against its sha256 once per process (the result is cached by
path, size and mtime). A mismatch is ``modelCorrupt``; nothing found and no way to
download is ``modelUnavailable`` with the exact fix in the message.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from guideflow.errors import ModelCorrupt, ModelUnavailable

ENV_MODELS_DIR = "GUIDEFLOW_MODELS_DIR"
ENV_OFFLINE = "GUIDEFLOW_OFFLINE"
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ModelSpec:
    """One pinned weight file.

    ``repo_id``/``revision`` locate it on the Hugging Face Hub; ``url`` is used
    instead for weights published elsewhere. ``sha256`` and ``size`` pin the
    exact bytes; ``license`` is shown by ``guideflow models list``.
    """

    name: str
    filename: str
    sha256: str
    size: int
    license: str
    description: str
    repo_id: str | None = None
    revision: str | None = None
    repo_filename: str | None = None
    url: str | None = None
    source: str = ""
    #: Folder under the models dir; defaults to ``name`` (several files may share one folder).
    directory: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def hub_filename(self) -> str:
        """Path of the file inside its Hub repository."""
        return self.repo_filename or self.filename

    def local_relpath(self) -> Path:
        return Path(self.directory or self.name) / self.filename


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ModelStore:
    """Resolves :class:`ModelSpec` objects to verified local files.

    Thread-safe; one instance is normally shared by the whole process
    (:func:`default_store`).
    """

    def __init__(
        self,
        models_dir: str | os.PathLike[str] | None = None,
        *,
        overrides: Mapping[str, str | os.PathLike[str]] | None = None,
        allow_download: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        env_dir = os.environ.get(ENV_MODELS_DIR)
        self.models_dir = Path(models_dir) if models_dir else (Path(env_dir) if env_dir else None)
        self.overrides = {k: Path(v) for k, v in (overrides or {}).items()}
        if allow_download is None:
            allow_download = not (
                os.environ.get(ENV_OFFLINE, "") not in ("", "0")
                or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            )
        self.allow_download = allow_download
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._verified: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------------

    def resolve(self, spec: ModelSpec) -> Path:
        """A verified local path to ``spec``'s file, downloading it if allowed."""
        for candidate in self._local_candidates(spec):
            if candidate.is_file():
                self.verify(spec, candidate)
                return candidate
        cached = self._hf_cached(spec)
        if cached is not None:
            self.verify(spec, cached)
            return cached
        pinned_source = spec.sha256 and (spec.repo_id is not None or spec.url is not None)
        if not self.allow_download or not pinned_source:
            raise ModelUnavailable(self._unavailable_message(spec), parameter="model")
        return self._download(spec)

    def locate(self, spec: ModelSpec) -> Path | None:
        """Where ``spec`` would be found locally without downloading (unverified), or None."""
        for candidate in self._local_candidates(spec):
            if candidate.is_file():
                return candidate
        return self._hf_cached(spec)

    def verify(self, spec: ModelSpec, path: Path) -> None:
        """Raise ``modelCorrupt`` unless ``path`` has ``spec``'s sha256 (cached per file state).

        A spec with an empty ``sha256`` is unpinned: a file the user exports and places
        themselves (no published copy to pin, e.g. an ONNX export of a torch checkpoint);
        it is never downloaded, so only its presence is checked here.
        """
        if not spec.sha256:
            return
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._verified.get(key)
        digest = known or sha256_file(path)
        if digest != spec.sha256:
            raise ModelCorrupt(
                f"model file {path} for '{spec.name}' has sha256 {digest[:16]}…, expected "
                f"{spec.sha256[:16]}…; delete it and run `guideflow models pull {spec.name}`",
                parameter="model",
            )
        with self._lock:
            self._verified[key] = digest

    # -- internals ----------------------------------------------------------------------------

    def _local_candidates(self, spec: ModelSpec) -> list[Path]:
        out: list[Path] = []
        if spec.name in self.overrides:
            out.append(self.overrides[spec.name])
        if self.models_dir is not None:
            out.append(self.models_dir / spec.local_relpath())
        return out

    def _hf_cached(self, spec: ModelSpec) -> Path | None:
        if spec.repo_id is None:
            return None
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            return None
        found = try_to_load_from_cache(
            spec.repo_id,
            spec.hub_filename,
            cache_dir=self.cache_dir,
            revision=spec.revision,
        )
        return Path(found) if isinstance(found, str) else None

    def _download(self, spec: ModelSpec) -> Path:
        """Download into a temporary file, verify, then move into place atomically."""
        target_dir = self.models_dir or _user_models_dir()
        target = target_dir / spec.local_relpath()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if spec.repo_id is not None:
                self._download_hub(spec, tmp)
            else:
                self._download_url(spec, tmp)
            digest = sha256_file(tmp)
            if digest != spec.sha256:
                raise ModelCorrupt(
                    f"downloaded '{spec.name}' has sha256 {digest[:16]}…, expected "
                    f"{spec.sha256[:16]}…; the file was discarded",
                    parameter="model",
                )
            os.replace(tmp, target)
        except (ModelCorrupt, ModelUnavailable):
            raise
        except Exception as exc:  # network down, DNS failure, HTTP error, disk full
            raise ModelUnavailable(
                f"could not download '{spec.name}' ({type(exc).__name__}: {exc}). "
                + self._unavailable_message(spec),
                parameter="model",
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def _download_hub(self, spec: ModelSpec, dest: Path) -> None:
        import shutil

        from huggingface_hub import constants, hf_hub_download

        assert spec.repo_id is not None
        _require_resolvable(constants.ENDPOINT)
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(DOWNLOAD_TIMEOUT_S)))
        path = hf_hub_download(
            spec.repo_id,
            spec.hub_filename,
            revision=spec.revision,
            cache_dir=self.cache_dir,
        )
        shutil.copyfile(path, dest)

    def _download_url(self, spec: ModelSpec, dest: Path) -> None:
        import httpx

        assert spec.url is not None
        _require_resolvable(spec.url)
        with (
            httpx.stream("GET", spec.url, follow_redirects=True, timeout=DOWNLOAD_TIMEOUT_S) as r,
            open(dest, "wb") as f,
        ):
            r.raise_for_status()
            for block in r.iter_bytes(1 << 20):
                f.write(block)

    def _unavailable_message(self, spec: ModelSpec) -> str:
        where = self.models_dir or f"${ENV_MODELS_DIR}"
        fixes = [f"put {spec.filename} at {where}/{spec.local_relpath()}"]
        if spec.sha256 and (spec.repo_id is not None or spec.url is not None):
            fixes.append(f"run `guideflow models pull {spec.name}` with network access")
        if not self.allow_download:
            fixes.append(f"unset {ENV_OFFLINE}/HF_HUB_OFFLINE to allow downloads")
        origin = f"{spec.repo_id}@{spec.revision}" if spec.repo_id else (spec.url or spec.source)
        return (
            f"model '{spec.name}' ({spec.filename}, from {origin}) is not available offline. "
            f"Fix: {'; or '.join(fixes)}."
        )


def _require_resolvable(url: str) -> None:
    """Fail at once when the download host does not resolve (offline machine).

    huggingface_hub would otherwise retry with backoff for about 20 s per file.
    """
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc}") from None


def _user_models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guideflow" / "models"


_default: ModelStore | None = None
_default_lock = threading.Lock()


def default_store() -> ModelStore:
    """The process-wide store, configured from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ModelStore()
        return _default


def set_default_store(store: ModelStore | None) -> None:
    """Replace the process-wide store (tests, or a server with explicit config)."""
    global _default
    with _default_lock:
        _default = store
