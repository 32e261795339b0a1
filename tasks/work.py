"""The units of pipeline work: run configuration, work items and their outcomes.

A manifest row becomes one :class:`WorkItem` per preprocessor; a backend turns each
item into an :class:`Outcome`; the ledger records every outcome. Everything here is a
plain, picklable dataclass so shards can travel to Dask workers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from connectors.ledger import LEDGER_SCHEMA, settings_hash
from connectors.manifest import ManifestRow, ManifestSpec
from connectors.storage import output_namer
from engine import imageio, registry
from guideflow.errors import GuideflowError, InvalidParameter
from guideflow.protocol import ErrorObject, stable_task_uuid

Backend = Literal["local", "http"]
DEFAULT_OUTPUT_TEMPLATE = "{prefix}/{preprocessor}/{image_id}.{ext}"
#: Manifest columns that are request fields rather than preprocessor settings.
REQUEST_FIELDS = ("width", "height")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, shared by the flow, its shard tasks and the CLI.

    ``concurrency`` is the number of requests in flight per process (a request is
    one image for the local backend, one POST of up to ``batch_size`` tasks for the
    HTTP backend); ``rate`` caps tasks per second. HTTP backend only:
    ``request_timeout_s`` bounds each POST, which is retried up to ``max_retries``
    times with full-jitter backoff starting at ``retry_backoff_s`` (and at least the
    server's ``Retry-After``); see :class:`connectors.runware.RunwareClient`.
    """

    manifest: ManifestSpec
    preprocessors: tuple[str, ...]
    output: str
    ledger: str
    backend: Backend = "local"
    endpoint: str | None = None
    api_key_env: str = "RUNWARE_API_KEY"
    api_key_secret_block: str | None = None
    concurrency: int = 16
    rate: float | None = None
    batch_size: int = 20
    shard_size: int = 1000
    max_shards_in_flight: int = 2
    output_format: str = "PNG"
    output_quality: int = 95
    output_template: str = DEFAULT_OUTPUT_TEMPLATE
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    width: int | None = None
    height: int | None = None
    force: bool = False
    dry_run: bool = False
    max_cost: float | None = None
    presign_expiry_s: int = 3600
    request_timeout_s: float = 60.0
    max_retries: int = 5
    retry_backoff_s: float = 0.5
    global_concurrency_limit: str | None = None
    contact_sheet_samples: int = 8

    def __post_init__(self) -> None:
        names = tuple(registry.canonical_name(p) for p in self.preprocessors)
        if not names:
            raise InvalidParameter("name at least one preprocessor", parameter="preprocessor")
        object.__setattr__(self, "preprocessors", names)
        object.__setattr__(self, "output_format", imageio.normalize_format(self.output_format))
        imageio.validate_quality(self.output_quality)
        if self.rate is not None and not self.rate > 0:
            raise InvalidParameter(
                f"rate must be > 0 tasks per second, got {self.rate}", parameter="rate"
            )
        if not self.request_timeout_s > 0 or self.max_retries < 0 or self.retry_backoff_s < 0:
            raise InvalidParameter(
                "request_timeout_s must be > 0, max_retries and retry_backoff_s >= 0",
                parameter="request_timeout_s",
            )
        if self.backend == "http" and not self.endpoint:
            raise InvalidParameter("the http backend needs --endpoint URL", parameter="endpoint")
        for p in self.settings:
            registry.canonical_name(p)

    def with_(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)


@dataclass(slots=True)
class WorkItem:
    """One (image, preprocessor) pair to produce, fully validated.

    Treat it as immutable. It is not ``frozen`` because a frozen dataclass pays a
    generic ``object.__setattr__`` per field when it is made: three quarters of the cost
    of an item, and a 10M-row manifest makes 10M of them.
    """

    shard: int
    row: int
    image_id: str
    input_uri: str
    preprocessor: str
    settings: dict[str, Any]
    width: int | None
    height: int | None
    output_format: str
    output_quality: int
    settings_hash: str
    task_uuid: str
    output_uri: str
    settings_json: str = ""  # the settings as the ledger records them (JSON, sorted keys)

    @property
    def key(self) -> tuple[str, str, str]:
        """The exactly-once identity: (image id, preprocessor, settings hash)."""
        return (self.image_id, self.preprocessor, self.settings_hash)

    @property
    def content_type(self) -> str:
        return imageio.content_type(self.output_format)


@dataclass(slots=True)
class Outcome:
    """What happened to one work item (or one bad manifest row)."""

    status: Literal["success", "error", "skipped"]
    item: WorkItem | None = None
    row: ManifestRow | None = None
    preprocessor: str | None = None
    error: ErrorObject | None = None
    task_uuid: str | None = None  # the taskUUID sent, when not the item's own
    guide_image_uuid: str | None = None
    variant: str | None = None
    method: str | None = None
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    attempts: int = 1
    started_at: float = field(default_factory=time.time)
    finished_at: float = field(default_factory=time.time)

    @classmethod
    def failed(
        cls,
        item: WorkItem,
        exc: GuideflowError | ErrorObject,
        *,
        started: float,
        attempts: int = 1,
        task_uuid: str | None = None,
    ) -> Outcome:
        error = exc if isinstance(exc, ErrorObject) else ErrorObject.from_exception(exc)
        return cls(
            status="error",
            item=item,
            error=error,
            task_uuid=task_uuid,
            started_at=started,
            finished_at=time.time(),
            latency_ms=(time.time() - started) * 1000,
            attempts=attempts,
        )

    def ledger_values(self) -> tuple[Any, ...]:
        """This outcome's ledger columns, in :data:`LEDGER_VALUE_COLUMNS` order."""
        item, row, error = self.item, self.row, self.error
        if item is not None:
            ids: tuple[Any, ...] = (
                item.row,
                item.image_id,
                item.input_uri,
                item.preprocessor,
                item.settings_json or json.dumps(item.settings, sort_keys=True, default=str),
                item.settings_hash,
                self.task_uuid or item.task_uuid,
                item.output_uri if self.status == "success" else None,
            )
        else:
            ids = (
                row.row if row else -1,
                row.id if row else "",
                (row.image or "") if row else "",
                self.preprocessor or "",
                json.dumps(row.settings if row else {}, sort_keys=True, default=str),
                "",
                self.task_uuid or "",
                None,
            )
        return (
            *ids,
            self.variant or "",
            self.status,
            error.code if error else None,
            error.message if error else None,
            error.parameter if error else None,
            self.guide_image_uuid,
            self.cost_usd,
            self.latency_ms,
            self.attempts,
            self.method,
            self.started_at,
            self.finished_at,
        )


#: The ledger columns :meth:`Outcome.ledger_values` fills (the rest are per shard).
LEDGER_VALUE_COLUMNS = (
    "row",
    "image_id",
    "input_uri",
    "preprocessor",
    "settings_json",
    "settings_hash",
    "task_uuid",
    "output_uri",
    "variant",
    "status",
    "error_code",
    "error_message",
    "error_parameter",
    "guide_image_uuid",
    "cost_usd",
    "latency_ms",
    "attempts",
    "method",
    "started_at",
    "finished_at",
)
_TIMESTAMPS = ("started_at", "finished_at")


def ledger_table(outcomes: Sequence[Outcome], run_id: str, shard: int, backend: str) -> pa.Table:
    """A shard's outcomes as one table of :data:`connectors.ledger.LEDGER_SCHEMA`.

    Built column by column from :meth:`Outcome.ledger_values` rather than through one
    :class:`~connectors.ledger.LedgerRow` per outcome: at thousands of images a second,
    per-row objects and datetimes were a fifth of the HTTP pipeline's CPU time.
    """
    n = len(outcomes)
    columns = list(zip(*(o.ledger_values() for o in outcomes), strict=True)) if n else []
    values = dict(zip(LEDGER_VALUE_COLUMNS, columns, strict=True)) if n else {}
    arrays: list[pa.Array] = []
    for field_ in LEDGER_SCHEMA:
        name = field_.name
        if name == "run_id":
            arrays.append(pa.array([run_id] * n, field_.type))
        elif name == "shard":
            arrays.append(pa.array(np.full(n, shard, dtype=np.int64)))
        elif name == "backend":
            arrays.append(pa.array([backend] * n, field_.type))
        elif name in _TIMESTAMPS:
            seconds = np.asarray(values.get(name, ()), dtype=np.float64)
            millis = np.floor(seconds * 1000).astype(np.int64)
            arrays.append(pa.array(millis, field_.type))
        else:
            arrays.append(pa.array(values.get(name, ()), field_.type))
    return pa.Table.from_arrays(arrays, schema=LEDGER_SCHEMA)


@dataclass(kw_only=True)
class Counts:
    """What a stretch of work did: the counters a shard reports and a run adds up."""

    rows: int = 0
    success: int = 0
    errors: int = 0
    skipped: int = 0
    already_done: int = 0
    not_started: int = 0
    cost_usd: float = 0.0
    cost_by_preprocessor: dict[str, float] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)
    budget_exhausted: bool = False
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (input, output, name)

    def merge(self, other: Counts, *, max_samples: int) -> None:
        """Add ``other``'s counters to these (samples up to ``max_samples``)."""
        for name in ("rows", "success", "errors", "skipped", "already_done", "not_started"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost_usd += other.cost_usd
        self.budget_exhausted |= other.budget_exhausted
        for k, v in other.cost_by_preprocessor.items():
            self.cost_by_preprocessor[k] = self.cost_by_preprocessor.get(k, 0.0) + v
        for k, n in other.errors_by_code.items():
            self.errors_by_code[k] = self.errors_by_code.get(k, 0) + n
        self.samples.extend(other.samples[: max(0, max_samples - len(self.samples))])


def expand_row(
    row: ManifestRow, shard: int, config: RunConfig
) -> tuple[list[WorkItem], list[Outcome]]:
    """A manifest row → its work items, or error outcomes for what is wrong with it.

    The row's ``preprocessor`` column (comma-separated) replaces the run's list for
    that row. Every parameter is validated here, before any request, so a bad row
    costs nothing and is recorded with a clear code.
    """
    if row.error is not None:
        return [], [_row_error(row, row.error, None)]
    names = (
        [p.strip() for p in row.preprocessor.split(",") if p.strip()]
        if row.preprocessor
        else list(config.preprocessors)
    )
    items: list[WorkItem] = []
    errors: list[Outcome] = []
    for raw_name in names:
        try:
            items.append(make_item(row, raw_name, shard, config))
        except GuideflowError as exc:
            errors.append(_row_error(row, exc, raw_name))
    return items, errors


def make_item(row: ManifestRow, raw_name: str, shard: int, config: RunConfig) -> WorkItem:
    """One validated work item; raises ``invalidParameter`` (naming the setting) if it is not.

    Per image of a 10M-row manifest, so the costly parts (validating and hashing the
    settings, formatting the output key) are memoised per distinct request.
    """
    name = _canonical(raw_name)
    width: Any = config.width
    height: Any = config.height
    row_settings = row.settings
    if row_settings:
        row_settings = dict(row_settings)
        width = row_settings.pop("width", width)
        height = row_settings.pop("height", height)
    base = config.settings.get(name)
    settings = {**base, **row_settings} if base else dict(row_settings) if row_settings else {}
    checked = _checked(name, settings, width, height, config)
    assert row.image is not None
    return WorkItem(
        shard=shard,
        row=row.row,
        image_id=row.id,
        input_uri=row.image,
        preprocessor=name,
        settings=checked.settings,
        width=checked.width,
        height=checked.height,
        output_format=config.output_format,
        output_quality=config.output_quality,
        settings_hash=checked.digest,
        task_uuid=stable_task_uuid(row.id, name, checked.digest),
        output_uri=_namer(config, name)(row.id),
        settings_json=checked.settings_json,
    )


_names: dict[str, str] = {}


def _canonical(raw_name: str) -> str:
    """:func:`engine.registry.canonical_name`, memoised (names are few, rows are many)."""
    name = _names.get(raw_name)
    if name is None:
        name = registry.canonical_name(raw_name)  # raises for an unknown name: not cached
        if len(_names) < 1024:
            _names[raw_name] = name
    return name


def _namer(config: RunConfig, preprocessor: str) -> Callable[[str], str]:
    return output_namer(
        config.output_template,
        prefix=config.output.rstrip("/"),
        preprocessor=preprocessor,
        ext=imageio.file_extension(config.output_format),
    )


@dataclass(frozen=True)
class _Checked:
    """A validated request: dimensions, settings (shared between items: never mutate), hash."""

    width: int | None
    height: int | None
    digest: str
    settings: dict[str, Any]
    settings_json: str


_checked_cache: dict[tuple[Any, ...], _Checked] = {}
_CHECKED_CACHE_MAX = 4096
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _checked(
    name: str, settings: dict[str, Any], width: Any, height: Any, config: RunConfig
) -> _Checked:
    """Validate the settings and dimensions and hash the user-visible request.

    Raises ``invalidParameter`` naming the setting. Memoised: most manifests ask the same
    of every row, and validating plus hashing (canonical JSON, SHA-256) was the largest
    per-row cost of planning work. The key holds every value *with its type* (``1``,
    ``1.0`` and ``True`` are equal in Python but not as settings) and the registered
    preprocessor object (so re-registering a name invalidates it); only scalar values are
    keyed (lists, dicts, tuples are checked every time). Only successes are remembered.
    """
    proc = registry.get(name)
    key: tuple[Any, ...] | None = None
    if all(type(v) in _SCALARS for v in (width, height, *settings.values())):
        key = (
            id(proc),
            name,
            tuple((k, type(v), v) for k, v in settings.items()),
            type(width),
            width,
            type(height),
            height,
            config.output_format,
            config.output_quality,
        )
        hit = _checked_cache.get(key)
        if hit is not None:
            return hit
    proc.validate(settings)  # raises invalidParameter naming the setting
    checked_width = imageio.validate_dimension(width, "width")
    checked_height = imageio.validate_dimension(height, "height")
    visible = {
        **settings,
        "width": checked_width,
        "height": checked_height,
        "outputFormat": config.output_format,
        "outputQuality": config.output_quality,
    }
    result = _Checked(
        width=checked_width,
        height=checked_height,
        digest=settings_hash(name, visible),
        settings=settings,
        settings_json=json.dumps(settings, sort_keys=True, default=str),
    )
    if key is not None:
        if len(_checked_cache) >= _CHECKED_CACHE_MAX:
            _checked_cache.clear()
        _checked_cache[key] = result
    return result


def _row_error(row: ManifestRow, exc: GuideflowError, preprocessor: str | None) -> Outcome:
    return Outcome(
        status="error",
        row=row,
        preprocessor=preprocessor,
        error=ErrorObject.from_exception(exc),
        attempts=0,
    )
