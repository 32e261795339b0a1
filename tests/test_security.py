"""Issue 6 R4: authentication, SSRF, request limits and secrets, against the real server.

* **Auth.** Every task type is refused with 401 ``invalidApiKey`` without a key and with
  a wrong one, and nothing it names is touched (the web server it points at sees no
  request); the right key makes the same request work.
* **SSRF.** Input URLs (preprocess and imageUpload), ``uploadEndpoint`` and
  ``webhookURL`` are refused when they point at a private address directly, through a
  DNS name that resolves to one, or through a redirect to one. There is no real DNS in
  this sandbox, so the server's :class:`~guideflow.netguard.NetPolicy` gets an injected
  resolver (``*.test`` names → fixed addresses; anything else fails to resolve). Two
  loopback web servers play the parts: one on 127.0.0.2, the only address the policy
  allows ("the internet"), and the *receiver* on 127.0.0.1 ("the private network"),
  which must never see a request. Positive controls show the allowed paths work.
* **Limits.** The request body limit (413 ``payloadTooLarge``, with and without
  Content-Length) and the pixel and byte limits (``imageTooLarge``).
* **Secrets.** A server + client session that uses an API key, a presigned S3 PUT URL
  (moto, tests/s3.py) and a webhook token runs with every logger at DEBUG; no log line,
  stdout/stderr output, error message or response may contain the key, the string
  ``X-Amz-Signature``, the signature's value or the token.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import httpx
import numpy as np
import pytest

from connectors.runware import RunwareAuthError, RunwareClient, RunwareError
from connectors.storage import presign_put, url_to_fs
from engine.imageio import ImageLimits
from guideflow.netguard import NetPolicy
from guideflow.protocol import PreprocessTask
from tests import corpus
from tests.corpus import CorpusWeb, assert_no_secrets, capture_everything
from tests.live_server import run_server, test_config
from tests.s3 import s3_options

KEY = "gf-sec-key-51b7e0c3d9a2"
CANNY = "runware:controlnet-preprocess@canny"
GOOD = corpus.good_png(0)
GOOD_URI = corpus.data_uri(GOOD, "good.png")


def uid() -> str:
    return str(uuid.uuid4())


def post(base: str, tasks: Any, *, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1", json=tasks, headers=headers, timeout=60)


def preprocess(image: str, **fields: Any) -> dict[str, Any]:
    task = {
        "taskType": "controlNetPreprocess",
        "taskUUID": uid(),
        "model": CANNY,
        "inputs": {"image": image},
        "outputType": "base64Data",
    }
    return task | fields


# -- auth -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web() -> Iterator[CorpusWeb]:
    with CorpusWeb() as w:
        w.files["/good.png"] = (GOOD, "image/png")
        yield w


@pytest.fixture(scope="module")
def auth_base() -> Iterator[str]:
    config = test_config(no_auth=False, api_keys=("another-key-000", KEY))
    with run_server(config) as base:
        yield base


def task_of_type(kind: str, web: CorpusWeb) -> dict[str, Any]:
    image = f"{web.url}/good.png?kind={kind}"
    if kind == "preprocess_new":
        return preprocess(image)
    if kind == "preprocess_legacy":
        return {
            "taskType": "imageControlNetPreProcess",
            "taskUUID": uid(),
            "preProcessorType": "canny",
            "inputImage": image,
        }
    if kind == "image_upload":
        return {"taskType": "imageUpload", "taskUUID": uid(), "image": image}
    if kind == "get_response":
        return {"taskType": "getResponse", "taskUUID": uid()}
    if kind == "ping":
        return {"taskType": "ping", "ping": True, "taskUUID": uid()}
    raise AssertionError(kind)


TASK_KINDS = ["preprocess_new", "preprocess_legacy", "image_upload", "get_response", "ping"]


@pytest.mark.parametrize("kind", [*TASK_KINDS, "authentication"])
@pytest.mark.parametrize("credentials", ["none", "wrong", "truncated", "case_changed"])
def test_every_task_type_needs_a_valid_key(
    kind: str, credentials: str, auth_base: str, web: CorpusWeb
) -> None:
    bearer = {
        "none": None,
        "wrong": "wrong-key",
        "truncated": KEY[:-1],
        "case_changed": KEY.upper(),
    }[credentials]
    if kind == "authentication":
        tasks = [
            {"taskType": "authentication", "apiKey": bearer or "not-the-key"},
            task_of_type("ping", web),
        ]
        bearer = None
    else:
        tasks = [task_of_type(kind, web)]
    before = len(web.hits)
    response = post(auth_base, tasks, key=bearer)
    assert response.status_code == 401
    body = response.json()
    assert "data" not in body
    assert len(body["errors"]) == len(tasks)
    for task, err in zip(tasks, body["errors"], strict=True):
        assert err["code"] == "invalidApiKey" and err["parameter"] == "apiKey"
        assert err["taskType"] == task["taskType"]
        assert err.get("taskUUID") == task.get("taskUUID")
    assert len(web.hits) == before  # nothing was fetched on behalf of the refused request


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_the_right_key_works_for_every_task_type(kind: str, auth_base: str, web: CorpusWeb) -> None:
    """Control for the test above: the same requests with the key are not refused."""
    before = len(web.hits)
    for header in (True, False):
        task = task_of_type(kind, web)
        tasks = [task] if header else [{"taskType": "authentication", "apiKey": KEY}, task]
        response = post(auth_base, tasks, key=KEY if header else None)
        body = response.json()
        if kind == "get_response":  # an unknown taskUUID: authenticated, then not found
            assert response.status_code == (404 if header else 200)  # 200: auth item in data
            assert [e["code"] for e in body["errors"]] == ["taskNotFound"]
        else:
            assert response.status_code == 200, body
            assert "errors" not in body
    fetches = 2 if kind.startswith(("preprocess", "image_upload")) else 0
    assert len(web.hits) - before == fetches


# -- SSRF -----------------------------------------------------------------------------------

PUBLIC_HOST = "127.0.0.2"  # the only address the policy allows: "the internet"
DNS = {
    "public.test": [PUBLIC_HOST],
    "loopback.test": ["127.0.0.1"],
    "internal.test": ["10.0.0.7"],
    "metadata.test": ["169.254.169.254"],
}
RESOLVED: list[str] = []


def fake_resolver(host: str, port: int) -> list[str]:
    """The sandbox has no DNS: ``*.test`` names resolve from a table, numeric spellings
    (``2130706433``, ``0x7f.1``) the way ``getaddrinfo`` does without DNS, others fail."""
    RESOLVED.append(host)
    if host.lower() in DNS:
        return list(DNS[host.lower()])
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [str(info[4][0]) for info in infos]


@pytest.fixture(scope="module")
def nets() -> Iterator[tuple[str, CorpusWeb, CorpusWeb]]:
    """(server base URL, public web on 127.0.0.2, private receiver on 127.0.0.1)."""
    with CorpusWeb(host=PUBLIC_HOST) as public, CorpusWeb() as receiver:
        port = urlsplit(receiver.url).port
        public.files["/good.png"] = (GOOD, "image/png")
        public.redirects.update(
            {
                "/to-receiver": f"{receiver.url}/good.png",
                "/to-loopback-name": f"http://loopback.test:{port}/good.png",
                "/to-internal": "http://internal.test/good.png",
                "/to-metadata": "http://169.254.169.254/latest/meta-data/",
                "/to-localhost": f"http://localhost:{port}/good.png",
            }
        )
        receiver.files["/good.png"] = (GOOD, "image/png")
        config = test_config(
            net_policy=NetPolicy(allow=(f"{PUBLIC_HOST}/32",), resolver=fake_resolver),
            fetch_timeout=5.0,
            webhook_attempts=2,
        )
        with run_server(config) as base:
            yield base, public, receiver
        assert receiver.hits == []  # the private network never saw a single request


PRIVATE_KINDS = (
    "loopback_ip",
    "localhost_name",
    "dns_to_loopback",
    "dns_to_private",
    "dns_to_metadata",
    "metadata_ip",
    "ipv4_mapped_ipv6",
    "decimal_ip",
    "redirect_to_loopback",
    "redirect_to_loopback_name",
    "redirect_to_private_name",
    "redirect_to_metadata",
    "redirect_to_localhost",
)


def private_urls(public: CorpusWeb, receiver: CorpusWeb) -> dict[str, str]:
    """Every way of pointing at a refused address: direct, by DNS name, by redirect."""
    port = urlsplit(receiver.url).port
    pport = urlsplit(public.url).port
    urls = {
        "loopback_ip": f"{receiver.url}/good.png",
        "localhost_name": f"http://localhost:{port}/good.png",
        "dns_to_loopback": f"http://loopback.test:{port}/good.png",
        "dns_to_private": "http://internal.test/good.png",
        "dns_to_metadata": "http://metadata.test/latest/meta-data/",
        "metadata_ip": "http://169.254.169.254/latest/meta-data/",
        "ipv4_mapped_ipv6": f"http://[::ffff:127.0.0.1]:{port}/good.png",
        "decimal_ip": f"http://2130706433:{port}/good.png",
        "redirect_to_loopback": f"http://public.test:{pport}/to-receiver",
        "redirect_to_loopback_name": f"http://public.test:{pport}/to-loopback-name",
        "redirect_to_private_name": f"http://public.test:{pport}/to-internal",
        "redirect_to_metadata": f"http://public.test:{pport}/to-metadata",
        "redirect_to_localhost": f"http://public.test:{pport}/to-localhost",
    }
    assert tuple(urls) == PRIVATE_KINDS
    return urls


def test_allowed_public_urls_work(nets: tuple[str, CorpusWeb, CorpusWeb]) -> None:
    """Positive control: through the resolver, the allowed address works on all channels."""
    base, public, _ = nets
    pport = urlsplit(public.url).port
    url = f"http://public.test:{pport}"
    task = preprocess(f"{url}/good.png", uploadEndpoint=f"{url}/put", webhookURL=f"{url}/hook")
    upload = {"taskType": "imageUpload", "taskUUID": uid(), "image": f"{url}/good.png"}
    response = post(base, [task, upload])
    assert response.status_code == 200 and "errors" not in response.json(), response.text
    wait_for_webhook(base, task["taskUUID"], "delivered")
    writes = sorted(f"{h.method} {h.path}" for h in public.hits if h.method in ("PUT", "POST"))
    assert writes == ["POST /hook", "PUT /put"]
    assert "public.test" in RESOLVED


def wait_for_webhook(base: str, task_uuid: str, status: str) -> dict[str, Any]:
    for _ in range(400):
        item = post(base, [{"taskType": "getResponse", "taskUUID": task_uuid}]).json()["data"][0]
        if item.get("webhook", {}).get("status") not in (None, "pending"):
            assert item["webhook"]["status"] == status, item
            return item["webhook"]
        time.sleep(0.02)
    raise AssertionError("the webhook never finished")


@pytest.mark.parametrize("kind", PRIVATE_KINDS)
def test_input_urls_to_private_addresses_are_refused(
    kind: str, nets: tuple[str, CorpusWeb, CorpusWeb]
) -> None:
    base, public, receiver = nets
    url = private_urls(public, receiver)[kind]
    tasks = [
        preprocess(GOOD_URI),
        preprocess(url),
        {"taskType": "imageUpload", "taskUUID": uid(), "image": url},
    ]
    response = post(base, tasks)
    assert response.status_code == 200, response.text
    errors = response.json()["errors"]
    assert [(e["code"], e["parameter"]) for e in errors] == [
        ("forbiddenURL", "inputs.image"),
        ("forbiddenURL", "image"),
    ], errors
    assert receiver.hits == []


@pytest.mark.parametrize("kind", PRIVATE_KINDS)
def test_upload_endpoints_to_private_addresses_are_refused(
    kind: str, nets: tuple[str, CorpusWeb, CorpusWeb]
) -> None:
    base, public, receiver = nets
    url = private_urls(public, receiver)[kind]
    tasks = [preprocess(GOOD_URI), preprocess(GOOD_URI, uploadEndpoint=url)]
    response = post(base, tasks)
    assert response.status_code == 200, response.text
    (err,) = response.json()["errors"]
    # a PUT is never redirected: the redirect answer itself fails the upload
    expected = "uploadFailed" if kind.startswith("redirect") else "forbiddenURL"
    assert (err["code"], err["parameter"]) == (expected, "uploadEndpoint")
    assert receiver.hits == []


@pytest.mark.parametrize("kind", PRIVATE_KINDS)
def test_webhooks_to_private_addresses_are_refused(
    kind: str, nets: tuple[str, CorpusWeb, CorpusWeb]
) -> None:
    base, public, receiver = nets
    url = private_urls(public, receiver)[kind]
    task = preprocess(GOOD_URI, webhookURL=url)
    response = post(base, [task])
    assert response.status_code == 200 and "errors" not in response.json()  # the task itself
    webhook = wait_for_webhook(base, task["taskUUID"], "failed")
    expected = "webhookFailed" if kind.startswith("redirect") else "forbiddenURL"
    assert webhook["error"] == expected, webhook
    assert "?" not in webhook["url"]
    assert receiver.hits == []


# -- limits ---------------------------------------------------------------------------------

BODY_LIMIT = 32 * 1024


@pytest.fixture(scope="module")
def limited_base() -> Iterator[str]:
    config = test_config(
        max_body_bytes=BODY_LIMIT,
        image_limits=ImageLimits(max_pixels=2000, max_bytes=1500),
        net_policy=NetPolicy(allow=("127.0.0.1/32",)),
    )
    with run_server(config) as base:
        yield base


def test_request_body_limit_is_413(limited_base: str) -> None:
    ping = [{"taskType": "ping", "ping": True}]
    big = b'[{"taskType": "ping", "ping": true, "pad": "' + b"x" * BODY_LIMIT + b'"}]'
    streamed = httpx.post(  # chunked: no Content-Length to refuse early on
        f"{limited_base}/v1",
        content=iter([big[:1000], big[1000:]]),
        headers={"Content-Type": "application/json"},
    )
    declared = httpx.post(
        f"{limited_base}/v1", content=big, headers={"Content-Type": "application/json"}
    )
    for response in (declared, streamed):
        assert response.status_code == 413
        assert [e["code"] for e in response.json()["errors"]] == ["payloadTooLarge"]
    assert post(limited_base, ping).status_code == 200  # below the limit: fine


def test_pixel_and_byte_limits_are_image_too_large(limited_base: str, web: CorpusWeb) -> None:
    small = corpus.one_pixel_png()
    too_many_pixels = corpus.bomb_png(50, 41)  # 2050 px in a tiny file
    noise = np.random.default_rng(3).integers(0, 255, (30, 30, 3), dtype=np.uint8)
    too_many_bytes = cv2.imencode(".png", noise)[1].tobytes()  # 900 px, but > 1500 bytes
    assert len(small) < 1500 < len(too_many_bytes)
    web.files["/noise.png"] = (too_many_bytes, "image/png")
    tasks = [
        preprocess(corpus.data_uri(small, "s.png")),
        preprocess(corpus.data_uri(too_many_pixels, "p.png")),
        preprocess(corpus.data_uri(too_many_bytes, "b.png")),
        preprocess(f"{web.url}/noise.png"),  # capped while streaming the download
        {"taskType": "imageUpload", "taskUUID": uid(), "image": corpus.b64(too_many_pixels)},
    ]
    response = post(limited_base, tasks)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["taskUUID"] for d in body["data"]] == [tasks[0]["taskUUID"]]
    assert [(e["code"], e["parameter"]) for e in body["errors"]] == [
        ("imageTooLarge", "inputs.image"),
        ("imageTooLarge", "inputs.image"),
        ("imageTooLarge", "inputs.image"),
        ("imageTooLarge", "image"),
    ]


# -- secrets --------------------------------------------------------------------------------

WEBHOOK_TOKEN = "whk-token-9e1f3a"
#: The in-process stand-in for S3 (moto on werkzeug) logs the URLs it receives, exactly as
#: AWS would on its own side; those records are not ours and are left out.
THIRD_PARTY_LOGGERS = ("werkzeug", "moto")


async def _session(base: str, web: CorpusWeb, put_url: str, refused_put: str) -> list[str]:
    """A client session: upload, preprocess with a presigned PUT and a webhook, async,
    a refused upload, a wrong key. Returns the texts it saw (results, errors)."""
    seen: list[str] = []
    hook = f"{web.url}/hook?token={WEBHOOK_TOKEN}"
    async with RunwareClient(KEY, f"{base}/v1", poll_initial=0.02, max_retries=1) as client:
        assert await client.ping()
        uploaded = await client.upload_image(GOOD)
        seen.append(repr(uploaded))
        sync_task = PreprocessTask.build(
            "canny", uploaded.imageUUID, uploadEndpoint=put_url, webhookURL=hook
        )
        async_task = PreprocessTask.build(
            "canny", GOOD_URI, deliveryMethod="async", webhookURL=hook, outputType="base64Data"
        )
        refused = PreprocessTask.build("canny", GOOD_URI, uploadEndpoint=refused_put)
        results = await client.preprocess_many([sync_task, async_task, refused])
        seen += [repr(r) for r in results] + [str(r) for r in results]
        assert not isinstance(results[0], RunwareError), results[0]
        assert not isinstance(results[1], RunwareError), results[1]
        assert isinstance(results[2], RunwareError) and results[2].code == "forbiddenURL"
        seen.append(repr(client))
    async with RunwareClient("wrong-" + KEY, f"{base}/v1", max_retries=0) as intruder:
        with pytest.raises(RunwareAuthError) as info:
            await intruder.preprocess(PreprocessTask.build("canny", GOOD_URI))
        seen += [str(info.value), repr(info.value), repr(intruder)]
    return seen


def test_no_secret_reaches_logs_or_output(
    s3_endpoint: str, s3_bucket: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with CorpusWeb() as web:
        config = test_config(
            no_auth=False,
            api_keys=(KEY,),
            net_policy=NetPolicy(allow=("127.0.0.1/32",)),
        )
        with capture_everything(exclude=THIRD_PARTY_LOGGERS) as lines, run_server(config) as base:
            fs, _ = url_to_fs(s3_bucket, **s3_options(s3_endpoint))
            key = f"{s3_bucket}/guides/room.jpg"
            put_url = asyncio.run(presign_put(key, content_type="image/jpeg", fs=fs))
            signature = parse_qs(urlsplit(put_url).query)["X-Amz-Signature"][0]
            refused_put = f"http://10.9.8.7/x.jpg?X-Amz-Signature={signature}"
            seen = asyncio.run(_session(base, web, put_url, refused_put))
            for _ in range(200):  # the two webhooks are delivered in the background
                if len([h for h in web.hits if h.method == "POST"]) >= 2:
                    break
                time.sleep(0.02)
            stored = fs.cat(key.removeprefix("s3://"))
        captured = capfd.readouterr()
    assert stored[:3] == b"\xff\xd8\xff"  # the presigned PUT really uploaded the guide
    assert [h.path for h in web.hits if h.method == "POST"] == [f"/hook?token={WEBHOOK_TOKEN}"] * 2
    log_text = "\n".join(lines)
    # the session was logged in detail: requests, uploads, refusals, auth failures
    for expected in ("HTTP Request: PUT", "uploaded guide image to", "refused", "API key"):
        assert expected in log_text, expected
    checked = assert_no_secrets(
        [*lines, captured.out, captured.err, *seen],
        [KEY, "X-Amz-Signature", signature, WEBHOOK_TOKEN],
    )
    assert checked > 50


def test_assert_no_secrets_catches_leaks() -> None:
    """The helper fails on a leak (also URL-encoded) and names the line, not the secret."""
    assert_no_secrets(["nothing here", "multi\nline"], ["s3cr3t-value"])
    for leaky in ("key=s3cr3t-value", "a\nAuthorization: Bearer s3cr3t-value\nb", "s3cr3t%2Fv"):
        with pytest.raises(AssertionError) as info:
            assert_no_secrets([leaky], ["s3cr3t-value", "s3cr3t/v"])
        assert "s3cr3t-value" not in str(info.value) and "<SECRET>" in str(info.value)
    with pytest.raises(ValueError):
        assert_no_secrets(["x"], [""])
