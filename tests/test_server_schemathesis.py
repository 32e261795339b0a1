"""Property-based API test: schemathesis drives ``/openapi.json`` against the live server.

Every operation (``POST /v1``, ``GET /image/{filename}``, ``GET /healthz``) gets a
bounded, derandomized set of generated requests (valid and invalid task
batches alike); the server must never answer 5xx. Outbound URLs in generated
tasks resolve (by an injected resolver) to a private address the policy
refuses, so no test request waits on DNS or reaches anything.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from engine.server import ServerConfig, create_app
from guideflow.netguard import NetPolicy
from tests.live_server import run_server, test_config


def _private_resolver(host: str, port: int) -> list[str]:
    return ["10.255.255.1"]  # refused by the policy: forbiddenURL, no I/O


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with run_server(_config()) as url:
        yield url


def _config() -> ServerConfig:
    policy = NetPolicy(resolver=_private_resolver)
    return test_config(net_policy=policy, webhook_attempts=1, queue_size=64)


# The document the live server serves (built by the same factory; no server needed to read it).
schema = schemathesis.openapi.from_dict(create_app(_config()).openapi())


def test_schema_is_the_served_one(base_url: str) -> None:
    assert httpx.get(f"{base_url}/openapi.json").json() == schema.raw_schema


@schema.parametrize()
@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=30)
