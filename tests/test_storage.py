"""connectors.storage: filesystems, output keys, SigV4 presigning, atomic whole-object I/O.

S3 runs against the session's moto server (tests/s3.py). moto accepts any signature,
so the presigning tests prove validity by recomputing each URL's signature with
botocore's own SigV4 query signer and checking that tampering changes it.
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import botocore.auth
import fsspec
import httpx
import pytest
import s3fs
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import EndpointConnectionError
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from connectors import storage
from connectors.storage import (
    StorageError,
    aclose,
    is_s3,
    output_key,
    presign_get,
    presign_put,
    read_bytes,
    url_to_fs,
    write_bytes,
)
from guideflow.errors import ImageTooLarge
from tests.s3 import TEST_KEY, TEST_REGION, TEST_SECRET

PNG = "image/png"


# --------------------------------------------------------------------------- helpers


def query(url: str) -> dict[str, str]:
    """The decoded query parameters of ``url``."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def botocore_presign(
    url: str,
    *,
    method: str,
    headers: dict[str, str] | None = None,
    path: str | None = None,
    expires: int | None = None,
    secret: str = TEST_SECRET,
) -> tuple[str, str]:
    """Re-sign ``url`` with botocore's S3SigV4QueryAuth at the URL's own X-Amz-Date.

    Everything not overridden (path, expiry) is taken from ``url``; returns the
    recomputed ``(signature, full presigned URL)``.
    """
    parts = urlsplit(url)
    params = query(url)
    unsigned = [(k, v) for k, v in params.items() if not k.startswith("X-Amz-")]
    base = urlunsplit((parts.scheme, parts.netloc, path or parts.path, urlencode(unsigned), ""))
    request = AWSRequest(method=method, url=base, headers=headers or {})
    signer = S3SigV4QueryAuth(
        Credentials(TEST_KEY, secret),
        "s3",
        TEST_REGION,
        expires=int(params["X-Amz-Expires"]) if expires is None else expires,
    )
    frozen = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=frozen):
        signer.add_auth(request)
    return query(request.url)["X-Amz-Signature"], request.url


def names_in(directory: Path) -> list[str]:
    """Sorted names of everything in ``directory`` (temp files included)."""
    return sorted(p.name for p in directory.iterdir())


@functools.cache
def s3_client_fs(endpoint: str) -> s3fs.S3FileSystem:
    """A plain sync s3fs (one per endpoint) for inspecting what the code under test stored."""
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


@pytest.fixture()
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point connectors.storage at moto through GUIDEFLOW_S3_ENDPOINT (no per-call options)."""
    monkeypatch.setenv("GUIDEFLOW_S3_ENDPOINT", s3_endpoint)
    return s3_endpoint


@pytest.fixture()
async def async_fs(s3_endpoint: str) -> AsyncIterator[s3fs.S3FileSystem]:
    """An asynchronous s3fs opened by url_to_fs on this test's loop, closed afterwards."""
    fs, _ = url_to_fs(
        "s3://unused", asynchronous=True, skip_instance_cache=True, endpoint_url=s3_endpoint
    )
    yield fs
    await aclose(fs)


@pytest.fixture(params=["default", "async", "sync"])
def s3_fs(request: pytest.FixtureRequest, s3_env: str) -> s3fs.S3FileSystem | None:
    """The ``fs=`` argument in its three supported shapes: None, async s3fs, sync s3fs."""
    if request.param == "default":
        return None
    if request.param == "async":
        return request.getfixturevalue("async_fs")
    return sync_fs(s3_env)


@functools.cache
def sync_fs(endpoint: str) -> s3fs.S3FileSystem:
    """A sync-mode s3fs from url_to_fs, private to these tests, one per endpoint."""
    return url_to_fs("s3://unused", skip_instance_cache=True, endpoint_url=endpoint)[0]


@pytest.fixture()
def memory_url() -> str:
    """A unique memory:// directory, emptied after the test."""
    root = f"memory://storage-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --------------------------------------------------------------------------- is_s3 / url_to_fs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/key.png", True),
        ("S3://bucket/key.png", True),
        ("s3a://bucket/key.png", True),
        ("gs://bucket/key.png", False),
        ("memory://bucket/key.png", False),
        ("file:///tmp/key.png", False),
        ("/tmp/s3/key.png", False),
        ("https://bucket.s3.amazonaws.com/key.png", False),
    ],
)
def test_is_s3(url: str, expected: bool) -> None:
    assert is_s3(url) is expected


def test_url_to_fs_takes_s3_endpoint_from_env_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """GUIDEFLOW_S3_ENDPOINT beats AWS_ENDPOINT_URL_S3 beats AWS_ENDPOINT_URL."""
    for name in storage.S3_ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    fs, path = url_to_fs("s3://bkt/dir/a.png", skip_instance_cache=True)
    assert path == "bkt/dir/a.png"
    assert fs.endpoint_url is None

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert url_to_fs("s3://bkt/a", skip_instance_cache=True)[0].endpoint_url == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    assert url_to_fs("s3://bkt/a", skip_instance_cache=True)[0].endpoint_url == "http://s3only:2"
    monkeypatch.setenv("GUIDEFLOW_S3_ENDPOINT", "http://ours:3")
    assert url_to_fs("s3://bkt/a", skip_instance_cache=True)[0].endpoint_url == "http://ours:3"


def test_url_to_fs_explicit_endpoint_and_config_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUIDEFLOW_S3_ENDPOINT", "http://env:1")
    fs, _ = url_to_fs("s3://bkt/a", skip_instance_cache=True, endpoint_url="http://mine:9")
    assert fs.endpoint_url == "http://mine:9"
    fs, _ = url_to_fs(
        "s3://bkt/a",
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": "http://client:8"},
        config_kwargs={"max_pool_connections": 7},
    )
    assert fs.endpoint_url is None  # the client_kwargs endpoint is left to s3fs
    assert fs.client_kwargs["endpoint_url"] == "http://client:8"
    # SigV4 is added for presigning without dropping the caller's config.
    assert fs.config_kwargs == {"max_pool_connections": 7, "signature_version": "s3v4"}


def test_url_to_fs_leaves_other_protocols_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUIDEFLOW_S3_ENDPOINT", "http://env:1")
    fs, path = url_to_fs("memory://some/where.png")
    assert isinstance(fs, MemoryFileSystem)
    assert path == "/some/where.png"
    fs, path = url_to_fs("/tmp/x/y.png")
    assert isinstance(fs, LocalFileSystem)
    assert path == "/tmp/x/y.png"


# --------------------------------------------------------------------------- output_key


def test_output_key_default_template() -> None:
    key = output_key(prefix="s3://bkt/out/", preprocessor="canny", image_id="img-42", ext="png")
    assert key == "s3://bkt/out/canny/img-42.png"
    assert storage.DEFAULT_OUTPUT_TEMPLATE == "{prefix}/{preprocessor}/{image_id}.{ext}"


@pytest.mark.parametrize(
    "image_id",
    ["../../etc/passwd", "/abs/path", "..", "a/../../b", "./x", "a//..//..//b", "..\\..\\win"],
)
def test_output_key_never_leaves_the_prefix(image_id: str) -> None:
    key = output_key(prefix="/data/out", preprocessor="depth", image_id=image_id, ext="webp")
    assert key.startswith("/data/out/depth/")
    assert posixpath.normpath(key).startswith("/data/out/depth/")
    assert "/../" not in key and "/./" not in key and "//" not in key
    assert key.endswith(".webp")


def test_output_key_keeps_subdirectories_and_escapes_odd_characters() -> None:
    key = output_key(prefix="out", preprocessor="seg", image_id="/cats/a b+c?.jpg", ext="png")
    assert key == "out/seg/cats/a%20b%2Bc%3F.jpg.png"
    # No prefix: the key must not start with "/" (object stores would see an empty segment).
    assert (
        output_key(
            "{prefix}/{image_id}.{ext}", prefix="", preprocessor="x", image_id="a", ext="png"
        )
        == "a.png"
    )


@pytest.mark.parametrize(
    ("a", "b"), [("a b", "a_b"), ("a b", "a%20b"), ("..", "%2E%2E"), ("x?", "x")]
)
def test_output_key_distinct_ids_get_distinct_keys(a: str, b: str) -> None:
    def key(image_id: str) -> str:
        return output_key(prefix="p", preprocessor="canny", image_id=image_id, ext="png")

    assert key(a) != key(b)


def test_output_key_extra_fields_are_single_segments() -> None:
    key = output_key(
        "{prefix}/{preprocessor}/{variant}/{image_id}.{ext}",
        prefix="memory://o",
        preprocessor="depth",
        image_id="i",
        ext="png",
        variant="a/../b",
    )
    assert key == "memory://o/depth/a%2F..%2Fb/i.png"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_id": ""}, "empty"),
        ({"image_id": "///"}, "empty"),
        ({"ext": ".png"}, "extension"),
        ({"ext": "png/../x"}, "extension"),
        ({"template": "{prefix}/{nope}.{ext}"}, "unknown fields"),
        ({"preprocessor": ""}, "empty"),
    ],
)
def test_output_key_rejects_bad_input(kwargs: dict[str, str], match: str) -> None:
    args = {"prefix": "p", "preprocessor": "canny", "image_id": "x", "ext": "png", **kwargs}
    template = args.pop("template", storage.DEFAULT_OUTPUT_TEMPLATE)
    with pytest.raises(ValueError, match=match):
        output_key(template, **args)


# --------------------------------------------------------------------------- presigning


@pytest.mark.parametrize(
    "url",
    [
        "memory://b/k.png",
        "/tmp/k.png",
        "file:///tmp/k.png",
        "gs://b/k.png",
        "https://b.s3.amazonaws.com/k.png",
        "s3://bucket-only",
        "s3://bucket-only/",
    ],
)
async def test_presign_rejects_non_s3_urls(url: str) -> None:
    with pytest.raises(ValueError):
        await presign_put(url, content_type=PNG)
    with pytest.raises(ValueError):
        await presign_get(url)


@pytest.mark.parametrize("expires", [0, -5, 7 * 24 * 3600 + 1, 1.5, True])
async def test_presign_rejects_bad_expiry(expires: object) -> None:
    with pytest.raises(ValueError, match="expires"):
        await presign_get("s3://bkt/k.png", expires=expires)  # type: ignore[arg-type]


async def test_presign_put_needs_a_content_type() -> None:
    with pytest.raises(ValueError, match="content_type"):
        await presign_put("s3://bkt/k.png", content_type=" ")


async def test_presign_refuses_a_sigv2_filesystem(s3_endpoint: str) -> None:
    """An s3fs built without s3v4 would presign with SigV2 (botocore's S3 default)."""
    fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, endpoint_url=s3_endpoint)
    try:
        with pytest.raises(ValueError, match="SigV4"):
            await presign_get("s3://bkt/k.png", fs=fs)
    finally:
        await aclose(fs)


async def test_presigned_put_signature_is_botocore_sigv4(
    s3_bucket: str, s3_endpoint: str, s3_fs: s3fs.S3FileSystem | None
) -> None:
    url = f"{s3_bucket}/guides/a b+c.png"
    signed = await presign_put(url, content_type=PNG, expires=900, fs=s3_fs)
    params = query(signed)
    bucket = s3_bucket.removeprefix("s3://")

    # The URL addresses the right object on the right endpoint with SigV4 query auth.
    assert signed.startswith(f"{s3_endpoint}/{bucket}/guides/a%20b%2Bc.png?")
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert params["X-Amz-Credential"] == (
        f"{TEST_KEY}/{params['X-Amz-Date'][:8]}/{TEST_REGION}/s3/aws4_request"
    )
    assert params["X-Amz-Expires"] == "900"
    assert params["X-Amz-SignedHeaders"].split(";") == ["content-type", "host"]

    # botocore's signer, same inputs and timestamp -> the very same URL and signature.
    put_headers = {"Content-Type": PNG}
    signature, resigned = botocore_presign(signed, method="PUT", headers=put_headers)
    assert signature == params["X-Amz-Signature"]
    assert resigned == signed

    # Change any signed input and the signature changes.
    tampered = {
        "method": botocore_presign(signed, method="GET", headers=put_headers)[0],
        "key": botocore_presign(
            signed, method="PUT", headers=put_headers, path=f"/{bucket}/guides/other.png"
        )[0],
        "content-type": botocore_presign(
            signed, method="PUT", headers={"Content-Type": "image/jpeg"}
        )[0],
        "no content-type": botocore_presign(signed, method="PUT")[0],
        "expiry": botocore_presign(signed, method="PUT", headers=put_headers, expires=901)[0],
        "secret": botocore_presign(signed, method="PUT", headers=put_headers, secret="wrong")[0],
    }
    for what, other in tampered.items():
        assert other != params["X-Amz-Signature"], what

    # A plain HTTP client can upload through it, and S3 stores the declared type.
    async with httpx.AsyncClient() as client:
        response = await client.put(signed, content=b"\x89PNG fake", headers=put_headers)
    assert response.status_code == 200, response.text
    info = s3_client_fs(s3_endpoint).info(f"{bucket}/guides/a b+c.png")
    assert info["ContentType"] == PNG
    assert info["size"] == len(b"\x89PNG fake")


async def test_presigned_get_signature_is_botocore_sigv4(
    s3_bucket: str, s3_endpoint: str, s3_fs: s3fs.S3FileSystem | None
) -> None:
    url = f"{s3_bucket}/in/photo.png"
    s3_client_fs(s3_endpoint).pipe_file(url, b"photo bytes")
    signed = await presign_get(url, expires=60, fs=s3_fs)
    params = query(signed)

    assert params["X-Amz-Expires"] == "60"
    assert params["X-Amz-SignedHeaders"] == "host"
    signature, resigned = botocore_presign(signed, method="GET")
    assert signature == params["X-Amz-Signature"]
    assert resigned == signed
    assert botocore_presign(signed, method="PUT")[0] != signature
    assert botocore_presign(signed, method="GET", expires=61)[0] != signature
    bucket = s3_bucket.removeprefix("s3://")
    assert botocore_presign(signed, method="GET", path=f"/{bucket}/in/x.png")[0] != signature

    async with httpx.AsyncClient() as client:
        response = await client.get(signed)
    assert response.status_code == 200
    assert response.content == b"photo bytes"


# --------------------------------------------------------------------------- read / write


async def test_round_trip_memory(memory_url: str) -> None:
    data = os.urandom(1000)
    url = f"{memory_url}/deep/dir/out.png"
    await write_bytes(url, data, content_type=PNG)
    assert await read_bytes(url, max_bytes=1000) == data
    # Overwrite replaces the whole object.
    await write_bytes(url, b"short")
    assert await read_bytes(url, max_bytes=1000) == b"short"


@pytest.mark.parametrize("as_file_url", [False, True])
async def test_round_trip_local(tmp_path: Path, as_file_url: bool) -> None:
    target = tmp_path / "new" / "dirs" / "out.png"
    url = target.as_uri() if as_file_url else str(target)
    data = os.urandom(4096)
    await write_bytes(url, bytearray(data), content_type=PNG)
    assert target.read_bytes() == data
    assert await read_bytes(url, max_bytes=4096) == data


async def test_round_trip_s3_stores_content_type(
    s3_bucket: str, s3_endpoint: str, s3_fs: s3fs.S3FileSystem | None
) -> None:
    url = f"{s3_bucket}/guides/canny/1.png"
    data = os.urandom(2048)
    await write_bytes(url, memoryview(data), content_type=PNG, fs=s3_fs)
    assert await read_bytes(url, max_bytes=len(data), fs=s3_fs) == data
    info = s3_client_fs(s3_endpoint).info(url)
    assert info["ContentType"] == PNG
    assert info["size"] == len(data)


async def test_read_bytes_caps_size_everywhere(
    tmp_path: Path, memory_url: str, s3_bucket: str, s3_env: str
) -> None:
    data = b"x" * 100
    for url in (str(tmp_path / "f.bin"), f"{memory_url}/f.bin", f"{s3_bucket}/f.bin"):
        await write_bytes(url, data)
        assert await read_bytes(url, max_bytes=100) == data  # exactly at the limit
        with pytest.raises(ImageTooLarge) as info:
            await read_bytes(url, max_bytes=99)
        assert info.value.parameter == "inputImage"
        assert "99" in info.value.message


async def test_read_bytes_of_empty_objects(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    """S3 answers a ranged GET of an empty object with 416; that still reads as b''."""
    for url in (str(tmp_path / "empty"), f"{s3_bucket}/empty"):
        await write_bytes(url, b"")
        assert await read_bytes(url, max_bytes=10) == b""


async def test_missing_objects_raise_object_not_found(
    tmp_path: Path, memory_url: str, s3_bucket: str, s3_env: str
) -> None:
    for url in (str(tmp_path / "nope.png"), f"{memory_url}/nope.png", f"{s3_bucket}/nope.png"):
        with pytest.raises(StorageError) as info:
            await read_bytes(url, max_bytes=10, parameter="image")
        assert info.value.code == "objectNotFound"
        assert info.value.retryable is False
        assert info.value.parameter == "image"
        assert "nope.png" in info.value.message


async def test_write_to_missing_bucket_is_a_storage_error(s3_env: str) -> None:
    with pytest.raises(StorageError) as info:
        await write_bytes(f"s3://missing-{uuid.uuid4().hex[:12]}/k.png", b"x", parameter="out")
    assert info.value.parameter == "out"


class UnreachableFS(MemoryFileSystem):
    """Fails like s3fs does after its retries when the endpoint cannot be reached."""

    protocol = "unreachable"

    def cat_file(self, *args: object, **kwargs: object) -> bytes:
        raise EndpointConnectionError(endpoint_url="http://10.0.0.1:9000/bkt/k.png")

    def pipe_file(self, *args: object, **kwargs: object) -> None:
        raise EndpointConnectionError(endpoint_url="http://10.0.0.1:9000/bkt/k.png")


async def test_unreachable_store_is_a_retryable_storage_error() -> None:
    fs = UnreachableFS(skip_instance_cache=True)
    with pytest.raises(StorageError) as info:
        await read_bytes("unreachable://bkt/k.png", max_bytes=10, fs=fs)
    assert (info.value.code, info.value.retryable) == ("storageError", True)
    assert "Could not connect" in info.value.message
    with pytest.raises(StorageError) as info:
        await write_bytes("unreachable://bkt/k.png", b"x", fs=fs)
    assert (info.value.code, info.value.retryable) == ("storageError", True)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "https://example.com/a.png"])
async def test_http_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="netguard"):
        await read_bytes(url, max_bytes=10)
    with pytest.raises(ValueError, match="netguard"):
        await write_bytes(url, b"x")


def test_error_messages_carry_no_secrets() -> None:
    err = storage._storage_error(
        FileNotFoundError("gone"), "s3://user:pw@bkt/k.png?X-Amz-Signature=abc", "read", None
    )
    assert "abc" not in err.message and "pw" not in err.message
    assert "s3://bkt/k.png" in err.message


# --------------------------------------------------------------------------- local atomicity


async def test_local_write_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    await write_bytes(str(target), b"v1")
    await write_bytes(str(target), b"version two")
    assert names_in(tmp_path) == ["out.png"]
    assert target.read_bytes() == b"version two"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
async def test_failed_local_write_leaves_old_target_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    existing = tmp_path / "old.png"
    existing.write_bytes(b"old content")
    fresh = tmp_path / "fresh.png"

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, fail_in, boom)
    for target in (existing, fresh):
        with pytest.raises(StorageError) as info:
            await write_bytes(str(target), b"new content that must not appear")
        assert info.value.code == "storageError"
        assert info.value.retryable is True
    monkeypatch.undo()

    assert existing.read_bytes() == b"old content"
    assert not fresh.exists()
    assert names_in(tmp_path) == ["old.png"]


async def test_aclose_is_a_noop_for_sync_filesystems(tmp_path: Path) -> None:
    fs, _ = url_to_fs(str(tmp_path))
    await aclose(fs)
    await write_bytes(str(tmp_path / "a"), b"a", fs=fs)
    assert (tmp_path / "a").read_bytes() == b"a"
