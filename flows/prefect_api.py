"""A temporary Prefect API for ``guideflow run`` when no ``PREFECT_API_URL`` is set.

Prefect's own ephemeral mode already runs its API server in a subprocess, but to start
it Prefect imports its whole server application (FastAPI routes, SQLAlchemy models,
services) into the *calling* process: about 65 MB of resident memory that a long run
carries to the end for nothing (measured with ``bench/pipeline.py --only memory``:
peak RSS of a 500k-row run 395 MB in ephemeral mode, 323 MB against a Prefect server).

:func:`temporary_prefect_api` starts the same server the same way (``uvicorn`` with
Prefect's app factory, in a subprocess, UI off) without importing it here, points this
process at it for the duration of the run and stops it afterwards. With a
``PREFECT_API_URL`` configured it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_command(port: int) -> list[str]:
    import prefect

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).resolve().parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def _server_env() -> dict[str, str]:
    from prefect.settings import get_current_settings

    return {
        **os.environ,
        # What Prefect's own ephemeral server runs with: no UI, ephemeral server settings.
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }


def _drain_prefect_workers() -> None:
    """Deliver the logs and events still queued for the API before it goes away.

    (Otherwise Prefect's background workers retry a stopped server and print connection
    errors as the process exits; ``prefect_test_harness`` drains them the same way.)
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_prefect_server(timeout_s: float | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a Prefect API server subprocess on a free loopback port; (process, API URL).

    Waits until ``/api/health`` answers (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
    by default) and raises ``RuntimeError`` with the server's output if it never does.
    """
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    timeout_s = float(timeout_s or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    deadline = time.monotonic() + timeout_s
    env = _server_env()
    while True:
        port = _free_port()
        # Output to a file, not a pipe nobody reads once the server is up (a full pipe
        # would block it); the file is read back only to explain a failed start.
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(_server_command(port), env=env, stdout=log, stderr=log)
            url = f"http://127.0.0.1:{port}/api"
            if _wait_healthy(process, url, deadline):
                return process, url  # (the server keeps its own descriptor of the file)
            _stop(process)
            log.seek(0)
            output = log.read().decode(errors="replace")[-2000:]
            if "address already in use" in output and time.monotonic() < deadline:
                continue  # another process took the port between our probe and its bind
        raise RuntimeError(
            f"the temporary Prefect server did not start within {timeout_s:.0f} s "
            f"(exit code {process.returncode}); its output: {output}"
        )


def _wait_healthy(process: subprocess.Popen[bytes], url: str, deadline: float) -> bool:
    """Poll ``/health`` until it answers 200 (True), the process exits or time runs out."""
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return True
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def temporary_prefect_api() -> Iterator[str | None]:
    """Run the body against a temporary Prefect server unless ``PREFECT_API_URL`` is set.

    Yields the URL of the temporary API, or ``None`` when one was configured already.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    process, url = start_prefect_server()
    # The environment too: Prefect's background threads (log and event workers) read
    # their settings from it, not from this thread's settings context.
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_prefect_workers()
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        _stop(process)
