"""Benchmark the pipeline's own overhead and memory: ``guideflow run`` vs a bare client loop.

Usage::

    .venv/bin/python bench/pipeline.py                       # defaults: a few minutes
    .venv/bin/python bench/pipeline.py --rows 50000 --scenario s3
    .venv/bin/python bench/pipeline.py --full                # 1M real run, 10M dry run
    .venv/bin/python bench/pipeline.py --only memory --mem-dry 1000000 --mem-real 0
    .venv/bin/python bench/pipeline.py --json out.json       # also write the results

**Orchestration overhead.** ``guideflow run --backend http`` (in-process, exactly what
the CLI calls) against :mod:`bench.instant_server` — a Runware-compatible server in a
separate process that answers every task at once — versus a bare asyncio + httpx loop
that POSTs the same task bodies, in the same batches, with the same number of POSTs in
flight, to the same server (the goal's reference), and the same loop over aiohttp (the
wire guideflow's client uses: see :mod:`connectors.http_wire`), to show guideflow's own
overhead on the same wire. The server costs both sides the same; what differs is the
pipeline's work: reading the manifest, validating rows, settings hashes, stable task
UUIDs, the protocol models, the client's result parsing, storage calls, the ledger
files, Prefect task runs and artifacts. Two scenarios:

``inline``  inputs are ``memory://`` objects (distinct URIs, the same tiny PNG bytes),
            sent inline as data URIs; guide images come back base64 and the pipeline
            writes them to ``memory://``. The bare loop sends the same data URIs and
            outputType but writes nothing.
``s3``      inputs and outputs are ``s3://`` URLs, so the pipeline sends presigned GET
            URLs and presigned PUT ``uploadEndpoint`` s and never touches image bytes
            (the production path). Signing is local (dummy credentials); the instant
            server pretends to upload. The bare loop sends URLs of the same shape and
            length without signing them.

Each measurement runs in its own subprocess (peak RSS from ``VmHWM``). "flow" time is
the flow body (Prefect's ephemeral API already up); "total" adds starting the ephemeral
Prefect server and creating the flow run, contact sheet and summary artifacts.

**Memory.** Peak RSS of ``guideflow run --dry-run`` and of a real run (``s3``
scenario, so no image bytes are kept anywhere) over generated CSV manifests, each in a
fresh subprocess. The goal is flat memory: about the same peak at 1M and 10M rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PREPROCESSOR = "canny"
BYTES_PER_ROW = 48  # "img00000001,s3://bench-in/img00000001.png\n" ≈ 42-48 bytes
API_KEY = "bench-key"


# ============================================================================================
# helpers shared by the driver and the workers
# ============================================================================================


def vm_hwm_mb() -> float:
    """Peak resident set size of this process in MB (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_rss_mb() -> float:
    """Current resident set size of this process in MB (``VmRSS``), or NaN."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def row_id(i: int) -> str:
    return f"img{i:08d}"


def input_uri(scenario: str, i: int) -> str:
    if scenario == "inline":
        return f"memory://bench-in/{row_id(i)}.png"
    return f"s3://bench-in/{row_id(i)}.png"


def output_prefix(scenario: str) -> str:
    return "memory://bench-out" if scenario == "inline" else "s3://bench-out/guides"


def write_manifest(path: Path, rows: int, scenario: str) -> None:
    """A CSV manifest ``id,image`` of ``rows`` rows, written in 1 MB pieces."""
    with path.open("w", buffering=1 << 20) as out:
        out.write("id,image\n")
        step = 100_000
        for start in range(0, rows, step):
            out.write(
                "".join(
                    f"{row_id(i)},{input_uri(scenario, i)}\n"
                    for i in range(start, min(rows, start + step))
                )
            )


def s3_env(endpoint: str) -> dict[str, str]:
    """Dummy credentials and an endpoint (the instant server) for the ``s3`` scenario."""
    return {
        "AWS_ACCESS_KEY_ID": "benchbenchbench",
        "AWS_SECRET_ACCESS_KEY": "benchbenchbenchbenchbench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GUIDEFLOW_S3_ENDPOINT": endpoint,
    }


# ============================================================================================
# workers (each runs in its own subprocess and prints one RESULT line)
# ============================================================================================


def _result(payload: dict[str, Any]) -> None:
    payload["peak_rss_mb"] = round(vm_hwm_mb(), 1)
    print("RESULT " + json.dumps(payload), flush=True)


def _sample_task(scenario: str) -> dict[str, Any]:
    """The wire body the pipeline sends for row 0 (built by the pipeline's own code)."""
    from connectors.manifest import ManifestRow
    from connectors.storage import presign_get
    from tasks.backends import HttpBackend
    from tasks.work import make_item

    config = _config(scenario, "unused", "unused", "http://127.0.0.1:1/v1", 20, 16)
    item = make_item(
        ManifestRow(row=0, image=input_uri(scenario, 0), id=row_id(0)), PREPROCESSOR, 0, config
    )

    async def build() -> dict[str, Any]:
        if scenario == "inline":
            from bench.instant_server import TINY_PNG
            from tasks.backends import _as_data_uri

            ref = _as_data_uri(TINY_PNG)
        else:
            ref = await presign_get(item.input_uri, expires=config.presign_expiry_s)
        backend = HttpBackend(config, client=None)
        task = await backend._task(item, ref, item.task_uuid)
        return task.wire()

    return asyncio.run(build())


def _config(
    scenario: str, manifest: str, ledger: str, endpoint: str, batch: int, concurrency: int
) -> Any:
    from flows.preprocess import build_config

    return build_config(
        manifest=manifest,
        preprocessors=[PREPROCESSOR],
        output=output_prefix(scenario),
        ledger=ledger,
        backend="http",
        endpoint=endpoint,
        batch_size=batch,
        concurrency=concurrency,
    )


def worker_bare(args: argparse.Namespace) -> None:
    """The floor: POST prebuilt-shape task arrays with pooled httpx (or aiohttp) clients."""
    import httpx

    template = _sample_task(args.scenario)
    image0 = template["inputs"]["image"]
    upload0 = template.get("uploadEndpoint")
    rows, batch, in_flight = args.rows, args.batch, args.in_flight
    uuids = [_uuid(i) for i in range(rows)]  # a list of ids, as a caller would have

    def body(start: int) -> list[dict[str, Any]]:
        tasks = []
        for i in range(start, min(rows, start + batch)):
            task = dict(template)
            task["taskUUID"] = uuids[i]
            if args.scenario == "inline":
                task["inputs"] = {"image": image0}  # same tiny PNG for every row
            else:
                rid = row_id(i)
                task["inputs"] = {"image": image0.replace(row_id(0), rid)}
                task["uploadEndpoint"] = upload0.replace(row_id(0), rid)
            tasks.append(task)
        return tasks

    def make_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(
            headers={
                "Authorization": f"Bearer {API_KEY}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            timeout=60,
            limits=httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight),
        )

    def make_session() -> Any:
        import aiohttp

        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=in_flight),
            headers={
                "Authorization": f"Bearer {API_KEY}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def post(client: Any, payload: bytes) -> bytes:
        if args.transport == "httpx":
            return (await client.post(args.endpoint, content=payload)).content
        async with client.post(args.endpoint, data=payload) as resp:
            return await resp.read()

    async def main() -> dict[str, Any]:
        # As many clients (connection pools) as the pipeline has shards in flight, each
        # with as many POSTs in flight as one shard: httpx's cost per request grows with
        # the size of its pool, so one big pool would handicap the bare loop.
        make = make_client if args.transport == "httpx" else make_session
        clients = [make() for _ in range(args.clients)]
        starts = iter(range(0, rows, batch))
        done = 0
        ok = 0

        async def lane(client: Any) -> None:
            nonlocal done, ok
            for start in starts:
                data = _loads(await post(client, _dumps(body(start))))["data"]
                done += len(data)
                ok += sum(
                    1 for d in data if d.get("guideImageBase64Data") or d.get("guideImageURL")
                )

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(lane(c) for c in clients for _ in range(in_flight)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        for client in clients:
            await (client.aclose() if args.transport == "httpx" else client.close())
        return {"rows": rows, "answered": done, "success": ok, "wall_s": wall, "cpu_s": cpu}

    _result(asyncio.run(main()))


def _dumps(obj: Any) -> bytes:
    try:
        import orjson
    except ImportError:  # pragma: no cover
        return json.dumps(obj, separators=(",", ":")).encode()
    return orjson.dumps(obj)


def _loads(data: bytes) -> Any:
    try:
        import orjson
    except ImportError:  # pragma: no cover
        return json.loads(data)
    return orjson.loads(data)


def _uuid(i: int) -> str:
    import uuid

    return str(uuid.UUID(int=i, version=4))


def worker_pipeline(args: argparse.Namespace) -> None:
    """``guideflow run`` in-process, as the CLI runs it."""
    from rich.console import Console

    from flows import cli_runner
    from flows import preprocess as pipeline

    if args.scenario == "inline":  # inputs exist before the clock starts
        import fsspec

        from bench.instant_server import TINY_PNG

        fs = fsspec.filesystem("memory")
        for i in range(args.rows):
            fs.pipe_file(f"/bench-in/{row_id(i)}.png", TINY_PNG)

    captured: dict[str, Any] = {}

    def hook(_shard: Any, summary: Any) -> None:
        captured["summary"] = summary

    # Current RSS every half second, from a daemon thread: flat memory is a flat series.
    rss: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not stop.wait(0.5):
            rss.append((round(time.perf_counter() - start, 1), vm_rss_mb()))

    threading.Thread(target=sample, daemon=True).start()

    # Time the flow's shard loop (wall and this process's CPU) by wrapping it: the flow
    # calls ``run_shards`` through the module, so the wrapper sees exactly that span.
    run_shards = pipeline.run_shards

    async def timed_run_shards(*a: Any, **kw: Any) -> Any:
        t, c = time.perf_counter(), time.process_time()
        try:
            return await run_shards(*a, **kw)
        finally:
            captured["shards_s"] = time.perf_counter() - t
            captured["shards_cpu_s"] = time.process_time() - c

    pipeline.run_shards = timed_run_shards
    pipeline.PROGRESS_HOOKS.append(hook)
    sink = io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    code = cli_runner.run_from_cli(
        manifest=args.manifest,
        preprocessors=[PREPROCESSOR],
        output=output_prefix(args.scenario),
        ledger=args.ledger,
        backend="http",
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        rate=None,
        batch_size=args.batch,
        shard_size=args.shard_size,
        max_shards_in_flight=args.shards_in_flight,
        output_format="PNG",
        width=None,
        height=None,
        settings={},
        dry_run=args.dry_run,
        max_cost=None,
        force=False,
        dask_address=None,
        global_concurrency_limit=None,
        image_column="image",
        console=Console(file=sink, width=120),
        err_console=Console(file=sink, width=120),
    )
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    summary = captured.get("summary")
    out: dict[str, Any] = {
        "exit_code": code,
        "total_s": total,
        "total_cpu_s": total_cpu,
        "rows": args.rows,
        "shards_s": captured.get("shards_s"),
        "shards_cpu_s": captured.get("shards_cpu_s"),
    }
    if summary is not None:
        out.update(
            flow_s=summary.elapsed_s,
            success=summary.success,
            errors=summary.errors,
            errors_by_code=summary.errors_by_code,
            shards=summary.shards,
        )
    if rss:  # ten (seconds, MB) points along the run
        step = max(1, len(rss) // 10)
        out["rss_series"] = [rss[i] for i in range(step - 1, len(rss), step)]
    if code not in (0,) and not args.dry_run:
        out["console"] = sink.getvalue()[-3000:]
    _result(out)


WORKERS = {"bare": worker_bare, "pipeline": worker_pipeline}


# ============================================================================================
# the driver
# ============================================================================================


def run_worker(kind: str, argv: Sequence[str], env: dict[str, str], timeout: float) -> dict:
    """Run a worker subprocess; its RESULT line as a dict (or an ``error`` entry)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *argv]
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # ephemeral API
    # A session of its own, so a worker that times out goes down with its children (the
    # ephemeral Prefect server), which would otherwise keep our pipes open and live on.
    proc = subprocess.Popen(
        cmd,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"error": f"worker {kind} timed out after {timeout:.0f} s: {stderr[-1000:]}"}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"worker {kind} failed (rc {proc.returncode}): {stderr[-2000:]}"}


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "n/a"


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="guideflow-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def prefect_env(root: Path) -> dict[str, str]:
    """An isolated Prefect home (its own SQLite DB) for the benchmark's runs."""
    home = root / "prefect-home"
    home.mkdir(exist_ok=True)
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "RUNWARE_API_KEY": API_KEY,
        "PYTHONPATH": str(REPO),
    }


def throughput(args: argparse.Namespace, root: Path, results: dict[str, Any]) -> None:
    from bench.instant_server import serve, stats

    rows_out: list[dict[str, Any]] = []
    scenarios = ["inline", "s3"] if args.scenario == "both" else [args.scenario]
    plans = [(args.batch, args.rows)]
    if args.single_rows:
        plans.append((1, args.single_rows))
    with serve() as url:
        base = url.removesuffix("/v1")
        env = {**prefect_env(root), **s3_env(base)}
        # Warm-up: creates the Prefect DB, compiles bytecode; not reported.
        warm = root / "warm.csv"
        write_manifest(warm, 200, "s3")
        run_worker(
            "pipeline",
            _pipeline_argv(args, "s3", warm, root / "ledger-warm", url, 200, args.batch),
            env,
            args.timeout,
        )
        rounds = [(s, b, r) for s in scenarios for b, r in plans] * max(1, args.repeat)
        for scenario, batch, rows in rounds:
            manifest = root / f"tp-{scenario}-{rows}.csv"
            if not manifest.exists():
                write_manifest(manifest, rows, scenario)
            in_flight = args.concurrency * args.shards_in_flight
            per_client = str(args.concurrency)
            bare_argv = [
                "--scenario", scenario, "--rows", str(rows), "--batch", str(batch),
                "--in-flight", per_client, "--clients", str(args.shards_in_flight),
                "--endpoint", url,
            ]  # fmt: skip
            before = stats(url)["tasks"]
            bare = run_worker("bare", [*bare_argv, "--transport", "httpx"], env, args.timeout)
            bare_tasks = stats(url)["tasks"] - before
            aio = run_worker("bare", [*bare_argv, "--transport", "aiohttp"], env, args.timeout)
            ledger = root / f"ledger-{scenario}-{batch}-{time.time_ns()}"
            before = stats(url)["tasks"]
            pipe = run_worker(
                "pipeline",
                _pipeline_argv(args, scenario, manifest, ledger, url, rows, batch),
                env,
                args.timeout,
            )
            pipe_tasks = stats(url)["tasks"] - before
            rows_out.append(
                _tp_row(scenario, batch, rows, in_flight, bare, aio, pipe, bare_tasks, pipe_tasks)
            )
            print_throughput([rows_out[-1]], header=len(rows_out) == 1)
    results["throughput"] = rows_out
    if args.repeat > 1:
        results["throughput_medians"] = medians(rows_out)
        print_medians(results["throughput_medians"])


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (scenario, tasks/POST): the median of each round's ratios and rates.

    Each round runs the bare loops and the pipeline back to back, so a round's ratio
    compares like with like; the median over rounds resists the swings of a shared
    machine (single rounds on 2 cores moved by ±15%).
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["tasks_per_post"]), []).append(row)
    out = []
    for (scenario, batch), group in groups.items():
        line: dict[str, Any] = {"scenario": scenario, "tasks_per_post": batch, "rounds": len(group)}
        for key in ("ratio_flow", "bare_tps", "pipeline_tps_flow", "bare_cpu_us_per_task",
                    "pipeline_cpu_us_per_task"):  # fmt: skip
            values = [r[key] for r in group if isinstance(r.get(key), int | float)]
            if values:
                line[key] = statistics.median(values)
                line[f"{key}_range"] = (min(values), max(values))
        cpu = [r["bare_cpu_us_per_task"] / r["pipeline_cpu_us_per_task"] for r in group
               if r.get("bare_cpu_us_per_task") and r.get("pipeline_cpu_us_per_task")]  # fmt: skip
        if cpu:
            line["cpu_ratio"] = statistics.median(cpu)
            line["cpu_ratio_range"] = (min(cpu), max(cpu))
        out.append(line)
    return out


def print_medians(lines: list[dict[str, Any]]) -> None:
    print("\nMedians over rounds (range in brackets):")
    print(
        f"{'scenario':<8} {'tasks/POST':>10} {'rounds':>6} │ {'bare t/s':>8} {'flow t/s':>8} "
        f"{'ratio':>5} {'[min-max]':>11} │ {'CPU ratio':>9} {'[min-max]':>11}"
    )
    for m in lines:
        lo, hi = m.get("ratio_flow_range", (None, None))
        clo, chi = m.get("cpu_ratio_range", (None, None))
        print(
            f"{m['scenario']:<8} {m['tasks_per_post']:>10} {m['rounds']:>6} │ "
            f"{_fmt(m.get('bare_tps')):>8} {_fmt(m.get('pipeline_tps_flow')):>8} "
            f"{_fmt(m.get('ratio_flow'), '.2f'):>5} [{_fmt(lo, '.2f')}-{_fmt(hi, '.2f')}] │ "
            f"{_fmt(m.get('cpu_ratio'), '.2f'):>9} [{_fmt(clo, '.2f')}-{_fmt(chi, '.2f')}]"
        )


def _pipeline_argv(
    args: argparse.Namespace,
    scenario: str,
    manifest: Path,
    ledger: Path,
    url: str,
    rows: int,
    batch: int,
    dry_run: bool = False,
) -> list[str]:
    argv = [
        "--scenario", scenario, "--manifest", str(manifest), "--ledger", str(ledger),
        "--endpoint", url, "--rows", str(rows), "--batch", str(batch),
        "--concurrency", str(args.concurrency), "--shard-size", str(args.shard_size),
        "--shards-in-flight", str(args.shards_in_flight),
    ]  # fmt: skip
    return [*argv, "--dry-run"] if dry_run else argv


def _tp_row(
    scenario: str,
    batch: int,
    rows: int,
    in_flight: int,
    bare: dict[str, Any],
    aio: dict[str, Any],
    pipe: dict[str, Any],
    bare_tasks: int,
    pipe_tasks: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "scenario": scenario,
        "tasks_per_post": batch,
        "rows": rows,
        "posts_in_flight": in_flight,
        "bare": bare,
        "bare_aiohttp": aio,
        "pipeline": pipe,
        "server_tasks_bare": bare_tasks,
        "server_tasks_pipeline": pipe_tasks,
    }
    if "wall_s" in bare:
        row["bare_tps"] = rows / bare["wall_s"]
    if "flow_s" in pipe:
        row["pipeline_tps_flow"] = rows / pipe["flow_s"]
        row["pipeline_tps_total"] = rows / pipe["total_s"]
    if "cpu_s" in bare:
        row["bare_cpu_us_per_task"] = bare["cpu_s"] / rows * 1e6
    if pipe.get("shards_cpu_s") is not None:
        row["pipeline_cpu_us_per_task"] = pipe["shards_cpu_s"] / rows * 1e6
    if "wall_s" in aio:
        row["aio_tps"] = rows / aio["wall_s"]
        row["aio_cpu_us_per_task"] = aio["cpu_s"] / rows * 1e6
    if "bare_tps" in row and "pipeline_tps_flow" in row:
        row["ratio_flow"] = row["pipeline_tps_flow"] / row["bare_tps"]
        row["ratio_total"] = row["pipeline_tps_total"] / row["bare_tps"]
    if "aio_tps" in row and "pipeline_tps_flow" in row:
        row["ratio_aio"] = row["pipeline_tps_flow"] / row["aio_tps"]
    return row


def memory(args: argparse.Namespace, root: Path, results: dict[str, Any]) -> None:
    from bench.instant_server import serve

    out: list[dict[str, Any]] = []
    needed = max([*args.mem_dry, *args.mem_real, 0]) * BYTES_PER_ROW
    free = shutil.disk_usage(root).free
    plan: list[tuple[str, int]] = [("dry-run", n) for n in args.mem_dry]
    plan += [("real", n) for n in args.mem_real]
    with serve() as url:
        env = {**prefect_env(root), **s3_env(url.removesuffix("/v1"))}
        if args.prefect_api_url:  # a real Prefect server instead of ephemeral mode
            env["PREFECT_API_URL"] = args.prefect_api_url
        manifests: dict[int, Path] = {}
        for mode, rows in plan:
            if rows * BYTES_PER_ROW * 1.2 > free - (1 << 30):
                line = {"mode": mode, "rows": rows, "skipped": f"needs ~{needed >> 20} MB disk"}
                out.append(line)
                print(f"SKIP memory {mode} {rows:,} rows: only {free >> 20} MB free on {root}")
                continue
            manifest = manifests.get(rows)
            if manifest is None:
                for old in manifests.values():  # keep one big manifest on disk at a time
                    old.unlink(missing_ok=True)
                manifests.clear()
                manifest = root / f"mem-{rows}.csv"
                t0 = time.perf_counter()
                write_manifest(manifest, rows, "s3")
                print(
                    f"  (wrote {rows:,}-row manifest, {manifest.stat().st_size >> 20} MB, "
                    f"in {time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
                manifests[rows] = manifest
            ledger = root / f"ledger-mem-{mode}-{rows}"
            res = run_worker(
                "pipeline",
                _pipeline_argv(
                    args, "s3", manifest, ledger, url, rows, args.batch, dry_run=mode == "dry-run"
                ),
                env,
                args.mem_timeout,
            )
            line = {"mode": mode, "rows": rows, **res}
            out.append(line)
            print_memory([line], header=len(out) == 1)
            shutil.rmtree(ledger, ignore_errors=True)
    results["memory"] = out


# -- printing ---------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "—"


def print_throughput(rows: list[dict[str, Any]], header: bool = True) -> None:
    """One line per measurement: throughput (wall) and client CPU per task (load-proof)."""
    if header:
        print(
            f"{'scenario':<8} {'tasks/POST':>10} {'rows':>8} │ {'bare t/s':>8} {'flow t/s':>8} "
            f"{'ratio':>5} │ {'total s':>7} {'total t/s':>9} {'ratio':>5} │ "
            f"{'bare CPU':>8} {'flow CPU':>8} {'ratio':>5} │ {'aio t/s':>7} {'aio CPU':>7} "
            f"{'ratio':>5} │ {'RSS MB':>6} {'ok':>7}"
        )
        print(
            f"{'':<8} {'':>10} {'':>8} │ {'httpx':>8} {'':>8} {'':>5} │ {'':>7} {'':>9} {'':>5} │ "
            f"{'µs/task':>8} {'µs/task':>8} {'':>5} │ {'':>7} {'µs/task':>7} {'':>5} │ "
            f"{'':>6} {'':>7}"
        )
    for r in rows:
        pipe = r["pipeline"]
        bare_cpu, pipe_cpu = r.get("bare_cpu_us_per_task"), r.get("pipeline_cpu_us_per_task")
        cpu_ratio = bare_cpu / pipe_cpu if bare_cpu and pipe_cpu else None
        print(
            f"{r['scenario']:<8} {r['tasks_per_post']:>10} {r['rows']:>8,} │ "
            f"{_fmt(r.get('bare_tps')):>8} {_fmt(r.get('pipeline_tps_flow')):>8} "
            f"{_fmt(r.get('ratio_flow'), '.2f'):>5} │ {_fmt(pipe.get('total_s'), '.1f'):>7} "
            f"{_fmt(r.get('pipeline_tps_total')):>9} {_fmt(r.get('ratio_total'), '.2f'):>5} │ "
            f"{_fmt(bare_cpu):>8} {_fmt(pipe_cpu):>8} {_fmt(cpu_ratio, '.2f'):>5} │ "
            f"{_fmt(r.get('aio_tps')):>7} {_fmt(r.get('aio_cpu_us_per_task')):>7} "
            f"{_fmt(r.get('ratio_aio'), '.2f'):>5} │ "
            f"{_fmt(pipe.get('peak_rss_mb'), '.0f'):>6} {pipe.get('success', '—'):>7}",
            flush=True,
        )
        for side in ("bare", "bare_aiohttp", "pipeline"):
            if "error" in r[side]:
                print(f"  {side} failed: {r[side]['error']}")
        if pipe.get("errors"):
            print(f"  pipeline errors: {pipe.get('errors_by_code')}")
        if r["server_tasks_pipeline"] != r["server_tasks_bare"]:
            print(
                f"  note: server saw {r['server_tasks_bare']:,} tasks from the bare loop and "
                f"{r['server_tasks_pipeline']:,} from the pipeline"
            )


def print_memory(rows: list[dict[str, Any]], header: bool = True) -> None:
    if header:
        print(
            f"{'mode':<8} {'rows':>11} {'wall s':>8} {'rows/s':>9} {'peak RSS MB':>12} "
            f"{'exit':>5}  RSS MB along the run"
        )
    for r in rows:
        if "skipped" in r:
            print(f"{r['mode']:<8} {r['rows']:>11,} skipped: {r['skipped']}")
            continue
        if "error" in r:
            print(f"{r['mode']:<8} {r['rows']:>11,} failed: {r['error'][-500:]}")
            continue
        wall = r.get("total_s")
        rate = r["rows"] / wall if wall else None
        series = r.get("rss_series") or []
        trend = " → ".join(f"{mb:.0f}" for _, mb in series[:: max(1, len(series) // 4)])
        print(
            f"{r['mode']:<8} {r['rows']:>11,} {_fmt(wall, '.1f'):>8} {_fmt(rate):>9} "
            f"{_fmt(r.get('peak_rss_mb'), '.0f'):>12} {r.get('exit_code', '—'):>5}  {trend}",
            flush=True,
        )


def notes(args: argparse.Namespace) -> list[str]:
    return [
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average at start {load_average()}",
        "server: bench/instant_server.py (raw ASGI under uvicorn, separate process), "
        "answers every task at once; both sides share the same CPUs with it",
        f"bare loop: {args.shards_in_flight} httpx.AsyncClients × {args.concurrency} POSTs in "
        "flight (the pipeline's shards in flight × per-shard concurrency), same task "
        "bodies (taken from the pipeline's own request builder for row 0), orjson encoding "
        "and parsing (as the client); writes nothing, no ledger, no signing. The goal "
        "(ratio ≥ 0.8) is against this loop",
        "aio: the same bare loop over aiohttp sessions, the wire guideflow's client uses "
        "(connectors/http_wire.py); its ratio is guideflow's own overhead on the same wire",
        f"pipeline: guideflow run --backend http --endpoint <instant> -p {PREPROCESSOR} "
        f"--shard-size {args.shard_size} --shards-in-flight {args.shards_in_flight} "
        f"--concurrency {args.concurrency}; CSV manifest on local disk, ledger on local disk",
        "CPU µs/task: CPU time of the client process (bare: the loop; pipeline: the flow's "
        "shard loop, all threads) per row; unlike t/s it barely moves with other load on the "
        "machine, so its ratio is the steadier comparison",
        "flow t/s: rows / flow body time (the temporary Prefect API already started; "
        "guideflow run's warm-up of S3 signing and SSL overlaps that start); total t/s: "
        "rows / whole run_from_cli call (temporary API start, flow run, contact sheet, "
        "artifacts); a warm-up run created the Prefect DB first",
        "inline: memory:// inputs (distinct URIs, one tiny PNG) sent as data URIs, base64 "
        "outputs written to memory://; s3: presigned GET inputs and PUT uploadEndpoints "
        "(dummy credentials, local signing), nothing uploaded",
        "memory: peak RSS (VmHWM) of the whole `guideflow run` process, s3 scenario CSV "
        "manifests; without --prefect-api-url the run starts a temporary Prefect API in its "
        "own process (flows/prefect_api.py), which is not counted",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows for the 20/POST runs")
    parser.add_argument("--batch", type=int, default=20, help="tasks per POST")
    parser.add_argument(
        "--single-rows", type=int, default=2_000, help="rows for 1 task/POST (0: skip)"
    )
    parser.add_argument("--scenario", choices=["inline", "s3", "both"], default="both")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument(
        "--repeat", type=int, default=1, help="throughput rounds; >1 also prints medians"
    )
    parser.add_argument("--shards-in-flight", type=int, default=2)
    parser.add_argument(
        "--mem-dry", type=_int_list, default=[1_000_000], help="dry-run sizes, e.g. 1e6,1e7"
    )
    parser.add_argument("--mem-real", type=_int_list, default=[100_000], help="real-run sizes")
    parser.add_argument("--full", action="store_true", help="memory: 1M real, 1M+10M dry")
    parser.add_argument("--only", choices=["throughput", "memory"])
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    parser.add_argument(
        "--prefect-api-url",
        metavar="URL",
        help="memory runs: use this Prefect server (`prefect server start`) instead of "
        "ephemeral mode, which imports Prefect's server app into the run's process",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--mem-timeout", type=float, default=3600)
    # worker-only arguments
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--ledger", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--transport", choices=["httpx", "aiohttp"], default="httpx", help=argparse.SUPPRESS
    )
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        WORKERS[args.worker](args)
        return
    if args.full:
        args.mem_dry, args.mem_real = [1_000_000, 10_000_000], [1_000_000]

    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results["notes"] = notes(args)
    print("guideflow pipeline benchmark")
    for line in results["notes"]:
        print(f"  · {line}")
    with workdir(args.keep) as root:
        if args.only in (None, "throughput"):
            print(f"\nOrchestration overhead ({PREPROCESSOR}, instant server):")
            throughput(args, root, results)
        if args.only in (None, "memory"):
            print("\nMemory (peak RSS of the guideflow run process):")
            memory(args, root, results)
    results["load_average_end"] = load_average()
    print(f"\nload average at end: {results['load_average_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")


def _int_list(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip() and float(x) > 0]


if __name__ == "__main__":
    main()
