"""One Prefect task per shard: rows → work items → backend requests → one ledger file.

A shard is the unit of orchestration (Prefect costs milliseconds and kilobytes per
task run, so never one task per image) and the unit of durability: its ledger file
is written once, atomically, when the shard is finished. A crash loses at most the
shards in flight; the next run skips every (image id, preprocessor, settings hash)
with a success row and redoes the rest.

Inside a shard, requests fan out with asyncio under a concurrency cap, an optional
rate limit, an optional Prefect global concurrency limit and the shard's share of
the cost budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from connectors import storage
from connectors.ledger import DoneIndex, LedgerWriter
from connectors.manifest import ShardSpec, read_shard
from guideflow.memory import release_free_heap
from guideflow.pricing import PriceTable
from guideflow.protocol import ErrorObject
from tasks.backends import HttpBackend, LocalBackend, ServiceBackend
from tasks.limits import Budget, RateLimiter
from tasks.work import Counts, Outcome, RunConfig, WorkItem, expand_row, ledger_table


@dataclass(kw_only=True)
class ShardResult(Counts):
    """What a finished shard reports back to the flow (small, picklable)."""

    shard: int
    ledger_path: str | None = None


# -- process-wide state: one done-index per ledger, shared by shards in this process ----------

_done_lock = threading.Lock()
_done_cache: dict[str, tuple[str | None, DoneIndex]] = {}
#: (ledger, run id) → work key → index of the shard of this process now producing it.
_claims: dict[tuple[str, str], dict[tuple[str, str, str], int]] = {}


def done_index(ledger: str, run_id: str | None = None) -> DoneIndex:
    """The success keys already in ``ledger``: loaded once per run per process, then extended.

    The first shard of a new ``run_id`` reloads it, so a long-lived worker process (a Dask
    worker serving run after run) sees what earlier runs wrote; ``run_id=None`` takes
    whatever is cached.
    """
    with _done_lock:
        cached = _done_cache.get(ledger)
        if cached is None or (run_id is not None and cached[0] != run_id):
            cached = (run_id, DoneIndex.load(ledger))
            _done_cache[ledger] = cached
        return cached[1]


def forget_done_index(ledger: str) -> None:
    with _done_lock:
        _done_cache.pop(ledger, None)


def _claim(
    ledger: str, run_id: str, shard: int, items: list[WorkItem], index: DoneIndex | None
) -> tuple[list[WorkItem], int, list[WorkItem]]:
    """Split ``items`` into (to do, how many already done, being done by another shard).

    Looking up the done index and claiming keys happen under one lock, and a shard adds
    its successes to the index before it releases its claims (:func:`_release`), so two
    shards of a run in this process never produce the same key (a manifest listing the
    same image id in two shards in flight at once). Claims live only while their shard
    runs: memory stays bounded by the shards in flight.
    """
    keys = [i.key for i in items]
    with _done_lock:
        done = index.contains(keys) if index is not None else [False] * len(keys)
        claims = _claims.setdefault((ledger, run_id), {})
        todo: list[WorkItem] = []
        taken: list[WorkItem] = []
        for item, is_done in zip(items, done, strict=True):
            if is_done:
                continue
            if claims.setdefault(item.key, shard) == shard:
                todo.append(item)
            else:
                taken.append(item)
        return todo, int(sum(bool(x) for x in done)), taken


def _release(
    ledger: str,
    run_id: str,
    shard: int,
    index: DoneIndex | None,
    succeeded: list[tuple[str, str, str]],
) -> None:
    """Mark ``succeeded`` done (once its ledger file is written), then drop the shard's claims."""
    with _done_lock:
        if index is not None and succeeded:
            index.add(succeeded)
        claims = _claims.get((ledger, run_id), {})
        for key in [k for k, owner in claims.items() if owner == shard]:
            del claims[key]
        if not claims:
            _claims.pop((ledger, run_id), None)


class BackendPool:
    """Idle backends of one run on one event loop, handed from finished shards to new ones.

    A shard used to open its own client: a fresh connection pool (TCP handshakes, TLS
    against a real service) for every thousand images. Shards of a run that execute on
    the flow's event loop (the HTTP backend run locally) now take an idle backend made
    for the same settings, and give it back when done; at most one per shard in flight
    is ever made. Shards on other loops (worker threads, Dask) make their own.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._idle: dict[tuple[Any, ...], list[ServiceBackend]] = {}

    @staticmethod
    def _key(config: RunConfig) -> tuple[Any, ...]:
        return (
            config.backend,
            config.endpoint,
            config.api_key_env,
            config.api_key_secret_block,
            config.batch_size,
            config.concurrency,
            config.request_timeout_s,
            config.max_retries,
            config.retry_backoff_s,
            config.output_format,
            config.output_quality,
            config.presign_expiry_s,
        )

    async def acquire(self, config: RunConfig) -> ServiceBackend:
        idle = self._idle.get(self._key(config))
        return idle.pop() if idle else await make_backend(config)

    def release(self, config: RunConfig, backend: ServiceBackend) -> None:
        self._idle.setdefault(self._key(config), []).append(backend)

    async def aclose(self) -> None:
        backends = [b for idle in self._idle.values() for b in idle]
        self._idle.clear()
        for backend in backends:
            with contextlib.suppress(Exception):
                await backend.aclose()


_pool: contextvars.ContextVar[BackendPool | None] = contextvars.ContextVar(
    "guideflow_backend_pool", default=None
)


@contextlib.asynccontextmanager
async def pooled_backends() -> AsyncIterator[BackendPool]:
    """Within this block, shards run on this event loop reuse each other's backends."""
    pool = BackendPool()
    token = _pool.set(pool)
    try:
        yield pool
    finally:
        _pool.reset(token)
        await pool.aclose()


def _loop_pool() -> BackendPool | None:
    pool = _pool.get()
    return pool if pool is not None and pool.loop is asyncio.get_running_loop() else None


def warm_up(config: RunConfig) -> None:
    """Do ahead the one-time set-up a run's first shard would otherwise pay for.

    The engine's registry (prices and rows are checked against it), the shared
    SSL context of the HTTP client, and for ``s3://`` outputs the S3 filesystem and, for
    the HTTP backend, the output bucket's signing templates (building botocore's client
    is 0.2-0.5 s of CPU). ``guideflow run`` calls this in a thread while it starts
    Prefect, which mostly waits on I/O; the first shard then finds it all done. Never
    raises: anything that fails here fails again, with its error, where it is needed.
    """
    with contextlib.suppress(Exception):
        from engine import registry

        registry.get(config.preprocessors[0])  # imports every preprocessor module
    if config.backend == "http":
        with contextlib.suppress(Exception):
            from connectors.runware import shared_ssl_context

            shared_ssl_context()
    if storage.is_s3(config.output):
        with contextlib.suppress(Exception):
            if config.backend == "http":
                storage.warm_presigning(config.output)
            else:
                storage.default_s3_fs()


async def make_backend(config: RunConfig) -> ServiceBackend:
    """The backend for ``config`` (an HTTP client is bound to the calling event loop).

    The API key comes from the Prefect Secret block ``api_key_secret_block`` when one
    is named, else from the environment variable ``api_key_env``.
    """
    if config.backend == "local":
        return LocalBackend(config)
    import os

    from connectors.runware import RunwareClient

    options = {
        "base_url": config.endpoint or "https://api.runware.ai/v1",
        "batch_size": config.batch_size,
        "max_concurrency": config.concurrency,
        "timeout": config.request_timeout_s,
        "max_retries": config.max_retries,
        "backoff_base": config.retry_backoff_s,
    }
    if config.api_key_secret_block:
        client = await RunwareClient.from_prefect_secret(config.api_key_secret_block, **options)
    else:
        client = RunwareClient(api_key=os.environ.get(config.api_key_env), **options)
    return HttpBackend(config, client)


def _chunks(items: Sequence[WorkItem], config: RunConfig) -> Iterator[list[WorkItem]]:
    """Requests: one image per request locally; up to ``batch_size`` tasks per POST over HTTP.

    Items of one image stay in one request so an uploaded input is reused.
    """
    group: list[WorkItem] = []
    limit = 1 if config.backend == "local" else config.batch_size
    for item in items:
        same_image = bool(group) and group[-1].input_uri == item.input_uri
        if group and not same_image and _images(group) >= limit:
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _images(group: list[WorkItem]) -> int:
    return len({i.input_uri for i in group}) if len(group) > 1 else 1


@contextlib.asynccontextmanager
async def _global_slot(name: str | None) -> AsyncIterator[None]:
    if name is None:
        yield
        return
    from prefect.concurrency.asyncio import concurrency

    async with concurrency(name, occupy=1):
        yield


async def run_shard(
    shard: ShardSpec,
    config: RunConfig,
    run_id: str,
    *,
    allowance: float | None = None,
    backend: ServiceBackend | None = None,
    done: DoneIndex | None = None,
    prices: PriceTable | None = None,
    run_date: str | None = None,
) -> ShardResult:
    """Process one shard and write its ledger file; see the module docstring.

    ``run_date`` (YYYY-MM-DD, the run's start) keeps a shard retried after midnight
    in the same ledger partition.
    """
    prices = prices or PriceTable.load()
    result = ShardResult(shard=shard.index)
    rows = await asyncio.to_thread(lambda: list(read_shard(shard)))
    result.rows = len(rows)

    items: list[WorkItem] = []
    outcomes: list[Outcome] = []
    seen: set[tuple[str, str, str]] = set()
    for row in rows:
        row_items, row_errors = expand_row(row, shard.index, config)
        outcomes.extend(row_errors)
        for item in row_items:
            if item.key in seen:  # the same work twice in the manifest: do it once
                outcomes.append(_duplicate(item, "already in this shard"))
                continue
            seen.add(item.key)
            items.append(item)

    index = None
    if not config.force:
        index = done if done is not None else done_index(config.ledger, run_id)
    items, result.already_done, taken = _claim(config.ledger, run_id, shard.index, items, index)
    outcomes.extend(_duplicate(item, "another shard of this run is doing") for item in taken)
    succeeded: list[tuple[str, str, str]] = []
    try:
        succeeded = await _produce(
            shard, config, run_id, result, items, outcomes, allowance, backend, prices, run_date
        )
    finally:  # (nothing is marked done unless the shard's ledger file was written)
        _release(config.ledger, run_id, shard.index, index, succeeded)
    return result


def _duplicate(item: WorkItem, where: str) -> Outcome:
    """The skipped outcome of a row that repeats work done elsewhere (``duplicateRow``)."""
    return Outcome(
        status="skipped",
        item=item,
        attempts=0,
        error=ErrorObject(code="duplicateRow", message=f"row {item.row} repeats work {where}"),
    )


async def _produce(
    shard: ShardSpec,
    config: RunConfig,
    run_id: str,
    result: ShardResult,
    items: list[WorkItem],
    outcomes: list[Outcome],
    allowance: float | None,
    backend: ServiceBackend | None,
    prices: PriceTable,
    run_date: str | None,
) -> list[tuple[str, str, str]]:
    """Send ``items`` under the shard's limits and budget, then write the shard's ledger file.

    Fills in ``result``; returns the keys produced (kept out of the result, which Prefect
    holds on to for the whole flow run).
    """
    budget = Budget(allowance)
    limiter = RateLimiter(config.rate)
    semaphore = asyncio.Semaphore(max(1, config.concurrency))
    own_backend = backend is None
    pool = _loop_pool() if own_backend else None
    if backend is None:
        backend = await pool.acquire(config) if pool is not None else await make_backend(config)

    async def send(chunk: list[WorkItem]) -> list[Outcome]:
        async with semaphore:
            price = sum(prices.price(i.preprocessor) for i in chunk)
            if not budget.try_reserve(price):
                return []
            await limiter.acquire(len(chunk))
            async with _global_slot(config.global_concurrency_limit):
                done_chunk = await backend.run(chunk)
            budget.settle(price, sum(o.cost_usd for o in done_chunk if o.status == "success"))
            return done_chunk

    processed = 0
    reusable = False
    try:
        chunks = list(_chunks(items, config))
        for group in await asyncio.gather(*(send(c) for c in chunks)):
            processed += len(group)
            outcomes.extend(group)
        reusable = True
    finally:
        if pool is not None and reusable:
            pool.release(config, backend)
        elif own_backend:
            await backend.aclose()

    result.not_started = len(items) - processed
    result.budget_exhausted = budget.exhausted
    succeeded = _tally(result, outcomes, config)
    if outcomes:
        table = ledger_table(outcomes, run_id, shard.index, backend.name)
        result.ledger_path = await asyncio.to_thread(
            _write_ledger, config.ledger, run_id, shard.index, table, run_date
        )
    return succeeded


def _write_ledger(ledger: str, run_id: str, shard: int, table: Any, run_date: str | None) -> str:
    """Write one shard's ledger file, then hand the freed heap back to the OS.

    A shard's outcomes, requests and parquet buffers are freed here; glibc keeps freed
    memory in per-thread arenas, so a long run's RSS crept up shard after shard (60-70
    MB over 1M images) although Python's own objects did not grow.
    """
    path = LedgerWriter(ledger).write_shard(run_id, shard, table, run_date)
    release_free_heap()
    return path


def _tally(
    result: ShardResult, outcomes: list[Outcome], config: RunConfig
) -> list[tuple[str, str, str]]:
    """Count ``outcomes`` into ``result``; the keys of the successes."""
    succeeded: list[tuple[str, str, str]] = []
    codes: Counter[str] = Counter()
    cost: Counter[str] = Counter()
    for o in outcomes:
        if o.status == "success":
            assert o.item is not None
            result.success += 1
            result.cost_usd += o.cost_usd
            cost[o.item.preprocessor] += o.cost_usd
            succeeded.append(o.item.key)
            if len(result.samples) < config.contact_sheet_samples:
                result.samples.append((o.item.input_uri, o.item.output_uri, o.item.preprocessor))
        elif o.status == "error":
            result.errors += 1
            codes[o.error.code if o.error else "unknown"] += 1
        else:
            result.skipped += 1
    result.errors_by_code = dict(codes)
    result.cost_by_preprocessor = dict(cost)
    return succeeded


@task(
    name="guideflow-shard",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    persist_result=False,
    cache_policy=NO_CACHE,
)
async def process_shard(
    shard: ShardSpec,
    config: RunConfig,
    run_id: str,
    allowance: float | None = None,
    run_date: str | None = None,
) -> ShardResult:
    """Prefect task: one shard, retried as a whole (with backoff and jitter) on failure.

    Per-request retries live in the client; a shard only fails as a whole when
    storage is down (manifest or ledger unreachable), and then Prefect retries it.
    """
    return await run_shard(shard, config, run_id, allowance=allowance, run_date=run_date)
