"""Dask scale-out mode, for real: shards run in other processes that talk to a real Prefect API.

Dask workers cannot reach an ephemeral Prefect API (it lives inside the flow's process), so
Dask mode requires a real Prefect server. This module starts one (``prefect server start``
as a subprocess with its own ``PREFECT_HOME`` and SQLite database in a temporary directory)
and a ``distributed.LocalCluster`` of 2 worker *processes* with one thread each; the workers
get ``PREFECT_API_URL`` through their environment, like workers on other machines would.

``guideflow run --dask-address`` then processes a manifest of 12 real photos (downscaled
local files; ``memory://`` would not be visible to other processes) in 6 shards of 2 rows.
The tests prove that the shards ran in the worker processes (the scheduler's task stream
names the worker of every shard task, and those workers have other pids than this one), that
Prefect recorded 6 completed shard task runs under the flow run, that every guide image is
the one the embedded engine makes in this process, and that a re-run on the same long-lived
workers does nothing (no duplicate successes in the ledger).

The CLI must refuse Dask mode before doing anything when no real Prefect server is
configured or the configured one does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from connectors import ledger as ledger_mod
from engine import imageio
from engine.api import Engine
from guideflow.cli import app
from tests.conftest import thumbnails

pytestmark = pytest.mark.timeout(300)

PHOTOS = ("room", "human", "building", "toy", "bird", "dog2")
ROWS = 12
SHARD_SIZE = 2
THUMB = 128
SERVER_START_TIMEOUT_S = 90.0
UNUSED_SERVICES = (
    "CANCELLATION_CLEANUP", "DB_VACUUM", "EVENT_PERSISTER", "EVENT_LOGGER", "FOREMAN",
    "LATE_RUNS", "SCHEDULER", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CLEANUP_RECONCILER",
    "TRIGGERS",
)  # fmt: skip


# -- the real Prefect server and the Dask cluster ---------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def prefect_logging() -> None:
    """Set Prefect's logging up now: done lazily inside ``CliRunner.invoke``, its console
    handler would keep the runner's temporary stderr and fail on every later log record."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prefect_executable() -> str:
    """The ``prefect`` console script of this interpreter's environment."""
    found = Path(sys.executable).with_name("prefect")
    return str(found) if found.exists() else (shutil.which("prefect") or "prefect")


def start_prefect_server(home: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``prefect server start`` in its own process group, home and database (not waited for)."""
    port = free_port()
    log = home / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    # Only the task-run recorder is needed (it turns the workers' task-run events into the
    # task runs this module reads back); the other services would just compete for CPU.
    env.update({f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in UNUSED_SERVICES})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: teardown kills it and its children
        )
    return proc, f"http://127.0.0.1:{port}/api", log


def wait_healthy(proc: subprocess.Popen[bytes], api_url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy in {SERVER_START_TIMEOUT_S}s:\n{log.read_text()}")


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after 15 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)


@dataclass
class ScaleOut:
    api_url: str
    scheduler: str
    client: Any  # distributed.Client of this test process (not the flow's)
    worker_pids: dict[str, int]  # worker address → pid


@pytest.fixture(scope="module")
def scale_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleOut]:
    """A real Prefect server and a 2-process Dask cluster whose workers know its API URL.

    The server boots while the cluster starts (both take seconds). This process talks to
    the server through ``temporary_settings``; the workers through their environment.
    """
    import distributed
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    proc, api_url, log = start_prefect_server(home)
    cluster = client = None
    try:
        worker_home = tmp_path_factory.mktemp("worker-prefect-home")
        cluster = distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            local_directory=str(tmp_path_factory.mktemp("dask")),
            env={"PREFECT_API_URL": api_url, "PREFECT_HOME": str(worker_home)},
        )
        client = distributed.Client(cluster, set_as_default=False)
        client.wait_for_workers(2, timeout=60)
        # import the pipeline on the workers while the server boots (it only saves time)
        client.run(importlib.import_module, "tasks.shard")
        wait_healthy(proc, api_url, log)
        pids = client.run(os.getpid)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield ScaleOut(api_url, cluster.scheduler_address, client, pids)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        stop_process_group(proc)


# -- data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(images_dir: Path) -> dict[str, bytes]:
    """Real photos as PNG, downscaled to at most THUMB px (RGBA kept, like the originals)."""
    return thumbnails(PHOTOS, THUMB)


def write_manifest(root: Path, photos: dict[str, bytes]) -> tuple[Path, dict[str, bytes]]:
    """12 local input files and a CSV manifest of them; returns (manifest, image id → bytes)."""
    (root / "in").mkdir(parents=True)
    inputs: dict[str, bytes] = {}
    rows = []
    for i in range(ROWS):
        image_id = f"img{i:02d}"
        data = photos[PHOTOS[i % len(PHOTOS)]]
        path = root / "in" / f"{image_id}.png"
        path.write_bytes(data)
        inputs[image_id] = data
        rows.append({"id": image_id, "image": str(path)})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, inputs


def cli_run(manifest: Path, output: Path, ledger: Path, dask_address: str) -> Any:
    return CliRunner().invoke(
        app,
        [
            "run", str(manifest), "-p", "canny", "--output", str(output),
            "--ledger", str(ledger), "--shard-size", str(SHARD_SIZE),
            "--concurrency", "2", "--dask-address", dask_address,
        ],
        terminal_width=200,
    )  # fmt: skip


def summary_value(output: str, metric: str) -> int:
    """A number from the summary table ``guideflow run`` prints."""
    found = re.search(re.escape(metric) + r"\W+(\d+)", output)
    assert found, output
    return int(found.group(1))


async def shard_task_runs(flow_run_id: str, expected: int) -> list[Any]:
    """The shard task runs the server recorded for the flow run (recorded from events, so
    poll until ``expected`` are terminal, at most 60 s)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    runs: list[Any] = []
    async with get_client() as client:
        for _ in range(120):
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_DESC,
                limit=100,
            )
            runs = [r for r in runs if r.name.startswith("guideflow-shard")]
            if len(runs) >= expected and all(r.state and r.state.is_final() for r in runs):
                break
            await asyncio.sleep(0.5)
    return runs


async def read_flow_run(flow_run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


# -- tests ---------------------------------------------------------------------------------


def test_guideflow_run_on_a_dask_cluster_runs_every_shard_on_the_workers(
    scale_out: ScaleOut, photos: dict[str, bytes], tmp_path: Path
) -> None:
    """``guideflow run --dask-address``: 6 shards on 2 worker processes, recorded by Prefect;
    the re-run on the same (long-lived) workers must not redo anything."""
    import distributed

    manifest, inputs = write_manifest(tmp_path, photos)
    output, ledger = tmp_path / "out", tmp_path / "ledger"

    with distributed.get_task_stream(client=scale_out.client) as stream:
        result = cli_run(manifest, output, ledger, scale_out.scheduler)
    assert result.exit_code == 0, result.output
    assert summary_value(result.output, "guide images made") == ROWS

    # every shard task ran on a worker process of the cluster, not in this process
    shard_tasks = [t for t in stream.data if "process_shard" in str(t["key"])]
    assert len(shard_tasks) == ROWS // SHARD_SIZE, [t["key"] for t in stream.data]
    assert {t["worker"] for t in shard_tasks} <= set(scale_out.worker_pids)
    assert os.getpid() not in {scale_out.worker_pids[t["worker"]] for t in shard_tasks}

    # the ledger: one success per image, no duplicates, one file per shard
    frame = ledger_mod.read_ledger(str(ledger))
    assert sorted(frame["image_id"]) == sorted(inputs)
    assert set(frame["status"]) == {"success"}
    assert ledger_mod.duplicate_successes(str(ledger)).empty
    assert sorted(frame["shard"].unique()) == list(range(ROWS // SHARD_SIZE))
    assert len(list(ledger.rglob("*.parquet"))) == ROWS // SHARD_SIZE
    (run_id,) = frame["run_id"].unique()

    # every output is the guide image the embedded engine makes for that input here
    engine = Engine()
    for image_id, data in inputs.items():
        made = (output / "canny" / f"{image_id}.png").read_bytes()
        expected = engine.preprocess(data, "canny", output_format="PNG").array
        assert np.array_equal(imageio.decode_image(made), expected), image_id
    for image_id, uri in zip(frame["image_id"], frame["output_uri"], strict=True):
        assert Path(uri) == output / "canny" / f"{image_id}.png"

    # the real Prefect server recorded the flow run and its 6 completed shard task runs
    flow_run = asyncio.run(read_flow_run(run_id))
    assert flow_run.name and flow_run.state is not None and flow_run.state.is_completed()
    runs = asyncio.run(shard_task_runs(run_id, ROWS // SHARD_SIZE))
    assert len(runs) == ROWS // SHARD_SIZE
    assert all(r.state is not None and r.state.is_completed() for r in runs), runs

    # a re-run on the same long-lived workers finds everything done and does nothing
    again = cli_run(manifest, output, ledger, scale_out.scheduler)
    assert again.exit_code == 0, again.output
    assert summary_value(again.output, "guide images made") == 0
    assert summary_value(again.output, "already in ledger (skipped)") == ROWS
    frame = ledger_mod.read_ledger(str(ledger))
    assert len(frame) == ROWS and ledger_mod.duplicate_successes(str(ledger)).empty
    assert len(list(ledger.rglob("*.parquet"))) == ROWS // SHARD_SIZE


def refused(tmp_path: Path, api_url: str | None) -> Any:
    """``guideflow run --dask-address`` with PREFECT_API_URL set to ``api_url`` (or unset)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    manifest = tmp_path / "m.txt"
    manifest.write_text("/nonexistent/a.png\n")
    settings = (
        temporary_settings(updates={PREFECT_API_URL: api_url})
        if api_url
        else temporary_settings(restore_defaults={PREFECT_API_URL})
    )
    with settings:
        result = CliRunner().invoke(
            app,
            [
                "run", str(manifest), "-p", "canny", "--output", str(tmp_path / "out"),
                "--ledger", str(tmp_path / "ledger"), "--dask-address", "tcp://127.0.0.1:9",
            ],
            terminal_width=300,
        )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "ledger").exists()
    return result


def test_dask_mode_is_refused_without_a_prefect_server_url(tmp_path: Path) -> None:
    result = refused(tmp_path, None)
    text = " ".join(result.output.split())
    assert "PREFECT_API_URL is not set" in text
    assert "prefect server start" in text


def test_dask_mode_is_refused_when_the_prefect_server_does_not_answer(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    result = refused(tmp_path, dead)
    text = " ".join(result.output.split())
    assert "not answering" in text and dead in text
