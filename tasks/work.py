"""The units of pipeline work: run configuration, work items and their outcomes.

A manifest row becomes one :class:`WorkItem` per preprocessor; a backend turns each
item into an :class:`Outcome`; the ledger records every outcome. Everything here is a
plain, picklable dataclass so shards can travel to Dask workers.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from connectors.ledger import LedgerRow, settings_hash
from connectors.manifest import ManifestRow, ManifestSpec
from connectors.storage import output_key
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


@dataclass(frozen=True)
class WorkItem:
    """One (image, preprocessor) pair to produce, fully validated."""

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

    @property
    def key(self) -> tuple[str, str, str]:
        """The exactly-once identity: (image id, preprocessor, settings hash)."""
        return (self.image_id, self.preprocessor, self.settings_hash)

    @property
    def content_type(self) -> str:
        return imageio.content_type(self.output_format)


@dataclass
class Outcome:
    """What happened to one work item (or one bad manifest row)."""

    status: Literal["success", "error", "skipped"]
    item: WorkItem | None = None
    row: ManifestRow | None = None
    preprocessor: str | None = None
    error: ErrorObject | None = None
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
        cls, item: WorkItem, exc: GuideflowError | ErrorObject, *, started: float, attempts: int = 1
    ) -> Outcome:
        error = exc if isinstance(exc, ErrorObject) else ErrorObject.from_exception(exc)
        return cls(
            status="error",
            item=item,
            error=error,
            started_at=started,
            finished_at=time.time(),
            latency_ms=(time.time() - started) * 1000,
            attempts=attempts,
        )

    def to_ledger_row(self, run_id: str, shard: int, backend: str) -> LedgerRow:
        item, row = self.item, self.row
        settings = item.settings if item else (row.settings if row else {})
        return LedgerRow(
            run_id=run_id,
            shard=shard,
            row=item.row if item else (row.row if row else -1),
            image_id=item.image_id if item else (row.id if row else ""),
            input_uri=item.input_uri if item else ((row.image or "") if row else ""),
            preprocessor=(item.preprocessor if item else self.preprocessor) or "",
            variant=self.variant or "",
            settings_json=json.dumps(settings, sort_keys=True, default=str),
            settings_hash=item.settings_hash if item else "",
            task_uuid=item.task_uuid if item else "",
            status=self.status,
            error_code=self.error.code if self.error else None,
            error_message=self.error.message if self.error else None,
            error_parameter=self.error.parameter if self.error else None,
            output_uri=item.output_uri if (item and self.status == "success") else None,
            guide_image_uuid=self.guide_image_uuid,
            cost_usd=self.cost_usd,
            latency_ms=self.latency_ms,
            attempts=self.attempts,
            backend=backend,
            method=self.method,
            started_at=dt.datetime.fromtimestamp(self.started_at, tz=dt.UTC),
            finished_at=dt.datetime.fromtimestamp(self.finished_at, tz=dt.UTC),
        )


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
    name = registry.canonical_name(raw_name)
    row_settings = dict(row.settings)
    width = row_settings.pop("width", config.width)
    height = row_settings.pop("height", config.height)
    settings = {**dict(config.settings.get(name, {})), **row_settings}
    width, height, digest = _checked(name, settings, width, height, config)
    assert row.image is not None
    return WorkItem(
        shard=shard,
        row=row.row,
        image_id=row.id,
        input_uri=row.image,
        preprocessor=name,
        settings=settings,
        width=width,
        height=height,
        output_format=config.output_format,
        output_quality=config.output_quality,
        settings_hash=digest,
        task_uuid=stable_task_uuid(row.id, name, digest),
        output_uri=output_key(
            config.output_template,
            prefix=config.output.rstrip("/"),
            preprocessor=name,
            image_id=row.id,
            ext=imageio.file_extension(config.output_format),
        ),
    )


_checked_cache: dict[tuple[Any, ...], tuple[int | None, int | None, str]] = {}
_CHECKED_CACHE_MAX = 4096
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _checked(
    name: str, settings: dict[str, Any], width: Any, height: Any, config: RunConfig
) -> tuple[int | None, int | None, str]:
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
    result = (checked_width, checked_height, settings_hash(name, visible))
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
