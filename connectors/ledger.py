"""The cost ledger: one parquet row per manifest row per run, on any fsspec filesystem.

Layout (a hive-partitioned parquet dataset that pandas, pyarrow, duckdb and Spark read as is)::

    <ledger>/date=YYYY-MM-DD/run=<run_id>/shard-000042.parquet

Each finished shard of a run is written as **one** file, atomically: on a local filesystem the
bytes go to a hidden temp file in the same folder that is then ``os.replace``-d into place; on
an object store (s3, gs, memory...) the complete file is sent in a single PUT. Readers only
look at names ending in ``.parquet`` whose path parts do not start with ``.`` or ``_``, so a
crash mid-write never leaves a visible partial file. Re-writing the same (date, run, shard)
replaces the file, which makes a retried shard idempotent.

What is stored never contains secrets: query strings (presigned signatures), fragments and
``user:password@`` parts are stripped from ``input_uri``/``output_uri`` and from URLs inside
``error_message`` before writing.

Readers:

* :class:`DoneIndex` -- the (image_id, preprocessor, settings_hash) keys of every success in
  the whole ledger as a sorted ``uint64`` array of 64-bit hashes (8 bytes a row), so a run can
  skip work that is already done, vectorised.
* :func:`summarize` -- counts by status, errors by code and cost, grouped by preprocessor,
  day or run (a pandas DataFrame; ``guideflow ledger summary`` prints it).
* :func:`ledger_dataset` / :func:`read_ledger` -- the raw dataset for anything else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from connectors.storage import url_to_fs
from guideflow.errors import InvalidParameter

STATUSES = ("success", "error", "skipped")
URI_FIELDS = ("input_uri", "output_uri")
KEY_COLUMNS = ("image_id", "preprocessor", "settings_hash")

_TS = pa.timestamp("ms", tz="UTC")

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("shard", pa.int64(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("input_uri", pa.string()),
        pa.field("preprocessor", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("settings_json", pa.string()),
        pa.field("settings_hash", pa.string()),
        pa.field("task_uuid", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("error_parameter", pa.string()),
        pa.field("output_uri", pa.string()),
        pa.field("guide_image_uuid", pa.string()),
        pa.field("cost_usd", pa.float64()),
        pa.field("latency_ms", pa.float64()),
        pa.field("attempts", pa.int32()),
        pa.field("backend", pa.string()),
        pa.field("method", pa.string()),
        pa.field("started_at", _TS),
        pa.field("finished_at", _TS),
    ]
)
"""Columns of every ledger file. ``date`` and ``run`` are not columns: they come from the path."""

PARTITION_SCHEMA = pa.schema([pa.field("date", pa.string()), pa.field("run", pa.string())])
"""The hive partition keys, always read as strings (a run id like ``"42"`` stays a string)."""

DATASET_SCHEMA = pa.schema(list(LEDGER_SCHEMA) + list(PARTITION_SCHEMA))
"""What readers see: the file columns plus the two partition columns."""

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_KEY_SEP = "\x1f"  # never appears in preprocessor names or hex hashes: keys cannot be ambiguous


# --------------------------------------------------------------------------------------------
# rows and settings


@dataclass(kw_only=True)
class LedgerRow:
    """One manifest row's outcome in one run (a row of :data:`LEDGER_SCHEMA`).

    ``status`` is ``"success"``, ``"error"`` or ``"skipped"`` (already done in an earlier run).
    Naive datetimes are taken as UTC.
    """

    run_id: str
    shard: int
    row: int
    image_id: str
    input_uri: str | None = None
    preprocessor: str | None = None
    variant: str | None = None
    settings_json: str | None = None
    settings_hash: str | None = None
    task_uuid: str | None = None
    status: str
    error_code: str | None = None
    error_message: str | None = None
    error_parameter: str | None = None
    output_uri: str | None = None
    guide_image_uuid: str | None = None
    cost_usd: float | None = 0.0
    latency_ms: float | None = None
    attempts: int = 0
    backend: str | None = None
    method: str | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None


_ROW_FIELDS = tuple(f.name for f in fields(LedgerRow))
assert tuple(LEDGER_SCHEMA.names) == _ROW_FIELDS, "LedgerRow and LEDGER_SCHEMA must agree"


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays (e.g. from a pandas manifest) as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"setting value of type {type(value).__name__} is not JSON-serialisable")


def _canonical_value(value: Any) -> Any:
    """Integral floats as ints (``100.0`` and ``100`` are the same threshold); recurse."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    return value


def canonical_json(settings: Mapping[str, Any]) -> str:
    """The canonical JSON text of user-visible settings: sorted keys, no spaces, ``None`` dropped.

    Defaults are *not* filled in: two requests are the same work exactly when they ask for
    the same thing. Top-level ``None`` values mean "not given" and are dropped, so
    ``{"width": None}`` equals ``{}``.
    """
    clean = {str(k): _canonical_value(v) for k, v in settings.items() if v is not None}
    return json.dumps(
        clean,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    )


def settings_hash(preprocessor: str, settings: Mapping[str, Any]) -> str:
    """16 hex chars of sha256 over the preprocessor name and :func:`canonical_json` settings.

    Include everything the user chose that changes the output bytes: preprocessor settings,
    ``width``/``height``, ``outputFormat``, ``outputQuality``.
    """
    payload = f"{preprocessor}\n{canonical_json(settings)}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _strip_secrets(uri: str | None) -> str | None:
    """``uri`` without query string, fragment and userinfo; data URIs reduced to their type.

    Unlike :func:`guideflow.netguard.redact_url` this never truncates: the ledger must keep
    the full object key to identify the input and output.
    """
    if uri is None:
        return None
    text = str(uri)
    if text[:5].lower() == "data:":
        media = text[5:].split(",", 1)[0]
        return f"data:{media},<{len(text)} chars omitted>"
    try:
        parts = urlsplit(text)
    except ValueError:
        return "<invalid URI>"
    if not parts.scheme or (not parts.netloc and parts.scheme != "file"):
        # A plain local path (or a Windows drive letter): nothing that can carry a secret.
        return text
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _scrub_message(message: str | None) -> str | None:
    """Error text with every embedded URL stripped of its secrets."""
    if message is None:
        return None
    return _URL_IN_TEXT.sub(lambda m: _strip_secrets(m.group(0)) or "", str(message))


def _utc(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def rows_to_table(rows: Iterable[LedgerRow]) -> pa.Table:
    """:class:`LedgerRow` objects as a table of :data:`LEDGER_SCHEMA` (validated, not scrubbed)."""
    # getattr, not dataclasses.asdict: every field is a scalar, and asdict's deep copy of
    # each value (datetimes included) was three quarters of the cost of writing a shard.
    rows = list(rows)
    columns: dict[str, list[Any]] = {
        name: [_utc(getattr(row, name)) for row in rows] for name in _ROW_FIELDS
    }
    table = pa.Table.from_pydict(columns, schema=LEDGER_SCHEMA)
    _check_statuses(table)
    return table


def _check_statuses(table: pa.Table) -> None:
    bad = pc.invert(pc.is_in(table["status"], value_set=pa.array(STATUSES)))
    if table.num_rows and pc.any(bad).as_py():
        values = sorted(set(pc.filter(table["status"], bad).to_pylist()), key=str)
        raise ValueError(f"ledger status must be one of {STATUSES}, got {values}")


def _conform(table: pa.Table) -> pa.Table:
    """Any table as :data:`LEDGER_SCHEMA`: missing columns null, unknown columns refused."""
    extra = [name for name in table.column_names if name not in LEDGER_SCHEMA.names]
    if extra:
        raise ValueError(f"columns not in LEDGER_SCHEMA: {extra}")
    arrays = []
    for schema_field in LEDGER_SCHEMA:
        if schema_field.name in table.column_names:
            arrays.append(table[schema_field.name].cast(schema_field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, schema_field.type))
    conformed = pa.Table.from_arrays(arrays, schema=LEDGER_SCHEMA)
    conformed.validate(full=True)
    for schema_field in LEDGER_SCHEMA:
        if not schema_field.nullable and conformed[schema_field.name].null_count:
            raise ValueError(f"ledger column {schema_field.name!r} must not be null")
    _check_statuses(conformed)
    return conformed


def _scrub(table: pa.Table) -> pa.Table:
    """Strip secrets from the URI columns and from URLs in error messages.

    Only values that could hold a secret go through Python: URIs with a query string,
    fragment, userinfo or a data: payload, and messages that contain ``://``.
    """
    for name, clean, suspect in (
        *((n, _strip_secrets, _URI_SUSPECT) for n in URI_FIELDS),
        ("error_message", _scrub_message, _MESSAGE_SUSPECT),
    ):
        column = table[name]
        flagged = pc.fill_null(pc.match_substring_regex(column, suspect), False)
        if not pc.any(flagged).as_py():
            continue
        index = table.schema.get_field_index(name)
        values = [
            clean(v) if hit else v
            for v, hit in zip(column.to_pylist(), flagged.to_pylist(), strict=True)
        ]
        table = table.set_column(index, LEDGER_SCHEMA.field(name), pa.array(values, pa.string()))
    return table


_URI_SUSPECT = r"[?#@]|^[Dd][Aa][Tt][Aa]:"
_MESSAGE_SUSPECT = "://"


# --------------------------------------------------------------------------------------------
# filesystems


def _url_to_fs(
    url: str, storage_options: Mapping[str, Any] | None
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and root path for ``url`` (S3 endpoint from the environment if unset)."""
    fs, path = url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def _is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _temp_name(final_path: str) -> str:
    """Hidden, non-``.parquet`` sibling of ``final_path``: invisible to every reader."""
    folder, _, name = final_path.rpartition("/")
    return f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"


def _atomic_local_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync, then ``os.replace`` it in place."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_visible(rel_path: str) -> bool:
    """A finished ledger file: ends in ``.parquet``, no hidden/underscore path part."""
    parts = rel_path.split("/")
    return parts[-1].endswith(".parquet") and not any(p.startswith((".", "_")) for p in parts)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------------------------
# writing


class LedgerWriter:
    """Writes finished shards into the ledger at ``ledger_url`` (one parquet file per shard)."""

    def __init__(
        self,
        ledger_url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        fs: AbstractFileSystem | None = None,
    ) -> None:
        self.url = ledger_url.rstrip("/")
        if fs is None:
            self.fs, self.root = _url_to_fs(ledger_url, storage_options)
        else:
            self.fs, self.root = fs, fs._strip_protocol(ledger_url).rstrip("/")

    def shard_relpath(
        self, run_id: str, shard_index: int, date: dt.date | str | None = None
    ) -> str:
        """``date=YYYY-MM-DD/run=<run_id>/shard-<n:06d>.parquet`` (validated)."""
        if not _RUN_ID.match(run_id):
            raise InvalidParameter(
                f"run id {run_id!r} must be 1-128 of [A-Za-z0-9._-], starting alphanumeric",
                parameter="run_id",
            )
        if shard_index < 0:
            raise InvalidParameter("shard index must be >= 0", parameter="shard")
        day = _date_text(date)
        return f"date={day}/run={run_id}/shard-{shard_index:06d}.parquet"

    def write_shard(
        self,
        run_id: str,
        shard_index: int,
        rows: Sequence[LedgerRow] | pa.Table,
        date: dt.date | str | None = None,
    ) -> str:
        """Write one shard's rows atomically and return the file's URL.

        ``date`` defaults to today (UTC); pass the run's start date so that a shard retried
        after midnight replaces its earlier file instead of adding a second one. Every row's
        ``run_id`` and ``shard`` must match the arguments.
        """
        table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
        table = _scrub(_conform(table))
        _check_ownership(table, run_id, shard_index)
        rel = self.shard_relpath(run_id, shard_index, date)
        path = f"{self.root}/{rel}"
        data = _parquet_bytes(table)
        if _is_local(self.fs):
            self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
            _atomic_local_write(path, data)
        else:
            self.fs.pipe_file(path, data)  # one PUT of the complete file: atomic on object stores
        return f"{self.url}/{rel}"


def _date_text(date: dt.date | str | None) -> str:
    if date is None:
        return dt.datetime.now(dt.UTC).date().isoformat()
    if isinstance(date, dt.datetime):
        return _utc(date).astimezone(dt.UTC).date().isoformat()
    if isinstance(date, dt.date):
        return date.isoformat()
    text = str(date)
    try:
        if not _DATE.match(text):
            raise ValueError
        dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidParameter(f"date {text!r} must be YYYY-MM-DD", parameter="date") from None
    return text


def _check_ownership(table: pa.Table, run_id: str, shard_index: int) -> None:
    runs = set(table["run_id"].unique().to_pylist())
    shards = set(table["shard"].unique().to_pylist())
    if runs - {run_id} or shards - {shard_index}:
        raise ValueError(
            f"rows for runs {sorted(runs)} / shards {sorted(shards)} "
            f"written as run {run_id!r} shard {shard_index}"
        )


# --------------------------------------------------------------------------------------------
# reading


def ledger_dataset(
    ledger_url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    fs: AbstractFileSystem | None = None,
) -> ds.Dataset:
    """The whole ledger as a pyarrow dataset of :data:`DATASET_SCHEMA` (empty if none yet).

    Only finished files are read (see :func:`_is_visible`); ``date`` and ``run`` come from
    the hive partitioning of the path.
    """
    if fs is None:
        fs, root = _url_to_fs(ledger_url, storage_options)
    else:
        root = fs._strip_protocol(ledger_url).rstrip("/")
    fs.invalidate_cache(root)  # object-store listings are cached per filesystem instance
    files = sorted(p for p in _find(fs, root) if _is_visible(p[len(root) + 1 :]))
    if not files:
        return ds.InMemoryDataset(DATASET_SCHEMA.empty_table())
    return ds.dataset(
        files,
        schema=DATASET_SCHEMA,
        filesystem=fs,
        format="parquet",
        partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
        partition_base_dir=root,
    )


def _find(fs: AbstractFileSystem, root: str) -> list[str]:
    try:
        if not fs.exists(root):
            return []
        return [p.rstrip("/") for p in fs.find(root)]
    except FileNotFoundError:
        return []


def read_ledger(
    ledger_url: str,
    *,
    columns: Sequence[str] | None = None,
    filter: ds.Expression | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The ledger (or some columns / a filter of it) as a pandas DataFrame."""
    dataset = ledger_dataset(ledger_url, storage_options=storage_options)
    return dataset.to_table(columns=list(columns) if columns else None, filter=filter).to_pandas()


def _success_batches(
    dataset: ds.Dataset, columns: Sequence[str], batch_size: int
) -> Iterator[pa.RecordBatch]:
    scanner = dataset.scanner(
        columns=list(columns), filter=pc.field("status") == "success", batch_size=batch_size
    )
    yield from scanner.to_batches()


def key_hashes(
    image_ids: Sequence[Any] | pa.Array | pa.ChunkedArray,
    preprocessors: Sequence[Any] | pa.Array | pa.ChunkedArray,
    settings_hashes: Sequence[Any] | pa.Array | pa.ChunkedArray,
) -> np.ndarray:
    """64-bit hashes (``uint64``) of (image_id, preprocessor, settings_hash) keys, vectorised.

    Nulls count as empty strings. The hash is pandas' SipHash with its fixed key, so it is
    the same in every process and on every machine.
    """
    parts = [
        pc.fill_null(pc.cast(_as_arrow(values), pa.string()), "")
        for values in (image_ids, preprocessors, settings_hashes)
    ]
    joined = pc.binary_join_element_wise(*parts, _KEY_SEP)
    if len(joined) == 0:
        return np.empty(0, dtype=np.uint64)
    objects = joined.to_numpy(zero_copy_only=False).astype(object, copy=False)
    return pd.util.hash_array(objects, categorize=False).astype(np.uint64, copy=False)


def _as_arrow(values: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values
    if not isinstance(values, np.ndarray | pd.Series):
        values = list(values)
    return pa.array(values, pa.string())


class DoneIndex:
    """The success keys of a ledger, as a sorted array of unique 64-bit hashes (8 bytes a key).

    ``contains`` answers "was (image_id, preprocessor, settings_hash) already produced?" for a
    whole shard at once; with 64-bit hashes the chance of a single false "done" stays around
    1e-5 even for 10M stored keys and 10M lookups.
    """

    def __init__(self, hashes: np.ndarray | None = None, spent: float = 0.0) -> None:
        values = np.asarray(hashes if hashes is not None else [], dtype=np.uint64)
        self._hashes = _sorted_unique(values)
        # Keys added since the last merge (sorted, unique, none of them in _hashes): a run
        # adds one shard's successes at a time, and re-sorting all 8 bytes × N of _hashes
        # for every shard made a long run quadratic (~30 ms a shard at 1M keys).
        self._pending = np.empty(0, dtype=np.uint64)
        self._spent = float(spent)

    @classmethod
    def load(
        cls,
        ledger_url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        fs: AbstractFileSystem | None = None,
        batch_size: int = 131_072,
    ) -> DoneIndex:
        """Stream the success keys (and their cost) of the whole ledger, a batch at a time."""
        dataset = ledger_dataset(ledger_url, storage_options=storage_options, fs=fs)
        chunks: list[np.ndarray] = []
        spent = 0.0
        columns = [*KEY_COLUMNS, "status", "cost_usd"]
        for batch in _success_batches(dataset, columns, batch_size):
            if batch.num_rows == 0:
                continue
            chunks.append(
                key_hashes(batch["image_id"], batch["preprocessor"], batch["settings_hash"])
            )
            spent += pc.sum(batch["cost_usd"]).as_py() or 0.0
        hashes = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint64)
        del chunks
        return cls(hashes, spent)

    def __len__(self) -> int:
        return int(self._hashes.size + self._pending.size)

    @property
    def nbytes(self) -> int:
        """Memory held by the keys."""
        return int(self._hashes.nbytes + self._pending.nbytes)

    def already_spent(self) -> float:
        """Total ``cost_usd`` of every success in the ledger when it was loaded (budgets)."""
        return self._spent

    def contains(self, keys: Any) -> np.ndarray:
        """A bool array: which keys are already a success.

        ``keys`` is a sequence of (image_id, preprocessor, settings_hash) tuples, a pandas
        DataFrame / pyarrow Table / mapping with those three columns, or a ``uint64`` array
        of :func:`key_hashes`.
        """
        hashes = _keys_to_hashes(keys)
        found = _members(self._hashes, hashes)
        if self._pending.size:
            found |= _members(self._pending, hashes)
        return found

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        return bool(self.contains([key])[0])

    def add(self, keys: Any) -> None:
        """Mark more keys done (e.g. after a shard of this run is written).

        New keys go to a small sorted side array, merged into the main one once it holds
        :data:`PENDING_MERGE` keys, so adding a shard costs O(shard + pending), not O(N).
        """
        new = _keys_to_hashes(keys)
        new = new[~_members(self._hashes, new)]
        pending = _sorted_unique(np.concatenate([self._pending, new]))
        if pending.size >= PENDING_MERGE:
            self._hashes = _sorted_unique(np.concatenate([self._hashes, pending]))
            pending = np.empty(0, dtype=np.uint64)
        self._pending = pending


#: Keys :meth:`DoneIndex.add` collects before merging them into the main sorted array.
PENDING_MERGE = 1 << 16


def _members(sorted_hashes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Which of ``hashes`` are in the sorted array ``sorted_hashes`` (vectorised)."""
    if sorted_hashes.size == 0 or hashes.size == 0:
        return np.zeros(hashes.shape, dtype=bool)
    pos = np.searchsorted(sorted_hashes, hashes)
    pos = np.minimum(pos, sorted_hashes.size - 1)
    return sorted_hashes[pos] == hashes


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sort in place and drop repeats without the extra copies of ``np.unique``."""
    values.sort()
    if values.size < 2:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _keys_to_hashes(keys: Any) -> np.ndarray:
    if isinstance(keys, np.ndarray) and keys.dtype == np.uint64:
        return keys
    if isinstance(keys, pa.Table | pd.DataFrame | Mapping):
        return key_hashes(*(keys[name] for name in KEY_COLUMNS))
    rows = list(keys)
    if not rows:
        return np.empty(0, dtype=np.uint64)
    image_ids, preprocessors, hashes = zip(*rows, strict=True)
    return key_hashes(image_ids, preprocessors, hashes)


# --------------------------------------------------------------------------------------------
# summaries

SummaryBy = Literal["preprocessor", "day", "run"]
_BY_COLUMN = {"preprocessor": "preprocessor", "day": "date", "run": "run_id"}
SUMMARY_COLUMNS = ("success", "error", "skipped", "total", "cost_usd", "errors_by_code")


def summarize(
    ledger_url: str,
    by: SummaryBy = "preprocessor",
    *,
    storage_options: Mapping[str, Any] | None = None,
    batch_size: int = 131_072,
) -> pd.DataFrame:
    """Counts by status, total cost and errors by code, one row per preprocessor/day/run.

    The index is named ``by``; columns are :data:`SUMMARY_COLUMNS`, where ``errors_by_code``
    is a ``{code: count}`` dict (most frequent first). Batches are aggregated as they stream,
    so memory does not grow with the ledger.
    """
    if by not in _BY_COLUMN:
        raise InvalidParameter(
            f"--by must be one of {sorted(_BY_COLUMN)}, got {by!r}", parameter="by"
        )
    key = _BY_COLUMN[by]
    dataset = ledger_dataset(ledger_url, storage_options=storage_options)
    scanner = dataset.scanner(
        columns=[key, "status", "error_code", "cost_usd"], batch_size=batch_size
    )
    parts = [
        pa.Table.from_batches([batch])
        .group_by([key, "status", "error_code"], use_threads=False)
        .aggregate([("status", "count"), ("cost_usd", "sum")])
        .to_pandas()
        for batch in scanner.to_batches()
        if batch.num_rows
    ]
    if not parts:
        empty = pd.DataFrame(columns=list(SUMMARY_COLUMNS))
        empty.index.name = by
        return empty
    groups = (
        pd.concat(parts, ignore_index=True)
        .rename(columns={key: by, "status_count": "n", "cost_usd_sum": "cost_usd"})
        .fillna({by: "(none)"})
        .groupby([by, "status", "error_code"], dropna=False, sort=True)[["n", "cost_usd"]]
        .sum()
        .reset_index()
    )
    counts = groups.pivot_table(index=by, columns="status", values="n", aggfunc="sum", fill_value=0)
    result = pd.DataFrame(index=counts.index)
    for status in STATUSES:
        result[status] = counts[status].astype("int64") if status in counts else 0
    result["total"] = result[list(STATUSES)].sum(axis=1).astype("int64")
    result["cost_usd"] = groups.groupby(by)["cost_usd"].sum().reindex(result.index).astype(float)
    errors = groups[(groups["status"] == "error")].fillna({"error_code": "(none)"})
    result["errors_by_code"] = [_code_counts(errors[errors[by] == name]) for name in result.index]
    result.index.name = by
    return result


def _code_counts(frame: pd.DataFrame) -> dict[str, int]:
    totals = frame.groupby("error_code")["n"].sum()
    ordered = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return {str(code): int(n) for code, n in ordered}


def summary_totals(summary: pd.DataFrame) -> dict[str, Any]:
    """The total line of a :func:`summarize` frame: summed counts, cost and error codes."""
    codes: dict[str, int] = {}
    for per_group in summary.get("errors_by_code", []):
        for code, n in per_group.items():
            codes[code] = codes.get(code, 0) + n
    totals: dict[str, Any] = {c: int(summary[c].sum()) for c in (*STATUSES, "total")}
    totals["cost_usd"] = float(summary["cost_usd"].sum())
    totals["errors_by_code"] = dict(sorted(codes.items(), key=lambda item: (-item[1], item[0])))
    return totals


def duplicate_successes(
    ledger_url: str, *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Keys with more than one success (should be none): the three key columns and ``count``."""
    dataset = ledger_dataset(ledger_url, storage_options=storage_options)
    frame = dataset.to_table(
        columns=list(KEY_COLUMNS), filter=pc.field("status") == "success"
    ).to_pandas()
    counts = frame.groupby(list(KEY_COLUMNS), dropna=False).size().rename("count").reset_index()
    return counts[counts["count"] > 1].reset_index(drop=True)
