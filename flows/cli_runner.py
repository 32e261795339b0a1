"""``guideflow run``: run the preprocess flow in-process with a progress bar and a summary.

Exit codes: 0 every item succeeded (or nothing was left to do); 1 the run finished
but some rows failed (they are in the ledger with their error codes); 2 bad
arguments; 3 the budget was reached; 4 the flow itself failed.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows import preprocess as pipeline
from flows.prefect_api import temporary_prefect_api
from guideflow.errors import GuideflowError, InvalidParameter
from tasks.shard import warm_up

EXIT_OK, EXIT_ROW_ERRORS, EXIT_BUDGET, EXIT_FAILED = 0, 1, 3, 4


async def require_prefect_server() -> str:
    """Dask workers cannot reach an ephemeral Prefect API: insist on a real server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    fix = (
        "Dask mode needs a real Prefect server that the workers can reach: run "
        "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api "
        "(in this shell and on the workers)"
    )
    if not url:
        raise InvalidParameter(f"PREFECT_API_URL is not set. {fix}", parameter="dask_address")
    async with get_client() as client:
        problem = await client.api_healthcheck()
    if problem is not None:
        raise InvalidParameter(
            f"the Prefect server at {url} is not answering ({problem}). {fix}",
            parameter="dask_address",
        )
    return str(url)


def run_from_cli(
    *,
    dry_run: bool,
    dask_address: str | None,
    console: Console,
    err_console: Console,
    **params: Any,
) -> int:
    """Validate, run the flow (or a dry run), print the outcome, return the exit code."""
    config = pipeline.build_config(**dict(params))  # raises GuideflowError on bad arguments
    if dask_address:
        asyncio.run(require_prefect_server())
    flow = pipeline.flow_for(config, dask_address)
    if dry_run:
        report = pipeline.dry_run(config)
        _print_dry_run(console, report)
        return EXIT_OK

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not err_console.is_terminal,
    )
    bar = progress.add_task("starting", total=None)

    def hook(_shard: Any, summary: pipeline.RunSummary) -> None:
        progress.update(
            bar,
            description=(
                f"{summary.shards} shards · {summary.success} guide images · "
                f"{summary.errors} errors · ${summary.cost_usd:.4f}"
            ),
        )

    pipeline.PROGRESS_HOOKS.append(hook)
    # The first shard's one-time set-up (S3 client, signing, SSL) in parallel with starting
    # Prefect (a server subprocess, the flow run's creation), which mostly waits.
    threading.Thread(target=warm_up, args=(config,), name="guideflow-warm-up", daemon=True).start()
    flow_params = dict(params)
    flow_params["preprocessors"] = list(flow_params["preprocessors"])
    try:
        with temporary_prefect_api(), progress:
            state = asyncio.run(flow(**flow_params, return_state=True))
            try:
                result = state.result(raise_on_failure=False)
                if asyncio.iscoroutine(result):
                    result = asyncio.run(result)
            except Exception as exc:  # the flow crashed: report its message, not a traceback
                err_console.print(f"[red]run failed:[/red] {exc}")
                return EXIT_FAILED
    finally:
        pipeline.PROGRESS_HOOKS.remove(hook)
    if isinstance(result, BaseException):
        if isinstance(result, GuideflowError):
            raise result
        err_console.print(f"[red]run failed:[/red] {state.message or result}")
        return EXIT_FAILED
    if not isinstance(result, pipeline.RunSummary):
        err_console.print(f"[red]run failed:[/red] {state.message}")
        return EXIT_FAILED
    _print_summary(console, result, state)
    if state.name == "BudgetReached":
        err_console.print(f"[yellow]{state.message}[/yellow]")
        return EXIT_BUDGET
    if state.is_failed():
        return EXIT_FAILED
    return EXIT_ROW_ERRORS if result.errors else EXIT_OK


def _print_summary(console: Console, summary: pipeline.RunSummary, state: Any) -> None:
    table = Table(title=f"guideflow run {summary.run_id} · {state.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("shards", summary.shards),
        ("manifest rows", summary.rows),
        ("guide images made", summary.success),
        ("errors", summary.errors),
        ("already in ledger (skipped)", summary.already_done),
        ("duplicates skipped", summary.skipped),
        ("not started (budget)", summary.not_started),
        ("cost (USD)", f"{summary.cost_usd:.4f}"),
        ("elapsed (s)", f"{summary.elapsed_s:.1f}"),
    ]
    rows += [(f"error: {k}", n) for k, n in sorted(summary.errors_by_code.items())]
    rows += [(f"cost: {k}", f"{v:.4f}") for k, v in sorted(summary.cost_by_preprocessor.items())]
    if summary.contact_sheet:
        rows.append(("contact sheet", summary.contact_sheet))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def _print_dry_run(console: Console, report: pipeline.DryRunReport) -> None:
    table = Table(title="guideflow dry run (nothing was done)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in (
        ("manifest rows", report.rows),
        ("shards", report.shards),
        ("work items (image × preprocessor)", report.work_items),
        ("already in ledger", report.already_done),
        ("invalid rows", report.invalid_rows),
        *((f"to do: {k}", v) for k, v in sorted(report.to_do_by_preprocessor.items())),
        ("estimated cost (USD)", f"{report.estimated_cost_usd:.4f}"),
    ):
        table.add_row(name, str(value))
    console.print(table)
