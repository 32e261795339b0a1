"""Latency of one sync canny request at 512²: through `guideflow serve` vs the engine in-process.

    python bench/server_latency.py [--repeat 30] [--image PATH] [--breakdown] [--server-thread]

Times, for the same 512×512 photo:

* in-process: ``Engine().preprocess(png_bytes, "canny", output_format="PNG")``;
* HTTP: one ``POST /v1`` with a base64 input and ``outputType=base64Data`` through
  :class:`connectors.runware.RunwareClient` (client-side decode of the answer included),
  against the real server started as a ``guideflow serve`` subprocess (auth on,
  2 workers, 127.0.0.1). A separate process keeps the client and the server from
  sharing one GIL, as in production; ``--server-thread`` runs it in a background
  thread of this process instead (the old way, for comparison: it adds GIL contention).

Prints the median, p90 and min of each and the difference, the HTTP overhead, and the
server's own time for the request (its ``Server-Timing: app`` header: from the
handler's start, body read included, to the response body rendered). ``--breakdown``
adds CPU milliseconds per request (engine in-process, server process, client
process: robust to a loaded host, where wall times swing widely) and times the
client's own steps: building + serialising the request, and parsing the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

API_KEY = "bench-key"
_SERVER_TIMING = re.compile(r"app;dur=([0-9.]+)")


def _photo(path: Path) -> bytes:
    from engine import imageio

    rgb = imageio.decode_image(path.read_bytes())
    side = min(rgb.shape[:2])
    square = rgb[:side, :side]
    return imageio.encode_image(imageio.resize_to(square, (512, 512)), "PNG")


def _stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _server_subprocess(workers: int) -> Iterator[tuple[str, Callable[[], float | None]]]:
    """``guideflow serve`` on a free loopback port.

    Yields its base URL once /healthz answers, and a reader of its CPU seconds so far.
    """
    port = _free_port()
    env = {**os.environ, "GUIDEFLOW_API_KEYS": API_KEY}
    cmd = [
        sys.executable,
        "-c",
        "from guideflow.cli import main; main()",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"guideflow serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("guideflow serve did not start within 60 s")
            time.sleep(0.1)
        yield base, lambda: _cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _server_thread(workers: int) -> Iterator[tuple[str, Callable[[], float | None]]]:
    from engine.server import ServerConfig
    from tests.live_server import run_server

    with run_server(ServerConfig(api_keys=(API_KEY,), workers=workers)) as base:
        yield base, lambda: None  # shares this process: its CPU time is not separable


class _Samples:
    def __init__(self) -> None:
        self.total: list[float] = []
        self.server: list[float] = []
        self.build: list[float] = []
        self.parse: list[float] = []
        self.client_cpu: float | None = None  # ms per request
        self.server_cpu: float | None = None  # ms per request


async def _http(
    base_url: str, server_cpu: Callable[[], float | None], png: bytes, repeat: int
) -> _Samples:
    """``repeat`` timed requests (after 3 warm-ups) through the real client."""
    from connectors.runware import RunwareClient
    from guideflow.protocol import PreprocessTask

    b64 = base64.b64encode(png).decode()
    out = _Samples()
    server_ms: list[float] = []

    async def hook(response: httpx.Response) -> None:
        found = _SERVER_TIMING.search(response.headers.get("server-timing", ""))
        if found:
            server_ms.append(float(found.group(1)))

    async with RunwareClient(api_key=API_KEY, base_url=f"{base_url}/v1") as client:
        client._http.event_hooks["response"].append(hook)
        for i in range(repeat + 3):
            if i == 3:
                cpu0, server0 = time.process_time(), server_cpu()
            server_ms.clear()
            t0 = time.perf_counter()
            task = PreprocessTask.build("canny", b64, outputType="base64Data", outputFormat="PNG")
            result = await client.preprocess(task)
            assert result.guide_bytes()
            if i >= 3:  # warm-up: connection, first-call imports
                out.total.append((time.perf_counter() - t0) * 1000)
                out.server.extend(server_ms)
        if repeat:
            out.client_cpu = (time.process_time() - cpu0) * 1000 / repeat
            server1 = server_cpu()
            if server0 is not None and server1 is not None:
                out.server_cpu = (server1 - server0) * 1000 / repeat
            _client_side(client, task, b64, out, repeat)
    return out


def _client_side(client: Any, task: Any, b64: str, out: _Samples, repeat: int) -> None:
    """Time the client's own CPU work: request build + JSON encode, answer parse + decode.

    The answer is a synthetic body of the real one's size (a 25 KB guide image).
    """
    from connectors import runware
    from connectors.runware import _classify, _Envelope
    from engine import imageio
    from guideflow.protocol import PreprocessTask

    guide = imageio.encode_base64(b"\x89PNG" + bytes(25_000))
    answer = (
        b'{"data":[{"taskType":"controlNetPreprocess","taskUUID":"'
        + task.taskUUID.encode()
        + b'","guideImageUUID":"u","inputImageUUID":"v","guideImageBase64Data":"'
        + guide.encode()
        + b'"}]}'
    )
    for _ in range(repeat):
        t0 = time.perf_counter()
        built = PreprocessTask.build("canny", b64, outputType="base64Data", outputFormat="PNG")
        body = runware._json_body([built.wire()])  # what RunwareClient sends
        client._http.build_request("POST", client.base_url, content=body).read()
        out.build.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        parsed = client._parse_body(httpx.Response(200, content=answer))
        assert parsed is not None
        _classify(task, _Envelope.of(parsed, 200, None)).guide_bytes()
        out.parse.append((time.perf_counter() - t0) * 1000)


def _row(label: str, samples: list[float]) -> str:
    if not samples:
        return f"{label:<34}{'n/a':>10}{'n/a':>10}{'n/a':>10}"
    median, p90 = _stats(samples)
    return f"{label:<34}{median:>10.1f}{p90:>10.1f}{min(samples):>10.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument(
        "--image", type=Path, default=REPO.parent / "shared" / "testdata" / "images" / "room.png"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the client's build and parse steps"
    )
    parser.add_argument(
        "--server-thread",
        action="store_true",
        help="run the server in a thread of this process (shares the GIL with the client)",
    )
    parser.add_argument("--workers", type=int, default=2, help="server worker threads")
    args = parser.parse_args()

    from engine import Engine

    png = _photo(args.image)
    engine = Engine()
    for _ in range(3):
        engine.preprocess(png, "canny", output_format="PNG")
    local: list[float] = []
    cpu0 = time.process_time()
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        engine.preprocess(png, "canny", output_format="PNG")
        local.append((time.perf_counter() - t0) * 1000)
    local_cpu = (time.process_time() - cpu0) * 1000 / max(1, args.repeat)

    serve = _server_thread if args.server_thread else _server_subprocess
    with serve(args.workers) as (base_url, server_cpu):
        remote = asyncio.run(_http(base_url, server_cpu, png, args.repeat))

    where = "thread" if args.server_thread else "subprocess"
    lm, l90 = _stats(local)
    rm, r90 = _stats(remote.total)
    print(
        f"sync canny, 512x512 PNG in and out, {args.repeat} requests, server in a {where}, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'path':<34}{'median ms':>10}{'p90 ms':>10}{'min ms':>10}")
    print(_row("engine in-process", local))
    print(_row("guideflow serve (HTTP)", remote.total))
    low = min(remote.total) - min(local)
    print(f"{'HTTP overhead':<34}{rm - lm:>10.1f}{r90 - l90:>10.1f}{low:>10.1f}")
    print(_row("  server's own time (app)", remote.server))
    if args.breakdown:
        cpus = (
            ("engine in-process", local_cpu),
            ("server process", remote.server_cpu),
            ("client+server" if args.server_thread else "client process", remote.client_cpu),
        )
        for label, cpu in cpus:
            text = "n/a" if cpu is None else f"{cpu:.1f}"
            print(f"{'  CPU ms/request, ' + label:<34}{text:>10}")
        print(_row("  client: build + JSON encode", remote.build))
        print(_row("  client: parse + decode answer", remote.parse))


if __name__ == "__main__":
    main()
