"""The temporary Prefect API that ``guideflow run`` starts when no ``PREFECT_API_URL`` is set.

Real processes throughout: a real Prefect server subprocess, a real flow run recorded in
it, and a real ``guideflow run`` in a child interpreter whose imports are inspected.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from flows.prefect_api import start_prefect_server, temporary_prefect_api

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_api_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No Prefect API configured, and a private Prefect home (its own SQLite database)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    database = f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"
    with temporary_settings(
        updates={PREFECT_HOME: str(tmp_path), PREFECT_SERVER_DATABASE_CONNECTION_URL: database},
        restore_defaults={PREFECT_API_URL},
    ):
        yield


def test_a_temporary_server_serves_the_run_and_is_stopped_after(no_api_url: None) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    @flow(name="temporary-api-probe")
    def probe() -> str:
        from prefect.runtime import flow_run

        return str(flow_run.get_id())

    async def recorded(run_id: str) -> tuple[str, str]:
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            return (await client.read_flow(run.flow_id)).name, run.state_name

    def prefect_servers() -> dict[int, psutil.Process]:
        return {
            p.pid: p
            for p in psutil.Process().children(recursive=True)
            if "prefect.server.api.server:create_app" in " ".join(p.cmdline())
        }

    before = prefect_servers()  # (the session's prefect_test_harness server, if started)
    with temporary_prefect_api() as url:
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert PREFECT_API_URL.value() == url
        assert os.environ["PREFECT_API_URL"] == url  # for Prefect's background threads
        assert httpx.get(f"{url}/health", trust_env=False).json() is True
        servers = [p for pid, p in prefect_servers().items() if pid not in before]
        assert len(servers) == 1
        run_id = probe()
        assert asyncio.run(recorded(run_id)) == ("temporary-api-probe", "Completed")
    assert "PREFECT_API_URL" not in os.environ
    assert not PREFECT_API_URL.value()
    assert not servers[0].is_running() or servers[0].status() == psutil.STATUS_ZOMBIE
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", trust_env=False, timeout=2)


def test_a_configured_api_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = set(p.pid for p in psutil.Process().children(recursive=True))
    with (
        temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}),
        temporary_prefect_api() as url,
    ):
        assert url is None
        assert PREFECT_API_URL.value() == "http://127.0.0.1:9/api"
        after = set(p.pid for p in psutil.Process().children(recursive=True))
        assert after == before  # nothing started


def test_guideflow_run_does_not_import_prefects_server_app(tmp_path: Path) -> None:
    """The CLI runs against its own temporary server; Prefect's server code stays out.

    (Importing it is what costs Prefect's own ephemeral mode ~65 MB in the run process.)
    """
    script = textwrap.dedent(
        f"""
        import json, sys
        import psutil
        from rich.console import Console
        from flows.cli_runner import run_from_cli
        code = run_from_cli(
            manifest={str(REPO / "examples" / "manifest.csv")!r},
            preprocessors=["canny"], output={str(tmp_path / "out")!r},
            ledger={str(tmp_path / "ledger")!r}, backend="local", dry_run=False,
            dask_address=None, console=Console(stderr=True), err_console=Console(stderr=True),
        )
        print(json.dumps({{
            "code": code,
            "server_modules": sorted(m for m in sys.modules if m.startswith("prefect.server")),
            "children": [" ".join(p.cmdline()) for p in psutil.Process().children()],
        }}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, done.stderr[-3000:]
    assert report["server_modules"] == []
    assert report["children"] == []  # the temporary server is gone with the run
    # Logs and events were delivered before the server stopped: no retries against it.
    assert "Unable to connect" not in done.stderr and "Logging error" not in done.stderr
    assert len(list((tmp_path / "out" / "canny").glob("*.png"))) == 3


def test_a_server_that_cannot_start_is_reported_with_its_output(no_api_url: None) -> None:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    broken = "nosuchdialect://guideflow/prefect"  # SQLAlchemy has no such database driver
    with (
        temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: broken}),
        pytest.raises(RuntimeError, match="temporary Prefect server did not start") as failure,
    ):
        start_prefect_server(timeout_s=120)
    assert "exit code" in str(failure.value) and "its output: " in str(failure.value)
    assert "nosuchdialect" in str(failure.value)  # the server's own words say why


def test_a_port_taken_before_the_server_binds_it_is_retried_on_another(
    no_api_url: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import flows.prefect_api as prefect_api

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        free_port = prefect_api._free_port
        offered = iter([busy])
        monkeypatch.setattr(prefect_api, "_free_port", lambda: next(offered, None) or free_port())
        process, url = start_prefect_server(timeout_s=120)
        try:
            assert f":{busy}/" not in url
            assert httpx.get(f"{url}/health", trust_env=False).json() is True
        finally:
            prefect_api._stop(process)
