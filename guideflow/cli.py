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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except GuideflowError as exc:  # a last resort: never a bare traceback for user errors
        _print_error("<guideflow>", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
