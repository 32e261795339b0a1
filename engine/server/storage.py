"""Where uploaded, inline-input and generated guide images live while they are addressable.

Each image is one file ``<uuid>.<ext>`` in a directory; the index (uuid → size,
type, expiry) is kept in memory, so the directory is private to one server
process and is wiped when the store opens. Two bounds keep storage finite:

* every entry has an expiry (``ttl``); expired entries are deleted by
  :meth:`ImageStore.sweep` (run periodically) and on access;
* the total size is capped; adding an image evicts the oldest ones first.

``put(..., defer=True)`` writes behind: the entry is live at once (its bytes are
served from memory) and the file is written by the store's own thread, off the
caller's critical path. The server uses it for images nobody fetches by URL right
away (inline inputs, guides answered inline), saving the request a file write.

All methods are thread-safe and do blocking file I/O: call them from a thread
(``asyncio.to_thread``) when on the event loop, except :meth:`ImageStore.lookup`,
which only reads the index.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("guideflow.server")

ImageKind = Literal["upload", "input", "guide"]

_CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "gif": "image/gif",
}
_EXT_OF_FORMAT = {
    "JPG": "jpg",
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
}


def extension_of(fmt: str) -> str:
    """File extension for an image format name (``"JPEG"`` → ``"jpg"``)."""
    return _EXT_OF_FORMAT[fmt.upper()]


@dataclass
class StoredImage:
    """Index entry of one stored image."""

    uuid: str
    ext: str
    size: int
    kind: ImageKind
    created: float
    expires: float
    refresh_ttl: float | None  # uploads/inputs live ``ttl`` after their last use

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self.ext]

    @property
    def filename(self) -> str:
        return f"{self.uuid}.{self.ext}"


class ImageStore:
    """A bounded, expiring, on-disk image store keyed by UUID."""

    SUBDIR = "guideflow-images"

    def __init__(
        self,
        directory: Path | None,
        *,
        max_bytes: int,
        clock: Callable[[], float],
    ) -> None:
        self._owned_tmp = directory is None
        base = Path(tempfile.mkdtemp(prefix="guideflow-serve-")) if directory is None else directory
        self.root = base / self.SUBDIR
        shutil.rmtree(self.root, ignore_errors=True)  # index is in memory: old files are orphans
        self.root.mkdir(parents=True, exist_ok=True)
        self._base = base
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, StoredImage] = OrderedDict()  # oldest first
        self.total_bytes = 0
        self._pending: dict[str, bytes] = {}  # deferred puts not yet on disk, by uuid
        self._writer: ThreadPoolExecutor | None = None  # started by the first deferred put
        self._closed = False

    # -- writing ------------------------------------------------------------------------

    def put(
        self,
        data: bytes,
        ext: str,
        *,
        ttl: float,
        kind: ImageKind,
        image_uuid: str | None = None,
        refresh: bool = False,
        defer: bool = False,
    ) -> StoredImage:
        """Store ``data``; evict the oldest images first if the byte cap would be exceeded.

        An image larger than the whole cap is still stored (after evicting
        everything else) so that a single request never fails for that reason.
        With ``defer`` the file is written behind (see the module docstring); if that
        write fails the image is dropped (logged), as if evicted.
        """
        ident = image_uuid or str(uuid.uuid4())
        now = self.clock()
        entry = StoredImage(
            uuid=ident,
            ext=ext,
            size=len(data),
            kind=kind,
            created=now,
            expires=now + ttl,
            refresh_ttl=ttl if refresh else None,
        )
        if not defer:
            path = self.root / entry.filename
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        with self._lock:
            self._drop_locked(ident)
            self._entries[ident] = entry
            self.total_bytes += entry.size
            victims = self._evict_locked(keep=ident)
            if defer:
                self._pending[ident] = data
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(1, thread_name_prefix="guideflow-store")
                self._writer.submit(self._write_behind, entry)
        self._unlink(victims)
        return entry

    def _write_behind(self, entry: StoredImage) -> None:
        """Write a deferred image's file; it goes live on disk only if still current."""
        with self._lock:
            data = self._pending.get(entry.uuid)
            if data is None or self._closed or self._entries.get(entry.uuid) is not entry:
                return  # deleted, evicted or replaced before its turn
        path = self.root / entry.filename
        tmp = path.with_name(f"{entry.filename}.{uuid.uuid4().hex}.part")  # unique per write
        failure: OSError | None = None
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            failure = exc
        with self._lock:  # rename and un-pend atomically w.r.t. read/delete/evict
            current = self._entries.get(entry.uuid) is entry and not self._closed
            if current and failure is None:
                try:
                    tmp.replace(path)
                except OSError as exc:
                    failure = exc
            if current:
                self._pending.pop(entry.uuid, None)
                if failure is not None:
                    self._drop_locked(entry.uuid)
        if failure is not None or not current:
            tmp.unlink(missing_ok=True)
        if failure is not None and current:
            log.warning("could not store image %s (dropped): %s", entry.filename, failure)

    def flush(self) -> None:
        """Wait until every deferred image written so far is on disk (or dropped)."""
        with self._lock:
            writer = self._writer
        if writer is not None:
            writer.submit(lambda: None).result()

    # -- reading ------------------------------------------------------------------------

    def lookup(self, image_uuid: str) -> StoredImage | None:
        """The live entry for ``image_uuid`` (index only; ``None`` if unknown or expired)."""
        with self._lock:
            entry = self._entries.get(image_uuid)
            if entry is None or entry.expires > self.clock():
                return entry
        self.delete(image_uuid)
        return None

    def read(self, image_uuid: str, *, touch: bool = False) -> tuple[StoredImage, bytes] | None:
        """The entry and bytes of a live image, or ``None``.

        ``touch`` extends the life of uploads/inputs (they expire ``ttl`` after last use).
        """
        entry = self.lookup(image_uuid)
        if entry is None:
            return None
        with self._lock:
            data = self._pending.get(image_uuid)  # written behind, not on disk yet
        if data is None:
            try:
                data = (self.root / entry.filename).read_bytes()
            except FileNotFoundError:  # evicted between lookup and read
                return None
        if touch and entry.refresh_ttl is not None:
            with self._lock:
                entry.expires = max(entry.expires, self.clock() + entry.refresh_ttl)
        return entry, data

    def path_of(self, entry: StoredImage) -> Path:
        return self.root / entry.filename

    # -- housekeeping -------------------------------------------------------------------

    def delete(self, image_uuid: str) -> None:
        with self._lock:
            victim = self._drop_locked(image_uuid)
        self._unlink([victim] if victim else [])

    def sweep(self) -> int:
        """Delete every expired image; return how many were deleted."""
        now = self.clock()
        with self._lock:
            expired = [e for e in self._entries.values() if e.expires <= now]
            for e in expired:
                self._drop_locked(e.uuid)
        self._unlink(expired)
        return len(expired)

    def close(self) -> None:
        """Delete every stored file (and the temporary directory if the store made it)."""
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._pending.clear()
            self.total_bytes = 0
            writer, self._writer = self._writer, None
        if writer is not None:  # let a write in progress finish before deleting the files
            writer.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._base if self._owned_tmp else self.root, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop_locked(self, image_uuid: str) -> StoredImage | None:
        self._pending.pop(image_uuid, None)
        entry = self._entries.pop(image_uuid, None)
        if entry is not None:
            self.total_bytes -= entry.size
        return entry

    def _evict_locked(self, *, keep: str) -> list[StoredImage]:
        victims: list[StoredImage] = []
        while self.total_bytes > self.max_bytes:
            oldest = next((k for k in self._entries if k != keep), None)
            if oldest is None:
                break
            entry = self._drop_locked(oldest)
            assert entry is not None
            victims.append(entry)
        return victims

    def _unlink(self, entries: list[StoredImage]) -> None:
        for e in entries:
            (self.root / e.filename).unlink(missing_ok=True)
