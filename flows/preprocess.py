"""The main job: a manifest in object storage → guide images in object storage + a cost ledger.

manifest → shards → requests → service → upload → ledger:

1. :func:`connectors.manifest.plan_shards` streams the manifest once and yields small
   shard descriptors (manifest URL + row/byte range), never URI lists.
2. Each shard is one Prefect task (:func:`tasks.shard.process_shard`); at most
   ``max_shards_in_flight`` run at once, locally in threads or on a Dask cluster.
3. A shard fans requests out to the backend, writes guide images to
   ``<output>/<preprocessor>/<image_id>.<ext>`` (via presigned PUT for S3 and the
   HTTP backend) and writes one ledger file.
4. The flow keeps the budget, publishes progress/summary/contact-sheet artifacts and
   ends in a state that says what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from connectors.ledger import DoneIndex
from connectors.manifest import ManifestSpec, ShardSpec, plan_shards, read_shard
from flows.report import publish_summary, write_contact_sheet
from guideflow.errors import GuideflowError, InvalidParameter
from guideflow.memory import use_system_arrow_pool
from guideflow.pricing import PriceTable
from tasks.shard import ShardResult, forget_done_index, pooled_backends, process_shard
from tasks.work import Counts, RunConfig, expand_row

#: Called with (shards finished, images done, cost so far) after every shard; the CLI
#: registers its progress bar here (flow parameters must stay plain data).
MAX_SAMPLES = 16
PROGRESS_HOOKS: list[Callable[[ShardResult, RunSummary], None]] = []


@dataclass(kw_only=True)
class RunSummary(Counts):
    """What a run did, returned by the flow and printed by the CLI."""

    run_id: str
    shards: int = 0
    contact_sheet: str | None = None
    elapsed_s: float = 0.0

    def add(self, shard: ShardResult) -> None:
        self.shards += 1
        self.merge(shard, max_samples=MAX_SAMPLES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DryRunReport:
    """``--dry-run``: the work a run would do and its estimated cost."""

    rows: int = 0
    shards: int = 0
    work_items: int = 0
    already_done: int = 0
    invalid_rows: int = 0
    to_do_by_preprocessor: dict[str, int] = field(default_factory=dict)
    estimated_cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_config(**params: Any) -> RunConfig:
    """A :class:`RunConfig` from flat flow parameters (what deployments and the CLI pass)."""
    manifest = ManifestSpec(
        url=params.pop("manifest"),
        format=params.pop("manifest_format", None),
        image_column=params.pop("image_column", "image"),
        id_column=params.pop("id_column", "id"),
    )
    return RunConfig(manifest=manifest, preprocessors=tuple(params.pop("preprocessors")), **params)


def dry_run(config: RunConfig, prices: PriceTable | None = None) -> DryRunReport:
    """Stream the manifest once and count what a run would do (no requests, no writes)."""
    prices = prices or PriceTable.load()
    report = DryRunReport()
    # A fresh snapshot, never the process cache: a long-lived process must not estimate
    # from the ledger as it was when some earlier run started.
    index = None if config.force else DoneIndex.load(config.ledger)
    todo: Counter[str] = Counter()
    for shard in plan_shards(config.manifest, config.shard_size):
        report.shards += 1
        keys = []
        names = []
        for row in read_shard(shard):
            report.rows += 1
            items, errors = expand_row(row, shard.index, config)
            report.invalid_rows += bool(errors) and not items
            report.work_items += len(items)
            keys.extend(i.key for i in items)
            names.extend(i.preprocessor for i in items)
        done = index.contains(keys) if index is not None and keys else [False] * len(keys)
        for name, is_done in zip(names, done, strict=True):
            if is_done:
                report.already_done += 1
            else:
                todo[name] += 1
    report.to_do_by_preprocessor = dict(todo)
    report.estimated_cost_usd = round(sum(prices.price(n) * c for n, c in todo.items()), 10)
    return report


def _check_api_key(config: RunConfig) -> None:
    """Fail the run before any shard starts when the http backend has no API key.

    (Otherwise every shard would fail building its client and be retried in vain.) A
    *wrong* key is only known to the service: every row then gets ``invalidApiKey``.
    """
    if config.backend != "http" or config.api_key_secret_block:
        return
    if not os.environ.get(config.api_key_env, "").strip():
        raise InvalidParameter(
            f"the http backend needs an API key: set the environment variable "
            f"{config.api_key_env} (named by api_key_env)",
            parameter="api_key_env",
        )


async def _check_global_limit(name: str) -> None:
    """Fail loudly if the named Prefect global concurrency limit does not exist.

    (Prefect itself only logs a warning and then runs unlimited.)
    """
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
        except Exception as exc:
            raise InvalidParameter(
                f"Prefect global concurrency limit {name!r} does not exist "
                f"(create it with `prefect gcl create {name} --limit N`)",
                parameter="global_concurrency_limit",
            ) from exc


def _shard_iter(config: RunConfig) -> Iterator[ShardSpec]:
    return iter(plan_shards(config.manifest, config.shard_size))


async def _next_shard(shards: Iterator[ShardSpec]) -> ShardSpec | None:
    return await asyncio.to_thread(next, shards, None)


async def run_shards(config: RunConfig, run_id: str, run_date: str) -> RunSummary:
    """Schedule every shard with bounded concurrency and the budget; collect results.

    While the shards run, every object alive when they start (Prefect, pydantic's
    schemas, the engine: a few million) is frozen out of the garbage collector's reach,
    and young collections run every 20,000 allocations instead of 700: otherwise each
    full collection walks them all again, and a fast HTTP run spent a tenth of its CPU
    in the collector. Both are restored afterwards.
    """
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(threshold[0], 20_000), *threshold[1:])
    try:
        async with pooled_backends():
            return await _run_shards(config, run_id, run_date)
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


async def _run_shards(config: RunConfig, run_id: str, run_date: str) -> RunSummary:
    logger = get_run_logger()
    prices = PriceTable.load()
    summary = RunSummary(run_id=run_id)
    max_price = max(prices.price(p) for p in config.preprocessors)
    per_row = max_price * max(1, len(config.preprocessors))
    reserved: dict[int, float] = {}
    shards = _shard_iter(config)
    in_flight: dict[asyncio.Task[ShardResult], int] = {}
    stop = False
    # Progress goes to the Prefect API (an artifact update, 20-60 ms) off the scheduling
    # path: awaited inline, it held a finished shard's slot empty until it returned.
    # Updates are chained, one per finished shard, each with the counts as it runs.
    publishing: asyncio.Future[None] | None = None

    def remaining() -> float | None:
        if config.max_cost is None:
            return None
        return config.max_cost - summary.cost_usd - sum(reserved.values())

    while True:
        while not stop and len(in_flight) < max(1, config.max_shards_in_flight):
            shard = await _next_shard(shards)
            if shard is None:
                stop = True
                break
            allowance = None
            left = remaining()
            if left is not None:
                if left <= 1e-12:
                    summary.budget_exhausted = True
                    stop = True
                    break
                allowance = min(left, per_row * (shard.row_stop - shard.row_start))
                reserved[shard.index] = allowance
            waiter = asyncio.ensure_future(_start_shard(shard, config, run_id, allowance, run_date))
            in_flight[waiter] = shard.index
        if not in_flight:
            break
        finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for waiter in finished:
            index = in_flight.pop(waiter)
            reserved.pop(index, None)
            result = waiter.result()
            _forget_result(result)
            summary.add(result)  # (the shard added its successes to this process's done index)
            if result.budget_exhausted:
                stop = True
            for hook in PROGRESS_HOOKS:
                hook(result, summary)
            _log_shard_done(summary, logger)
        publishing = asyncio.ensure_future(_after(publishing, _progress(summary, config, logger)))
    if publishing is not None:
        await publishing
    return summary


async def _after(previous: Awaitable[None] | None, update: Awaitable[None]) -> None:
    """Run ``update`` once ``previous`` (an earlier progress update) has finished."""
    if previous is not None:
        await previous
    await update


def _forget_result(result: ShardResult) -> None:
    """Drop Prefect's in-memory record of a finished shard's result.

    The flow run context keeps every task result and its state (for data-dependency
    tracking between tasks); shard results feed no other task, and at 10,000 shards the
    records were the flow's only memory that grew with the manifest.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    records = getattr(context, "run_results", None)
    if isinstance(records, dict):
        records.pop(id(result), None)


def _start_shard(
    shard: ShardSpec, config: RunConfig, run_id: str, allowance: float | None, run_date: str
) -> Awaitable[ShardResult]:
    """One shard task run: on this event loop for the HTTP backend run locally, else submitted.

    Prefect's thread-pool task runner runs every task run in a fresh thread and event
    loop, where Prefect builds two new API clients, each creating an SSL context (parsing
    certifi's CA bundle): ~120 ms of CPU per shard (measured with bench/pipeline.py),
    more than an HTTP shard's own work when the service answers fast. Called directly,
    the task run (same retries, states and UI entry) shares the flow's client: ~6 ms.
    An HTTP shard is async I/O, so running it on the flow's loop loses no parallelism
    (one GIL either way). The local backend keeps a thread per shard (its per-image
    work dwarfs the task-run cost), and other task runners (Dask) get the task submitted.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    local = context is None or isinstance(context.task_runner, ThreadPoolTaskRunner)
    if local and config.backend == "http":
        return process_shard(shard, config, run_id, allowance, run_date)
    future = process_shard.submit(shard, config, run_id, allowance, run_date)
    return asyncio.to_thread(future.result)


_progress_ids: dict[str, Any] = {}


def _log_shard_done(summary: RunSummary, logger: Any) -> None:
    logger.info(
        "shard done: %d shards, %d ok, %d errors, $%.4f",
        summary.shards,
        summary.success,
        summary.errors,
        summary.cost_usd,
    )


async def _progress(
    summary: RunSummary, config: RunConfig, logger: Any, *, final: bool = False
) -> None:
    """Create or update the run's progress artifact (best effort: never fails the run)."""
    from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

    description = (
        f"{summary.shards} shards, {summary.success} guide images, {summary.errors} errors, "
        f"${summary.cost_usd:.4f}"
    )
    # Without a manifest row count (streamed, never counted up front) progress is shards
    # done over shards scheduled so far, which only reaches 100 when the run is over.
    progress = 100.0 if final else min(99.0, 100.0 * summary.shards / max(1, summary.shards + 1))
    with contextlib.suppress(Exception):  # artifacts are best effort, never fail a run
        artifact_id = _progress_ids.get(summary.run_id)
        if artifact_id is None:
            _progress_ids[summary.run_id] = await acreate_progress_artifact(
                progress, description=description
            )
        else:
            await aupdate_progress_artifact(artifact_id, progress, description=description)
    if final:
        _progress_ids.pop(summary.run_id, None)


@flow(name="guideflow-preprocess", persist_result=False, log_prints=True)
async def preprocess_manifest(
    manifest: str,
    preprocessors: list[str],
    output: str,
    ledger: str,
    backend: str = "local",
    endpoint: str | None = None,
    concurrency: int = 16,
    rate: float | None = None,
    batch_size: int = 20,
    shard_size: int = 1000,
    max_shards_in_flight: int = 2,
    output_format: str = "PNG",
    settings: dict[str, dict[str, Any]] | None = None,
    width: int | None = None,
    height: int | None = None,
    force: bool = False,
    dry_run_only: bool = False,
    max_cost: float | None = None,
    global_concurrency_limit: str | None = None,
    image_column: str = "image",
    id_column: str = "id",
    api_key_env: str = "RUNWARE_API_KEY",
    api_key_secret_block: str | None = None,
    request_timeout_s: float = 60.0,
    max_retries: int = 5,
    retry_backoff_s: float = 0.5,
) -> Any:
    """Turn every image of ``manifest`` into guide images with each of ``preprocessors``.

    Re-running the same manifest does no work and costs nothing (exactly once per
    image id, preprocessor and settings); ``force`` redoes. ``max_cost`` (USD) stops
    scheduling new work before the budget would be exceeded and ends the run in a
    ``BudgetReached`` state. ``request_timeout_s``, ``max_retries`` and ``retry_backoff_s``
    tune the HTTP backend's client (per-POST timeout, retries, first backoff).
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    started = time.monotonic()
    use_system_arrow_pool()  # flat memory over long runs (see guideflow.memory)
    config = build_config(
        manifest=manifest,
        preprocessors=preprocessors,
        output=output,
        ledger=ledger,
        backend=backend,
        endpoint=endpoint,
        concurrency=concurrency,
        rate=rate,
        batch_size=batch_size,
        shard_size=shard_size,
        max_shards_in_flight=max_shards_in_flight,
        output_format=output_format,
        settings=settings or {},
        width=width,
        height=height,
        force=force,
        max_cost=max_cost,
        global_concurrency_limit=global_concurrency_limit,
        image_column=image_column,
        id_column=id_column,
        api_key_env=api_key_env,
        api_key_secret_block=api_key_secret_block,
        request_timeout_s=request_timeout_s,
        max_retries=max_retries,
        retry_backoff_s=retry_backoff_s,
        dry_run=dry_run_only,
    )
    run_id = str(flow_run.get_id() or uuid.uuid4())
    forget_done_index(config.ledger)  # a fresh snapshot of the ledger for every run
    if dry_run_only:
        report = await asyncio.to_thread(dry_run, config)
        logger.info("dry run: %s", report.to_dict())
        return report
    _check_api_key(config)
    if config.global_concurrency_limit:
        await _check_global_limit(config.global_concurrency_limit)
    run_date = dt.datetime.now(dt.UTC).date().isoformat()
    summary = await run_shards(config, run_id, run_date)
    await _progress(summary, config, logger, final=True)
    summary.elapsed_s = time.monotonic() - started
    with contextlib.suppress(GuideflowError, OSError):
        summary.contact_sheet = await write_contact_sheet(config, summary, run_id)
    await publish_summary(config, summary)
    if summary.budget_exhausted:
        message = (
            f"budget of ${config.max_cost:.4f} reached: spent ${summary.cost_usd:.4f}; "
            f"{summary.success} guide images made, remaining work not scheduled"
        )
        logger.warning(message)
        return Completed(name="BudgetReached", message=message, data=summary)
    if summary.errors and not summary.success:
        return Failed(message=f"every item failed: {summary.errors_by_code}", data=summary)
    return summary


def flow_for(config: RunConfig, dask_address: str | None = None) -> Any:
    """The flow with the task runner this run needs (threads locally, or a Dask cluster)."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return preprocess_manifest.with_options(task_runner=DaskTaskRunner(address=dask_address))
    return preprocess_manifest.with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=max(1, config.max_shards_in_flight))
    )
