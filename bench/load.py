"""Load test of ``guideflow serve``: many concurrent clients, canny at 512², for a fixed time.

    python bench/load.py [--duration 60] [--clients 16] [--workers 2] [--batch 1]
                         [--queue-size N] [--output-type base64Data|URL] [--image PATH]
                         [--verify header|decode|none] [--ignore-retry-after]

The server runs in its **own process**: ``python -m guideflow.cli serve`` on
127.0.0.1 (a free port), auth on (a random API key passed in ``GUIDEFLOW_API_KEYS``
to the child only), ``--workers N``, optionally ``--queue-size``, warning-level logs
to a file, images stored in a private temp dir removed afterwards. The load generator
runs here: ``--clients C`` asyncio loops sharing one :class:`httpx.AsyncClient`, each
POSTing ``--batch`` canny tasks at a time until ``--duration`` seconds have passed or
``--max-requests`` POSTs were sent in all (whichever comes first; a request still in
flight at the deadline is awaited, bounded by ``--timeout``).

The input is a real photo (default ``../shared/testdata/images/room.png``),
centre-cropped to a square and resized to 512×512, sent inline as base64 PNG in the
task's ``inputs.image``; every task has a fresh taskUUID. The output is
``outputType=base64Data`` by default (the guide comes back in the answer, so a 200
can be checked without a second request); with ``--output-type URL`` each loop also
GETs every ``guideImageURL`` (that GET is checked but not part of the latency).
Every 200 item is checked as a 512×512 PNG: ``header`` (signature + IHDR, cheap,
the default), ``decode`` (full decode with Pillow) or ``none``.

A 429 must carry ``Retry-After``; the loop then waits that long (capped by the time
left) unless ``--ignore-retry-after``. Any 5xx, other status, transport error, bad
guide image or 429 without ``Retry-After`` is a problem: the table lists them and
the exit status is 1.

Reported: throughput (200 requests/s, all answered requests/s, tasks/s), latency
p50/p95/p99/max of 200s and of 429s (client-side, POST sent → answer read), the
status counts, and the server's RSS (``VmRSS`` of ``/proc/<pid>/status``): once idle
before any request, then every ``--sample-interval`` s during the run and once at the
end, with a least-squares slope in MB/min (a leak shows as a steadily positive slope).
Three sequential warm-up requests run before the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_IMAGE = REPO.parent / "shared" / "testdata" / "images" / "room.png"
SIDE = 512
HOST = "127.0.0.1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Verify = str  # "header" | "decode" | "none"


# --------------------------------------------------------------------------------------
# Input photo
# --------------------------------------------------------------------------------------


def photo_png(path: Path, side: int = SIDE) -> bytes:
    """``path`` decoded (alpha composited over white), centre-cropped square, ``side``² PNG."""
    import cv2

    from engine import imageio

    rgb = imageio.decode_image(path.read_bytes())
    h, w = rgb.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    square = rgb[y0 : y0 + s, x0 : x0 + s]
    interp = cv2.INTER_AREA if s >= side else cv2.INTER_CUBIC
    resized = cv2.resize(square, (side, side), interpolation=interp)
    return imageio.encode_image(resized, "PNG")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ``ValueError`` when it is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG (bad signature or no IHDR)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def check_png(data: bytes, verify: Verify, side: int = SIDE) -> str | None:
    """None when ``data`` is a ``side``×``side`` PNG (as far as ``verify`` looks), else why not."""
    if verify == "none":
        return None
    try:
        size = png_size(data)
        if verify == "decode":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                if im.format != "PNG":
                    return f"Pillow reads {im.format}, not PNG"
                im.load()
                size = im.size
    except Exception as exc:  # any decode failure is a bad guide, reported, not raised
        return f"{type(exc).__name__}: {exc}"
    return None if size == (side, side) else f"size {size[0]}x{size[1]}, expected {side}x{side}"


# --------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------


def read_rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB → MB (MiB)
    raise RuntimeError(f"no VmRSS for pid {pid} (exited?)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running ``guideflow serve`` child: its pid, URL, API key and log file."""

    proc: subprocess.Popen[bytes]
    base_url: str
    api_key: str
    log_path: Path
    workers: int
    queue_size: int | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return read_rss_mb(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_problems(self) -> list[str]:
        """Log lines showing a server-side failure (tracebacks, ERROR/CRITICAL records)."""
        return [
            line
            for line in self.log_text().splitlines()
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
        ]


@contextlib.contextmanager
def start_server(
    *,
    workers: int = 2,
    queue_size: int | None = None,
    extra_args: tuple[str, ...] = (),
    startup_timeout: float = 60.0,
) -> Iterator[ServerProcess]:
    """Run ``guideflow serve`` as a child process on 127.0.0.1; stop it (SIGTERM) on exit.

    The API key is random and given to the child only (``GUIDEFLOW_API_KEYS``). Images
    and the log live in a temp dir that is removed afterwards, whatever happened.
    """
    tmp = Path(tempfile.mkdtemp(prefix="guideflow-load-"))
    api_key = secrets.token_hex(16)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "guideflow.cli",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--storage-dir",
        str(tmp / "store"),
        "--log-level",
        "warning",
        *(["--queue-size", str(queue_size)] if queue_size is not None else []),
        *extra_args,
    ]
    env = {**os.environ, "GUIDEFLOW_API_KEYS": api_key, "PYTHONUNBUFFERED": "1"}
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = ServerProcess(proc, f"http://{HOST}:{port}", api_key, log_path, workers, queue_size)
    try:
        _wait_healthy(server, startup_timeout)
        yield server
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_healthy(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"guideflow serve exited with {server.proc.returncode}:\n"
                    + server.log_text()[-3000:]
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.base_url}/healthz").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"guideflow serve not healthy after {timeout} s")
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n·p/100), at least 1
    return ordered[int(rank) - 1]


def linear_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx of ``points``; 0.0 with fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


@dataclass
class LoadReport:
    """Everything one run measured (counts, latencies, RSS samples) and how to print it."""

    preprocessor: str
    image: str
    output_type: str
    clients: int
    batch: int
    workers: int
    queue_size: int | None
    server_pid: int
    elapsed_s: float = 0.0
    status_counts: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    missing_retry_after: int = 0
    tasks_ok: int = 0
    bad_items: int = 0
    bad_samples: list[str] = field(default_factory=list)
    latency_ok_ms: list[float] = field(default_factory=list)
    latency_429_ms: list[float] = field(default_factory=list)
    rss_idle_mb: float = 0.0
    rss_series: list[tuple[float, float]] = field(default_factory=list)  # (s since start, MB)
    health_after: dict[str, Any] | None = None
    server_log_problems: list[str] = field(default_factory=list)
    load_before: float = 0.0
    load_after: float = 0.0

    # -- derived ------------------------------------------------------------------------

    @property
    def ok(self) -> int:
        return self.status_counts.get(200, 0)

    @property
    def rate_limited(self) -> int:
        return self.status_counts.get(429, 0)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.status_counts.items() if s >= 500)

    @property
    def other_statuses(self) -> dict[int, int]:
        return {s: n for s, n in self.status_counts.items() if s not in (200, 429) and s < 500}

    @property
    def answered(self) -> int:
        return sum(self.status_counts.values())

    def per_second(self, n: int) -> float:
        return n / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def rss_start_mb(self) -> float:
        return self.rss_series[0][1] if self.rss_series else float("nan")

    @property
    def rss_end_mb(self) -> float:
        return self.rss_series[-1][1] if self.rss_series else float("nan")

    @property
    def rss_max_mb(self) -> float:
        return max((mb for _, mb in self.rss_series), default=float("nan"))

    @property
    def rss_slope_mb_per_min(self) -> float:
        """Least-squares RSS trend over the whole measured window."""
        return linear_slope([(t / 60, mb) for t, mb in self.rss_series])

    @property
    def rss_late_slope_mb_per_min(self) -> float:
        """The same over the second half only: the first seconds' ramp-up (pool threads,
        allocator arenas, ``clients`` bodies in flight at once) does not count there."""
        half = self.rss_series[-1][0] / 2 if self.rss_series else 0.0
        return linear_slope([(t / 60, mb) for t, mb in self.rss_series if t >= half])

    def problems(self) -> list[str]:
        """What went wrong (empty for a clean run): the things a load test must not see."""
        out: list[str] = []
        if self.server_errors:
            out.append(f"{self.server_errors} answer(s) with a 5xx status")
        if self.other_statuses:
            out.append(f"unexpected statuses: {self.other_statuses}")
        if self.transport_errors:
            out.append(f"transport errors: {dict(self.transport_errors)}")
        if self.missing_retry_after:
            out.append(f"{self.missing_retry_after} 429(s) without a valid Retry-After")
        if self.bad_items:
            out.append(f"{self.bad_items} bad guide item(s), e.g. {self.bad_samples[:3]}")
        if self.health_after is None or self.health_after.get("status") != "ok":
            out.append(f"/healthz after the run: {self.health_after}")
        if self.server_log_problems:
            out.append(f"server log: {self.server_log_problems[:3]}")
        return out

    # -- printing -----------------------------------------------------------------------

    def table(self) -> str:
        """The human-readable result (what ``bench/load.py`` prints)."""

        def lat(values: list[float]) -> str:
            if not values:
                return "-"
            ps = "  ".join(f"p{p} {percentile(values, p):7.1f}" for p in (50, 95, 99))
            return f"{ps}  max {max(values):7.1f}  (n={len(values)})"

        queue = self.queue_size if self.queue_size is not None else "default"
        other = sum(self.other_statuses.values())
        transport = sum(self.transport_errors.values())
        health = self.health_after or {}
        series = "  ".join(f"{t:4.0f}s {mb:6.1f}" for t, mb in self.rss_series)
        rows = [
            ("setup", f"{self.preprocessor} on {self.image} 512x512 PNG in, "
             f"{self.output_type} out"),
            ("server", f"guideflow serve pid {self.server_pid}, {self.workers} workers, "
             f"queue {queue}"),
            ("load generator", f"{self.clients} clients x batch {self.batch}, "
             f"{self.elapsed_s:.1f} s measured"),
            ("machine", f"{os.cpu_count()} CPUs, load avg {self.load_before:.2f} before, "
             f"{self.load_after:.2f} after"),
            ("requests answered", f"{self.answered}: 200 {self.ok}, 429 {self.rate_limited}, "
             f"5xx {self.server_errors}, other {other}; transport errors {transport}"),
            ("throughput", f"{self.per_second(self.ok):.2f} req/s (200), "
             f"{self.per_second(self.answered):.2f} req/s (all), "
             f"{self.per_second(self.tasks_ok):.2f} tasks/s"),
            ("latency 200 (ms)", lat(self.latency_ok_ms)),
            ("latency 429 (ms)", lat(self.latency_429_ms)),
            ("429 w/o Retry-After", str(self.missing_retry_after)),
            ("guide images", f"{self.tasks_ok} ok, {self.bad_items} bad"),
            ("server RSS (MB)", f"idle {self.rss_idle_mb:.1f}, start {self.rss_start_mb:.1f}, "
             f"end {self.rss_end_mb:.1f}, max {self.rss_max_mb:.1f}, "
             f"slope {self.rss_slope_mb_per_min:+.2f} MB/min "
             f"(2nd half {self.rss_late_slope_mb_per_min:+.2f})"),
            ("RSS series", series),
            ("healthz after", f"{health.get('status')} (inFlight {health.get('inFlight')}, "
             f"capacity {health.get('capacity')})"),
            ("server log problems", str(len(self.server_log_problems))),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        problems = self.problems()
        lines.append(f"{'verdict':<{width}}  " + ("; ".join(problems) if problems else "clean"))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The load generator
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """What one run sends, how many at once, and for how long."""

    duration: float = 60.0
    clients: int = 16
    batch: int = 1
    output_type: str = "base64Data"  # or "URL"
    verify: Verify = "header"
    respect_retry_after: bool = True
    max_requests: int = 1_000_000
    timeout: float = 60.0
    sample_interval: float = 5.0
    warmup_requests: int = 3
    preprocessor: str = "canny"

    def __post_init__(self) -> None:
        if self.output_type not in ("base64Data", "URL"):
            raise ValueError(f"output_type must be base64Data or URL, got {self.output_type!r}")
        if self.verify not in ("header", "decode", "none"):
            raise ValueError(f"verify must be header, decode or none, got {self.verify!r}")
        if min(self.clients, self.batch, self.max_requests) < 1 or self.duration <= 0:
            raise ValueError("clients, batch and max_requests must be >= 1, duration > 0")


class BodyFactory:
    """JSON bodies of ``batch`` tasks, each with a fresh taskUUID, built by string splicing.

    The task (built and validated once through :class:`guideflow.protocol.PreprocessTask`)
    is serialised once with a placeholder UUID; per request only the UUIDs change, so the
    ~0.5 MB base64 image is not re-encoded ``clients`` times per second.
    """

    PLACEHOLDER = "00000000-0000-4000-8000-000000000000"

    def __init__(self, png: bytes, opts: LoadOptions) -> None:
        from guideflow.protocol import PreprocessTask

        task = PreprocessTask.build(
            opts.preprocessor,
            base64.b64encode(png).decode(),
            task_uuid=self.PLACEHOLDER,
            outputType=opts.output_type,
            outputFormat="PNG",
        )
        text = json.dumps(task.wire(), separators=(",", ":"))
        head, sep, tail = text.partition(self.PLACEHOLDER)
        if not sep:
            raise RuntimeError("the task's wire form lost its taskUUID")
        self._head, self._tail = head.encode(), tail.encode()
        self.batch = opts.batch

    def __call__(self) -> tuple[bytes, list[str]]:
        from guideflow.protocol import new_task_uuid

        uuids = [new_task_uuid() for _ in range(self.batch)]
        parts = [self._head + u.encode() + self._tail for u in uuids]
        return b"[" + b",".join(parts) + b"]", uuids


class _Budget:
    """A shared count of POSTs left, so the loops are bounded in number as well as time."""

    def __init__(self, n: int) -> None:
        self.left = n

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("retry-after", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


async def _check_items(
    client: httpx.AsyncClient,
    resp: httpx.Response,
    uuids: list[str],
    opts: LoadOptions,
    report: LoadReport,
) -> None:
    """Count the good guide items of a 200 answer; record why the others are bad."""

    def bad(why: str) -> None:
        report.bad_items += 1
        if len(report.bad_samples) < 10:
            report.bad_samples.append(why)

    try:
        body = resp.json()
        items = {item.get("taskUUID"): item for item in body.get("data") or []}
    except (ValueError, AttributeError) as exc:
        bad(f"unreadable 200 body: {exc}")
        return
    for task_uuid in uuids:
        item = items.get(task_uuid)
        if item is None:
            bad(f"no data item for task {task_uuid}: errors {body.get('errors')}")
            continue
        try:
            data = await _guide_bytes(client, item, opts)
        except (ValueError, KeyError, httpx.HTTPError) as exc:
            bad(f"task {task_uuid}: {type(exc).__name__}: {exc}")
            continue
        why = check_png(data, opts.verify)
        if why is None:
            report.tasks_ok += 1
        else:
            bad(f"task {task_uuid}: {why}")


async def _guide_bytes(client: httpx.AsyncClient, item: dict[str, Any], opts: LoadOptions) -> bytes:
    if opts.output_type == "base64Data":
        return base64.b64decode(item["guideImageBase64Data"], validate=True)
    url = item["guideImageURL"]
    if httpx.URL(url).host != HOST:
        raise ValueError(f"guideImageURL outside {HOST}: {url}")
    got = await client.get(url)
    if got.status_code != 200:
        raise ValueError(f"GET guideImageURL answered {got.status_code}")
    return got.content


async def _client_loop(
    client: httpx.AsyncClient,
    url: str,
    bodies: BodyFactory,
    opts: LoadOptions,
    report: LoadReport,
    deadline: float,
    budget: _Budget,
) -> None:
    """POST until the deadline or the shared budget runs out; tally every answer."""
    while time.monotonic() < deadline and budget.take():
        body, uuids = bodies()
        t0 = time.perf_counter()
        try:
            resp = await client.post(url, content=body)
        except httpx.HTTPError as exc:
            report.transport_errors[type(exc).__name__] += 1
            await asyncio.sleep(0.1)  # a dead server must not turn this into a hot loop
            continue
        ms = (time.perf_counter() - t0) * 1000
        report.status_counts[resp.status_code] += 1
        if resp.status_code == 200:
            report.latency_ok_ms.append(ms)
            await _check_items(client, resp, uuids, opts, report)
        elif resp.status_code == 429:
            report.latency_429_ms.append(ms)
            wait = _retry_after(resp)
            if wait is None:
                report.missing_retry_after += 1
            elif opts.respect_retry_after:
                await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))


async def _sample_rss(
    server: ServerProcess, report: LoadReport, t0: float, interval: float, stop: asyncio.Event
) -> None:
    """Append (seconds since ``t0``, RSS MB) every ``interval`` s until ``stop`` is set."""
    while True:
        with contextlib.suppress(OSError, RuntimeError):
            report.rss_series.append((time.monotonic() - t0, server.rss_mb()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return


async def _health(client: httpx.AsyncClient, base_url: str, settle: float = 10.0) -> dict | None:
    """``/healthz`` once nothing is in flight any more (or after ``settle`` s)."""
    deadline = time.monotonic() + settle
    body: dict | None = None
    while True:
        try:
            resp = await client.get(f"{base_url}/healthz")
            body = resp.json() if resp.status_code == 200 else {"httpStatus": resp.status_code}
        except (httpx.HTTPError, ValueError) as exc:
            body = {"error": type(exc).__name__}
        if body.get("inFlight") == 0 or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.2)


async def drive(
    server: ServerProcess, png: bytes, opts: LoadOptions, image_name: str = "photo"
) -> LoadReport:
    """Run the load described by ``opts`` against ``server``; return what was measured."""
    if httpx.URL(server.base_url).host != HOST:
        raise ValueError(f"the load generator only targets {HOST}, not {server.base_url}")
    report = LoadReport(
        preprocessor=opts.preprocessor,
        image=image_name,
        output_type=opts.output_type,
        clients=opts.clients,
        batch=opts.batch,
        workers=server.workers,
        queue_size=server.queue_size,
        server_pid=server.pid,
        load_before=os.getloadavg()[0],
    )
    bodies = BodyFactory(png, opts)
    url = f"{server.base_url}/v1"
    limits = httpx.Limits(max_connections=opts.clients, max_keepalive_connections=opts.clients)
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(
        limits=limits, timeout=opts.timeout, headers=headers, trust_env=False
    ) as client:
        report.rss_idle_mb = server.rss_mb()
        await _warm_up(client, url, bodies, opts.warmup_requests)
        stop = asyncio.Event()
        t0 = time.monotonic()
        deadline = t0 + opts.duration
        sampler = asyncio.create_task(_sample_rss(server, report, t0, opts.sample_interval, stop))
        budget = _Budget(opts.max_requests)
        loops = [
            _client_loop(client, url, bodies, opts, report, deadline, budget)
            for _ in range(opts.clients)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*loops), opts.duration + opts.timeout + 30)
        finally:
            report.elapsed_s = time.monotonic() - t0
            stop.set()
            await sampler
        with contextlib.suppress(OSError, RuntimeError):
            report.rss_series.append((time.monotonic() - t0, server.rss_mb()))
        report.health_after = await _health(client, server.base_url)
    report.server_log_problems = server.log_problems()
    report.load_after = os.getloadavg()[0]
    return report


async def _warm_up(client: httpx.AsyncClient, url: str, bodies: BodyFactory, n: int) -> None:
    """A few sequential requests (first-call imports, pool threads); each must answer 200."""
    for _ in range(n):
        body, _ = bodies()
        resp = await client.post(url, content=body)
        if resp.status_code != 200:
            raise RuntimeError(f"warm-up request answered {resp.status_code}: {resp.text[:500]}")


def run_load(
    image: Path = DEFAULT_IMAGE,
    opts: LoadOptions | None = None,
    *,
    workers: int = 2,
    queue_size: int | None = None,
) -> LoadReport:
    """Start ``guideflow serve`` (own process), drive it with ``opts``, stop it; the report."""
    opts = opts or LoadOptions()
    png = photo_png(image)
    with start_server(workers=workers, queue_size=queue_size) as server:
        return asyncio.run(drive(server, png, opts, image.name))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, echo: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client loops (16)")
    parser.add_argument("--batch", type=int, default=1, help="tasks per POST (1)")
    parser.add_argument("--workers", type=int, default=2, help="server worker threads (2)")
    parser.add_argument("--queue-size", type=int, default=None, help="server queue (default)")
    parser.add_argument("--output-type", choices=("base64Data", "URL"), default="base64Data")
    parser.add_argument("--verify", choices=("header", "decode", "none"), default="header")
    parser.add_argument("--ignore-retry-after", action="store_true", help="retry 429s at once")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="POSTs in all")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    parser.add_argument("--sample-interval", type=float, default=5.0, help="RSS sampling, s")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the input photo")
    args = parser.parse_args(argv)
    opts = LoadOptions(
        duration=args.duration,
        clients=args.clients,
        batch=args.batch,
        output_type=args.output_type,
        verify=args.verify,
        respect_retry_after=not args.ignore_retry_after,
        max_requests=args.max_requests,
        timeout=args.timeout,
        sample_interval=args.sample_interval,
    )
    report = run_load(args.image, opts, workers=args.workers, queue_size=args.queue_size)
    echo(report.table())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
