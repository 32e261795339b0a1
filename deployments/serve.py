"""Run guideflow's schedules without a work pool: ``python deployments/serve.py``.

``Flow.serve`` keeps this process alive, polls the Prefect API for scheduled runs of
these deployments and executes them here: the simplest way to get a nightly job.
"""

from __future__ import annotations

import os

from prefect import serve

from flows.preprocess import preprocess_manifest

DATASET = os.environ.get("GUIDEFLOW_DATASET", "s3://my-datasets")


def main() -> None:
    nightly = preprocess_manifest.to_deployment(
        name="nightly",
        cron="0 2 * * *",
        parameters={
            "manifest": f"{DATASET}/photos/manifest.parquet",
            "preprocessors": ["canny", "depth"],
            "output": f"{DATASET}/guides",
            "ledger": f"{DATASET}/guideflow-ledger",
            "max_cost": 50.0,
        },
    )
    backfill = preprocess_manifest.to_deployment(
        name="backfill",
        parameters={
            "manifest": f"{DATASET}/backfill.csv",
            "preprocessors": ["canny"],
            "output": f"{DATASET}/guides",
            "ledger": f"{DATASET}/guideflow-ledger",
        },
    )
    serve(nightly, backfill)


if __name__ == "__main__":
    main()
