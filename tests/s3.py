"""Shared S3 test fixtures: one in-process moto S3 server for the whole test session.

Registered for every test module through ``pytest_plugins = ["tests.s3"]`` in
``tests/conftest.py``, so a test only asks for the fixtures by name:

- ``s3_endpoint`` (session): the server's endpoint URL, e.g. ``"http://127.0.0.1:53187"``.
  While it is active the environment holds the fake credentials ``testing``/``testing``
  and region ``us-east-1``, so s3fs/botocore need only ``endpoint_url=s3_endpoint``.
- ``s3_bucket`` (function): a fresh, empty bucket for one test, as ``"s3://<name>"``.
- ``make_bucket(endpoint, name) -> "s3://<name>"``: create a bucket yourself.
- ``s3_options(endpoint) -> dict``: fsspec ``storage_options`` for the server.

moto checks neither signatures nor credentials: tests that need to prove a
signature is right must recompute it (see tests/test_storage.py).
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

TEST_KEY = "testing"
TEST_SECRET = "testing"
TEST_REGION = "us-east-1"

# Values set for the session; anything that could point botocore elsewhere is removed.
_ENV_SET = {
    "AWS_ACCESS_KEY_ID": TEST_KEY,
    "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
    "AWS_DEFAULT_REGION": TEST_REGION,
    "AWS_CONFIG_FILE": "/nonexistent/guideflow-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/guideflow-test-aws-credentials",
}
_ENV_DROP = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GUIDEFLOW_S3_ENDPOINT",
)


def s3_options(endpoint: str) -> dict[str, Any]:
    """fsspec/s3fs ``storage_options`` that reach the moto server with the fake credentials."""
    return {"endpoint_url": endpoint, "key": TEST_KEY, "secret": TEST_SECRET}


@functools.cache
def _admin_fs(endpoint: str) -> Any:
    """One private sync s3fs per endpoint (a new client costs ~0.5 s of model parsing)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint))


def make_bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` on the server at ``endpoint`` and return ``"s3://<name>"``.

    Names follow S3's rules: 3-63 lowercase letters, digits, dots and hyphens.
    """
    _admin_fs(endpoint).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start one moto S3 server on a free port for the session; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name in _ENV_DROP:
            mp.delenv(name, raising=False)
        for name, value in _ENV_SET.items():
            mp.setenv(name, value)
        # werkzeug logs every request at INFO; keep test output readable.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket for one test, as ``"s3://<unique name>"``."""
    return make_bucket(s3_endpoint, f"test-{uuid.uuid4().hex[:16]}")
