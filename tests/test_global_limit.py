"""Prefect global concurrency limits: a named limit caps requests; a missing one fails loudly.

Runs the real flow on the session's ephemeral Prefect API (tests/prefect_harness.py) with
local files and the embedded engine.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pandas as pd
import pytest

from flows.preprocess import RunSummary, preprocess_manifest
from tests.conftest import thumbnails


def _manifest(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    lines = ["id,image"]
    for name, data in thumbnails(["room", "toy", "bird"], 96).items():
        (images / f"{name}.png").write_bytes(data)
        lines.append(f"{name},{images / name}.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


async def test_a_missing_global_limit_fails_the_run_before_any_work(
    tmp_path: Path, prefect_harness: None
) -> None:
    name = f"no-such-limit-{uuid.uuid4().hex[:8]}"
    state = await preprocess_manifest(
        manifest=str(_manifest(tmp_path)),
        preprocessors=["canny"],
        output=str(tmp_path / "out"),
        ledger=str(tmp_path / "ledger"),
        global_concurrency_limit=name,
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(Exception) as info:
        await state.result()
    assert name in str(info.value) and "prefect gcl create" in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ledger").exists()


async def test_an_existing_global_limit_is_used_and_released(
    tmp_path: Path, prefect_harness: None
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"guideflow-test-{uuid.uuid4().hex[:8]}"
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=1)
        )
    from prefect.concurrency.asyncio import concurrency

    manifest = _manifest(tmp_path)
    # Hold the limit's only slot: the run must not produce anything until it is free.
    async with concurrency(name, occupy=1):
        run = asyncio.ensure_future(
            preprocess_manifest(
                manifest=str(manifest),
                preprocessors=["canny"],
                output=str(tmp_path / "out"),
                ledger=str(tmp_path / "ledger"),
                global_concurrency_limit=name,
                shard_size=1,
                max_shards_in_flight=3,
            )
        )
        await asyncio.sleep(4)
        assert not run.done()
        assert not list((tmp_path / "out").rglob("*.png"))  # blocked on the slot we hold
    summary = await run
    assert isinstance(summary, RunSummary)
    assert summary.success == 3 and summary.errors == 0
    ledger = pd.read_parquet(tmp_path / "ledger")
    assert sorted(ledger["image_id"]) == ["bird", "room", "toy"]
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(name)
    assert limit.active_slots == 0  # every slot taken by a request was given back
