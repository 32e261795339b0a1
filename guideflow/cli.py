"""The ``guideflow`` command line: preprocess files, manage models (and later serve/run/ledger).

Each subcommand is a thin layer over the library: ``preprocess`` calls
:class:`engine.Engine`, ``models`` calls :mod:`engine.models`. Errors caused by
input are printed as Runware error objects (JSON) and make the exit code
non-zero, but never stop the other inputs.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from guideflow.errors import GuideflowError, InvalidParameter

app = typer.Typer(
    name="guideflow",
    help="ControlNet guide images at scale: Runware's 12 preprocessors, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List, download and verify model weights.", no_args_is_help=True)
app.add_typer(models_app, name="models")
ledger_app = typer.Typer(help="Read the parquet run ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")

out = Console()
err = Console(stderr=True)


def _parse_set(values: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as JSON when they can be (numbers, bools)."""
    settings: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InvalidParameter(f"--set expects key=value, got {item!r}", parameter="set")
        try:
            settings[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = raw
    return settings


def _print_error(source: str, error: GuideflowError) -> None:
    obj = error.to_error_object(task_type="controlNetPreprocess")
    obj["input"] = source
    err.print_json(json.dumps(obj))


@app.command()
def preprocess(
    images: Annotated[list[Path], typer.Argument(help="Input image files.", show_default=False)],
    type_: Annotated[
        str, typer.Option("--type", "-t", help="Preprocessor name, e.g. canny, depth, openpose.")
    ],
    output_dir: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path(
        "out"
    ),
    width: Annotated[int | None, typer.Option(help="Downscale to this width.")] = None,
    height: Annotated[int | None, typer.Option(help="Downscale to this height.")] = None,
    low: Annotated[int | None, typer.Option(help="canny: lowThresholdCanny.")] = None,
    high: Annotated[int | None, typer.Option(help="canny: highThresholdCanny.")] = None,
    seed: Annotated[int | None, typer.Option(help="shuffle/tile: random seed.")] = None,
    variant: Annotated[str | None, typer.Option(help="Preprocessor variant.")] = None,
    hands_and_face: Annotated[
        bool | None,
        typer.Option("--hands-and-face/--body-only", help="openpose: includeHandsAndFaceOpenPose."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any other setting as key=value (repeatable)."),
    ] = None,
    output_format: Annotated[str, typer.Option("--format", help="PNG, JPG or WEBP.")] = "PNG",
    quality: Annotated[int, typer.Option(help="outputQuality 20-99 (JPG/WEBP).")] = 95,
    jobs: Annotated[int, typer.Option(help="Images processed in parallel.")] = min(
        4, os.cpu_count() or 1
    ),
) -> None:
    """Make guide images for IMAGES with one preprocessor and write them to --output.

    Bad inputs are reported as Runware error objects on stderr and the command
    goes on with the rest; the exit code is 1 if any input failed.
    """
    from engine import Engine, imageio

    try:
        settings = _parse_set(set_ or [])
        named = {
            "lowThresholdCanny": low,
            "highThresholdCanny": high,
            "seed": seed,
            "variant": variant,
            "includeHandsAndFaceOpenPose": hands_and_face,
        }
        settings.update({k: v for k, v in named.items() if v is not None})
        engine = Engine()
        request = engine.prepare(
            type_,
            settings,
            width=width,
            height=height,
            output_format=output_format,
            output_quality=quality,
        )
    except GuideflowError as exc:
        _print_error("<arguments>", exc)
        raise typer.Exit(2) from None

    output_dir.mkdir(parents=True, exist_ok=True)
    ext = imageio.file_extension(request.output_format)

    def one(path: Path) -> tuple[Path, Path | None, GuideflowError | None]:
        try:
            try:
                data = path.read_bytes()
            except OSError as exc:
                message = f"cannot read {path}: {exc.strerror}"
                raise InvalidParameter(message, parameter="inputImage") from None
            guide = engine.run(request, data)
            target = output_dir / f"{path.stem}.{request.preprocessor.name}.{ext}"
            target.write_bytes(guide.data)
            return path, target, None
        except GuideflowError as exc:
            return path, None, exc

    failures = 0
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
    )
    with progress, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        task = progress.add_task(request.preprocessor.name, total=len(images))
        for path, target, error in pool.map(one, images):
            progress.advance(task)
            if error is not None:
                failures += 1
                _print_error(str(path), error)
            else:
                out.print(f"{path} -> {target}", highlight=False)
    if failures:
        err.print(f"[red]{failures} of {len(images)} inputs failed[/red]")
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the comma-separated API keys.")
    ] = "GUIDEFLOW_API_KEYS",
    workers: Annotated[
        int, typer.Option(help="Preprocessing threads (default: CPU count).")
    ] = os.cpu_count() or 1,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Run without API keys (explicit opt-in).")
    ] = False,
    allow_net: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-net",
            help="CIDR or host name that outbound URLs may reach although private "
            "(repeatable; adds to $GUIDEFLOW_NET_ALLOW).",
        ),
    ] = None,
    public_url: Annotated[
        str | None, typer.Option(help="Base URL for guideImageURL (default: the request's).")
    ] = None,
    ttl: Annotated[int, typer.Option(help="Default lifetime of image URLs, seconds.")] = 86_400,
    storage_dir: Annotated[
        Path | None, typer.Option(help="Where images are stored (default: a temp dir).")
    ] = None,
    queue_size: Annotated[
        int | None,
        typer.Option(
            help="Tasks queued+running at most (default: max(256, 32 x workers)).",
        ),
    ] = None,
    max_body_mb: Annotated[int, typer.Option(help="Request body limit in MiB.")] = 64,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    fault_rate: Annotated[
        float | None,
        typer.Option(
            help="TEST ONLY: share of POST /v1 requests answered with an injected fault "
            "(429, 5xx, delay, dropped connection, truncated JSON, failed upload). Off by "
            "default.",
            rich_help_panel="Testing",
        ),
    ] = None,
    faults: Annotated[
        str | None,
        typer.Option(
            "--faults",
            help='TEST ONLY: fault injection settings as JSON, e.g. \'{"rate": 0.2, "seed": 1, '
            '"weights": {"429": 2, "drop": 1}, "retry_after": 1, "delay_s": 35}\' '
            "(see engine/server/faults.py); --fault-rate overrides its rate. Counters at "
            "GET /faults/stats.",
            rich_help_panel="Testing",
        ),
    ] = None,
) -> None:
    """Run the Runware-compatible HTTP server (POST /v1) on HOST:PORT under uvicorn."""
    import logging

    import uvicorn

    from engine.server import ServerConfig, create_app, load_api_keys
    from guideflow.netguard import NetPolicy

    keys = load_api_keys(api_key_env)
    if not keys and not no_auth:
        err.print(f"[red]no API keys: set {api_key_env} (comma-separated) or pass --no-auth[/red]")
        raise typer.Exit(2)
    try:
        fault_config = _fault_config(fault_rate, faults)
    except ValueError as exc:
        err.print(f"[red]invalid fault injection settings: {exc}[/red]")
        raise typer.Exit(2) from None
    env_policy = NetPolicy.from_env()
    config = ServerConfig(
        api_keys=keys,
        no_auth=no_auth,
        workers=workers,
        queue_size=queue_size,
        public_url=public_url,
        ttl=ttl,
        storage_dir=storage_dir,
        max_body_bytes=max_body_mb * 1024 * 1024,
        net_policy=NetPolicy(allow=(*env_policy.allow, *(allow_net or []))),
        faults=fault_config,
    )
    try:
        application = create_app(config)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if no_auth:
        err.print(
            "[yellow]warning: --no-auth: the server accepts requests without an API key[/yellow]"
        )
    if fault_config is not None:
        err.print(
            f"[yellow]warning: FAULT INJECTION ON (test only): {fault_config.rate:.0%} of "
            "POST /v1 requests get a fault[/yellow]"
        )
    uvicorn.run(application, host=host, port=port, log_level=log_level.lower())


def _fault_config(rate: float | None, raw: str | None) -> Any:
    """``--fault-rate`` / ``--faults`` as a FaultConfig, or None when neither was given."""
    from dataclasses import replace

    from engine.server.faults import FaultConfig

    if rate is None and raw is None:
        return None
    config = FaultConfig.from_json(raw) if raw is not None else FaultConfig()
    if rate is not None:
        config = replace(config, rate=rate)
    config.validate()
    return config


@models_app.command("list")
def models_list() -> None:
    """Every model the preprocessors use: licence, size, checksum and where it was found."""
    from engine.models.catalog import catalog
    from engine.models.store import default_store

    store = default_store()
    table = Table("model", "used by", "licence", "size", "sha256", "status")
    for name, entry in catalog().items():
        spec = entry.spec
        found = store.locate(spec)
        status = f"found: {found}" if found else "missing"
        table.add_row(
            name,
            ", ".join(entry.used_by),
            spec.license,
            f"{spec.size / 1e6:.1f} MB" if spec.size else "?",
            spec.sha256[:12] or "unpinned",
            status,
        )
    out.print(table)


@models_app.command("pull")
def models_pull(
    names: Annotated[list[str], typer.Argument(help="Model names (see `guideflow models list`).")],
) -> None:
    """Download (or find) and verify the named models."""
    from engine.models.catalog import get_spec
    from engine.models.store import default_store

    failed = 0
    for name in names:
        try:
            path = default_store().resolve(get_spec(name))
            out.print(f"{name}: ok ({path})")
        except GuideflowError as exc:
            failed += 1
            _print_error(name, exc)
    if failed:
        raise typer.Exit(1)


@models_app.command("verify")
def models_verify() -> None:
    """Check the sha256 of every model that is present locally; exit 1 on any mismatch."""
    from engine.models.catalog import catalog
    from engine.models.store import default_store

    store = default_store()
    bad = 0
    for name, entry in catalog().items():
        path = store.locate(entry.spec)
        if path is None:
            out.print(f"{name}: missing")
            continue
        try:
            store.verify(entry.spec, path)
            out.print(f"{name}: ok")
        except GuideflowError as exc:
            bad += 1
            _print_error(name, exc)
    if bad:
        raise typer.Exit(1)


@ledger_app.command("summary")
def ledger_summary(
    ledger_url: Annotated[
        str,
        typer.Argument(help="Ledger root: a path, file://, s3://, gs://...", show_default=False),
    ],
    by: Annotated[
        str, typer.Option("--by", help="Group by: preprocessor, day or run.")
    ] = "preprocessor",
) -> None:
    """Counts by status, errors by code and cost in a run ledger, with a total line.

    S3 credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or GUIDEFLOW_S3_ENDPOINT).
    """
    from connectors import ledger

    try:
        summary = ledger.summarize(ledger_url, by=by)  # type: ignore[arg-type]
    except GuideflowError as exc:
        _print_error(ledger_url, exc)
        raise typer.Exit(2) from None
    except (OSError, ValueError) as exc:  # unreadable store or file (ArrowInvalid is a ValueError)
        message = f"cannot read ledger {ledger_url}: {exc}"
        err.print(message, style="red", markup=False, highlight=False)
        raise typer.Exit(1) from None
    if summary.empty:
        err.print(f"no ledger rows at {ledger_url}", highlight=False)
        raise typer.Exit(1)

    def cells(counts: Any) -> list[str]:
        codes = ", ".join(f"{code}: {n}" for code, n in counts["errors_by_code"].items())
        numbers = [str(int(counts[c])) for c in ("success", "error", "skipped", "total")]
        return [*numbers, f"{counts['cost_usd']:.4f}", codes or "-"]

    table = Table(by, "success", "error", "skipped", "total", "cost_usd", "errors by code")
    for i, (name, counts) in enumerate(summary.iterrows()):
        table.add_row(str(name), *cells(counts), end_section=i == len(summary) - 1)
    table.add_row("total", *cells(ledger.summary_totals(summary)), style="bold")
    out.print(table)


def _parse_run_settings(values: list[str]) -> dict[str, dict[str, Any]]:
    """``--set canny.lowThresholdCanny=50`` → ``{"canny": {"lowThresholdCanny": 50}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in _parse_set(values).items():
        name, dot, setting = key.partition(".")
        if not dot or not setting:
            raise InvalidParameter(
                f"--set for run expects preprocessor.setting=value, got {key!r}", parameter="set"
            )
        out.setdefault(name, {})[setting] = value
    return out


@app.command()
def run(
    manifest: Annotated[str, typer.Argument(help="Manifest URL: CSV, Parquet, JSONL or text.")],
    preprocessor: Annotated[
        list[str], typer.Option("--preprocessor", "-p", help="Preprocessor (repeatable).")
    ],
    output: Annotated[str, typer.Option(help="Output prefix URL (s3://, file path, ...).")],
    ledger: Annotated[str, typer.Option(help="Ledger dataset URL.")],
    backend: Annotated[str, typer.Option(help="local (embedded engine) or http.")] = "local",
    endpoint: Annotated[
        str | None, typer.Option(help="Runware-compatible /v1 URL for --backend http.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight per process.")] = 16,
    rate: Annotated[float | None, typer.Option(help="Max tasks per second.")] = None,
    batch_size: Annotated[int, typer.Option(help="Tasks per POST (http backend).")] = 20,
    shard_size: Annotated[int, typer.Option(help="Manifest rows per shard task.")] = 1000,
    shards_in_flight: Annotated[int, typer.Option(help="Shards running at once.")] = 2,
    output_format: Annotated[str, typer.Option("--format", help="PNG, JPG or WEBP.")] = "PNG",
    width: Annotated[int | None, typer.Option(help="Downscale guides to this width.")] = None,
    height: Annotated[int | None, typer.Option(help="Downscale guides to this height.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="preprocessor.setting=value (repeatable)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the work and its cost; do nothing.")] = False,
    max_cost: Annotated[float | None, typer.Option(help="Budget in USD for this run.")] = None,
    force: Annotated[bool, typer.Option(help="Redo work the ledger already has.")] = False,
    dask_address: Annotated[
        str | None, typer.Option(help="tcp://scheduler:8786 to run shards on Dask.")
    ] = None,
    global_limit: Annotated[
        str | None, typer.Option(help="Prefect global concurrency limit name.")
    ] = None,
    image_column: Annotated[str, typer.Option(help="Manifest column with the URI.")] = "image",
    api_key_env: Annotated[
        str, typer.Option(help="Env var holding the API key (http backend).")
    ] = "RUNWARE_API_KEY",
    api_key_secret: Annotated[
        str | None, typer.Option(help="Prefect Secret block holding the API key instead.")
    ] = None,
) -> None:
    """Turn every image of MANIFEST into guide images and log each one's cost to the ledger.

    Re-running does no work for images already in the ledger (--force redoes).
    """
    from flows.cli_runner import run_from_cli

    try:
        settings = _parse_run_settings(set_ or [])
        code = run_from_cli(
            manifest=manifest,
            preprocessors=preprocessor,
            output=output,
            ledger=ledger,
            backend=backend,
            endpoint=endpoint,
            concurrency=concurrency,
            rate=rate,
            batch_size=batch_size,
            shard_size=shard_size,
            max_shards_in_flight=shards_in_flight,
            output_format=output_format,
            width=width,
            height=height,
            settings=settings,
            dry_run=dry_run,
            max_cost=max_cost,
            force=force,
            dask_address=dask_address,
            global_concurrency_limit=global_limit,
            image_column=image_column,
            api_key_env=api_key_env,
            api_key_secret_block=api_key_secret,
            console=out,
            err_console=err,
        )
    except GuideflowError as exc:
        _print_error("<arguments>", exc)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except GuideflowError as exc:  # a last resort: never a bare traceback for user errors
        _print_error("<guideflow>", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
