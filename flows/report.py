"""What a run shows people: a summary table artifact and a contact sheet.

The contact sheet is a PNG grid of sample inputs beside their guide images, written
next to the outputs (``<output>/_contact_sheets/<run_id>.png``) and linked from a
markdown artifact, so a reviewer can eyeball a run without opening a bucket.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

from connectors import storage
from engine import imageio

if TYPE_CHECKING:
    from flows.preprocess import RunSummary
    from tasks.work import RunConfig

THUMB_HEIGHT = 160
GAP = 6


def _thumb(data: bytes) -> np.ndarray:
    rgb = imageio.decode_image(data)
    width = max(1, round(rgb.shape[1] * THUMB_HEIGHT / rgb.shape[0]))
    if rgb.shape[0] > THUMB_HEIGHT:
        return imageio.resize_to(rgb, (width, THUMB_HEIGHT))
    pad = np.full((THUMB_HEIGHT, rgb.shape[1], 3), 255, np.uint8)
    pad[: rgb.shape[0]] = rgb
    return pad


async def contact_sheet_png(samples: list[tuple[str, str, str]]) -> bytes | None:
    """One row per sample: input | guide image. ``None`` when no sample can be read."""
    rows: list[np.ndarray] = []
    for input_uri, output_uri, _name in samples:
        try:
            left = _thumb(await storage.read_bytes(input_uri, max_bytes=64 << 20))
            right = _thumb(await storage.read_bytes(output_uri, max_bytes=64 << 20))
        except Exception:  # a sample that vanished must not fail the run
            continue
        gap = np.full((THUMB_HEIGHT, GAP, 3), 255, np.uint8)
        rows.append(np.concatenate([left, gap, right], axis=1))
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    canvas = np.full((len(rows) * (THUMB_HEIGHT + GAP) - GAP, width, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        y = i * (THUMB_HEIGHT + GAP)
        canvas[y : y + THUMB_HEIGHT, : r.shape[1]] = r
    return imageio.encode_image(canvas, "PNG")


async def write_contact_sheet(config: RunConfig, summary: RunSummary, run_id: str) -> str | None:
    """Write the contact sheet next to the outputs; return its URL (or None)."""
    samples = summary.samples
    if not samples:
        return None
    png = await contact_sheet_png(samples[: config.contact_sheet_samples])
    if png is None:
        return None
    url = f"{config.output.rstrip('/')}/_contact_sheets/{run_id}.png"
    await storage.write_bytes(url, png, content_type="image/png")
    return url


async def publish_summary(config: RunConfig, summary: RunSummary) -> None:
    """Final table artifact (counts, errors by code, cost by preprocessor) + markdown link."""
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

    table: list[dict[str, Any]] = [
        {"metric": "shards", "value": summary.shards},
        {"metric": "rows", "value": summary.rows},
        {"metric": "guide images made", "value": summary.success},
        {"metric": "errors", "value": summary.errors},
        {"metric": "skipped (duplicates)", "value": summary.skipped},
        {"metric": "already in ledger", "value": summary.already_done},
        {"metric": "cost_usd", "value": round(summary.cost_usd, 6)},
    ]
    table += [
        {"metric": f"error {k}", "value": v} for k, v in sorted(summary.errors_by_code.items())
    ]
    table += [
        {"metric": f"cost {k}", "value": round(v, 6)}
        for k, v in sorted(summary.cost_by_preprocessor.items())
    ]
    with contextlib.suppress(Exception):  # artifacts are best effort
        await acreate_table_artifact(table, key="guideflow-summary", description="run summary")
        sheet = summary.contact_sheet
        text = "# guideflow run\n\n" + "\n".join(f"- {r['metric']}: {r['value']}" for r in table)
        if sheet:
            text += f"\n\n[Contact sheet: sample inputs beside their guide images]({sheet})\n"
        await acreate_markdown_artifact(text, key="guideflow-contact-sheet")
