"""connectors.storage's fast SigV4 presigning path, checked against botocore URL for URL.

After botocore has signed one URL of a bucket, later URLs of that bucket are signed by a
learned template (no botocore call, no thread hop). These tests prove that the template's
URLs are *byte-identical* to what botocore's own ``generate_presigned_url`` produces for
the same key at the same second (botocore's clock frozen at the template URL's
``X-Amz-Date``), for path-style and virtual-hosted endpoints, with and without a session
token, GET and PUT, sync- and async-mode s3fs; and that odd keys, expired templates and
templates that cannot reproduce botocore's URL all fall back to botocore. Signing is
local: no S3 server is contacted.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import botocore.auth
import pytest

from connectors import storage

KEY, SECRET = "AKIDFASTPATHTEST", "fast/path+secret=="
PNG = "image/png"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (*storage.S3_ENDPOINT_ENV, "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/guideflow-fast-presign-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/guideflow-fast-presign")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage._templates.clear()  # filesystems with equal options share templates
    yield
    storage._templates.clear()


def make_fs(
    endpoint: str | None, token: str | None, asynchronous: bool, region: str = "us-east-1"
) -> Any:
    options: dict[str, Any] = {
        "key": KEY,
        "secret": SECRET,
        "token": token,
        "skip_instance_cache": True,
        "asynchronous": asynchronous,
        "client_kwargs": {"region_name": region},
    }
    if endpoint:
        options["endpoint_url"] = endpoint
    return storage.url_to_fs("s3://unused", **options)[0]


def amz_date(url: str) -> datetime:
    return datetime.strptime(dict(parse_qsl(urlsplit(url).query))["X-Amz-Date"], "%Y%m%dT%H%M%SZ")


async def botocore_url(fs: Any, url: str, method: str, params: dict[str, str], at: datetime) -> str:
    """What botocore itself signs for ``url`` with ``fs``'s client at time ``at``."""
    path = fs._strip_protocol(url)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=at):
        if fs.asynchronous:
            return await storage._presign_async(fs, path, method, 900, params)
        return storage._presign_sync(fs, path, method, 900, params)


async def presign(fs: Any, url: str, method: str) -> str:
    if method == "put_object":
        return await storage.presign_put(url, content_type=PNG, expires=900, fs=fs)
    return await storage.presign_get(url, expires=900, fs=fs)


async def template_url(fs: Any, url: str, method: str) -> str:
    """``url`` presigned with botocore forbidden, checked equal to what botocore signs for it."""
    params = {"ContentType": PNG} if method == "put_object" else {}
    with (
        mock.patch.object(storage, "_presign_sync", side_effect=AssertionError),
        mock.patch.object(storage, "_presign_async", side_effect=AssertionError),
    ):
        fast = await presign(fs, url, method)
    assert fast == await botocore_url(fs, url, method, params, amz_date(fast))
    return fast


@pytest.mark.parametrize(
    ("endpoint", "token", "asynchronous", "region"),
    [
        ("http://127.0.0.1:9", None, False, "us-east-1"),
        ("http://127.0.0.1:9", "session/token+with=odd", True, "us-east-1"),
        ("https://minio.example:8443", None, True, "us-east-1"),
        (None, "tok", False, "eu-west-1"),  # AWS itself: virtual-hosted, regional
    ],
)
@pytest.mark.parametrize("method", ["put_object", "get_object"])
async def test_template_urls_equal_botocore_urls(
    endpoint: str | None, token: str | None, asynchronous: bool, region: str, method: str
) -> None:
    fs = make_fs(endpoint, token, asynchronous, region)
    try:
        first = await presign(fs, "s3://bench-bkt/out/first.png", method)
        assert storage._templates.get(fs), "botocore's first URL taught no template"
        # From now on botocore must not be asked (it fails if it is).
        fast = await template_url(fs, "s3://bench-bkt/out/canny/img-000042.png", method)
        assert fast != first
        query = dict(parse_qsl(urlsplit(fast).query))
        assert query["X-Amz-Expires"] == "900"
        assert query.get("X-Amz-Security-Token") == token
    finally:
        await storage.aclose(fs)


@pytest.mark.parametrize("key", ["out/with space.png", "out/caf\u00e9.png", "out/a%2Fb.png"])
async def test_keys_that_need_encoding_are_always_signed_by_botocore(key: str) -> None:
    fs = make_fs("http://127.0.0.1:9", None, asynchronous=False)
    await presign(fs, "s3://bkt/out/plain.png", "put_object")  # a template exists
    assert storage._fast_presign(fs, f"bkt/{key}", "put_object", 900, {"ContentType": PNG}) is None
    signed = await presign(fs, f"s3://bkt/{key}", "put_object")
    expected = await botocore_url(
        fs, f"s3://bkt/{key}", "put_object", {"ContentType": PNG}, amz_date(signed)
    )
    assert signed == expected


async def test_an_expired_template_sends_the_next_url_to_botocore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fs = make_fs("http://127.0.0.1:9", None, asynchronous=False)
    await presign(fs, "s3://bkt/a.png", "get_object")
    assert storage._fast_presign(fs, "bkt/b.png", "get_object", 900, {}) is not None
    later = storage.time.monotonic() + storage._TEMPLATE_TTL_S + 1
    monkeypatch.setattr(storage.time, "monotonic", lambda: later)
    assert storage._fast_presign(fs, "bkt/b.png", "get_object", 900, {}) is None
    calls: list[str] = []
    real = storage._presign_sync

    def counting(*args: Any) -> str:
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(storage, "_presign_sync", counting)
    await presign(fs, "s3://bkt/b.png", "get_object")
    assert calls == ["bkt/b.png"]


async def test_a_template_that_cannot_reproduce_botocore_is_never_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fs = make_fs("http://127.0.0.1:9", None, asynchronous=False)
    real_sign = storage._SigV4Template.sign

    def off_by_one(self: Any, *args: Any) -> str:
        return real_sign(self, *args) + "0"

    monkeypatch.setattr(storage._SigV4Template, "sign", off_by_one)
    await presign(fs, "s3://bkt/a.png", "put_object")
    assert not storage._templates.get(fs)
    assert storage._fast_presign(fs, "bkt/b.png", "put_object", 900, {"ContentType": PNG}) is None


@pytest.mark.parametrize("method", ["put_object", "get_object"])
async def test_warm_presigning_teaches_the_bucket_so_the_first_url_needs_no_botocore(
    method: str,
) -> None:
    fs = make_fs("http://127.0.0.1:9", None, asynchronous=False)
    try:
        storage.warm_presigning("s3://warm-bkt/guides/", fs=fs)
        assert storage._templates.get(fs), "warming learned no template"
        await template_url(fs, "s3://warm-bkt/guides/canny/a1.png", method)
        # Another bucket was not warmed: botocore signs its first URL.
        with (
            mock.patch.object(storage, "_presign_sync", side_effect=RuntimeError("botocore")),
            pytest.raises(RuntimeError, match="botocore"),
        ):
            await presign(fs, "s3://other-bkt/guides/canny/a1.png", method)
    finally:
        await storage.aclose(fs)


@pytest.mark.parametrize("url", ["memory://x/y", "s3://", "s3://Bad_Bucket!/k", "file:///tmp/x"])
def test_warm_presigning_ignores_what_it_cannot_warm(url: str) -> None:
    fs = make_fs("http://127.0.0.1:9", None, asynchronous=False)
    storage.warm_presigning(url, fs=fs)  # never raises
    assert not storage._templates.get(fs)


def test_run_warm_up_prepares_the_http_backends_first_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``guideflow run``'s warm-up: output bucket templates learned on the default fs."""
    from flows.preprocess import build_config
    from tasks.shard import warm_up

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("GUIDEFLOW_S3_ENDPOINT", "http://127.0.0.1:9")
    config = build_config(
        manifest="s3://in-bkt/manifest.csv",
        preprocessors=["canny"],
        output="s3://out-bkt/guides",
        ledger="s3://out-bkt/ledger",
        backend="http",
        endpoint="http://127.0.0.1:9/v1",
    )
    warm_up(config)
    templates = storage._templates.get(storage.default_s3_fs())
    assert templates is not None
    assert {(bucket, method) for bucket, method, _ in templates} == {
        ("out-bkt", "put_object"),
        ("out-bkt", "get_object"),
    }
