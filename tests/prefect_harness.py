"""One ephemeral Prefect API for the whole test session (``prefect_test_harness``).

Starting it costs seconds (more on a loaded machine), so every module that runs flows
shares this one instead of starting its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
