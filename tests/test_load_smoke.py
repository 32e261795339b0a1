"""CI smoke version of ``bench/load.py``: 10 s of concurrent load on a real ``guideflow serve``.

The server runs in its own process (the benchmark's :func:`bench.load.start_server`),
driven by the benchmark's own :func:`bench.load.drive`. Behaviour, not speed, is
asserted: no 5xx, only 200s and 429s-with-Retry-After, every guide a 512×512 PNG
(fully decoded), the server healthy and its RSS bounded afterwards. The queue is
deliberately tiny (3 tasks, batches of 2) so that admission control is exercised:
any two overlapping batches cannot both fit.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.load import (
    LoadOptions,
    check_png,
    drive,
    linear_slope,
    percentile,
    photo_png,
    start_server,
)


def _png(width: int, height: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_check_png_accepts_only_512_square_pngs() -> None:
    assert check_png(_png(512, 512), "decode") is None
    assert check_png(_png(512, 512), "header") is None
    assert "size 512x256" in (check_png(_png(512, 256), "decode") or "")
    assert "size 256x512" in (check_png(_png(256, 512), "header") or "")
    assert check_png(_png(512, 512, "JPEG"), "header") is not None
    truncated = _png(512, 512)[:60]  # header intact, pixel data cut: only a decode notices
    assert check_png(truncated, "header") is None
    assert check_png(truncated, "decode") is not None


def test_percentile_and_slope() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert linear_slope([(0, 100.0), (1, 102.0), (2, 104.0)]) == pytest.approx(2.0)
    assert linear_slope([(0, 5.0), (1, 5.0), (2, 5.0)]) == 0.0
    assert linear_slope([(0, 5.0)]) == 0.0


def test_photo_is_a_512_square_png(images_dir: Path) -> None:
    png = photo_png(images_dir / "room.png")
    with Image.open(io.BytesIO(png)) as im:
        assert (im.format, im.size, im.mode) == ("PNG", (512, 512), "RGB")
        assert np.asarray(im).std() > 10  # a real photo, not a blank canvas


@pytest.mark.timeout(120)
def test_ten_seconds_of_load(images_dir: Path) -> None:
    """10 s, 4 clients × batch 2 against queue 3: both 200s and 429s must occur."""
    opts = LoadOptions(duration=10, clients=4, batch=2, verify="decode", sample_interval=1.0)
    png = photo_png(images_dir / "room.png")
    with start_server(workers=2, queue_size=3) as server:
        report = asyncio.run(drive(server, png, opts, "room.png"))
        print(report.table())

        assert report.server_errors == 0
        assert report.other_statuses == {}
        assert not report.transport_errors
        assert report.answered == report.ok + report.rate_limited
        assert report.ok >= 1
        assert report.rate_limited >= 1
        assert report.missing_retry_after == 0
        assert report.bad_items == 0, report.bad_samples
        assert report.tasks_ok == report.ok * opts.batch
        assert len(report.latency_ok_ms) == report.ok

        # The server is still up, idle and healthy, with nothing left in flight.
        assert server.proc.poll() is None
        health = httpx.get(f"{server.base_url}/healthz", trust_env=False, timeout=10)
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        assert health.json()["inFlight"] == 0
        assert server.log_problems() == []

        # RSS was sampled through the run and stays within a generous bound.
        assert len(report.rss_series) >= 5
        assert report.rss_idle_mb > 0
        assert report.rss_end_mb < report.rss_idle_mb + 300
        assert report.rss_max_mb < report.rss_idle_mb + 300
