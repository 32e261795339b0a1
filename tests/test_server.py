"""``guideflow serve`` end to end: the real app under uvicorn on loopback, real httpx requests.

Every test talks HTTP to a server started by :mod:`tests.live_server`; webhooks,
upload endpoints and input URLs are real HTTP servers on 127.0.0.1 (a
:class:`~tests.live_server.Receiver`, or moto's S3 for presigned PUTs).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.api import Engine, GuideImage, PreparedRequest
from engine.imageio import ImageLimits
from engine.server import ServerConfig, create_app
from engine.server.logs import WATCHED_LOGGERS, RedactingFilter
from engine.server.storage import ImageStore
from guideflow.netguard import NetPolicy
from guideflow.protocol import PreprocessTask, parse_task
from tests import live_server
from tests.conftest import IMAGES_DIR
from tests.live_server import Receiver, run_server, test_config

# the shared fixtures (a module attribute, so they register without import-shadowing noise)
server_factory = live_server.server_factory
receiver = live_server.receiver

ROOM = (IMAGES_DIR / "room.png").read_bytes()
ROOM_B64 = base64.b64encode(ROOM).decode()
ROOM_URI = "data:image/png;base64," + ROOM_B64
ROOM_W, ROOM_H = Image.open(io.BytesIO(ROOM)).size
CANNY = "runware:controlnet-preprocess@canny"


def uid() -> str:
    return str(uuid.uuid4())


def post(base: str, tasks: Any, *, key: str | None = None, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1", json=tasks, headers=headers, timeout=timeout)


def canny_task(image: str = ROOM_B64, **fields: Any) -> dict[str, Any]:
    """A new-form canny task with a fresh taskUUID."""
    task: dict[str, Any] = {
        "taskType": "controlNetPreprocess",
        "taskUUID": uid(),
        "model": CANNY,
        "inputs": {"image": image},
    }
    task.update(fields)
    return task


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def poll(base: str, task_uuid: str, *, key: str | None = None) -> dict[str, Any]:
    """getResponse until the task leaves ``processing`` (bounded by attempts, not by time)."""
    for _ in range(600):
        body = post(base, [{"taskType": "getResponse", "taskUUID": task_uuid}], key=key).json()
        if body["data"][0]["status"] != "processing":
            return body
        time.sleep(0.05)
    raise AssertionError(f"task {task_uuid} never finished")


def our_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """The captured messages of the loggers the server's redaction covers."""
    return "\n".join(
        r.getMessage()
        for r in caplog.records
        if any(r.name == n or r.name.startswith(n + ".") for n in WATCHED_LOGGERS)
    )


class FakeClock:
    """An injectable clock the test advances instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class GatedEngine(Engine):
    """The real engine, but every run waits for ``gate`` (to hold tasks in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.calls = 0

    def run(self, req: PreparedRequest, image: Any, *, task_uuid: str | None = None) -> GuideImage:
        self.calls += 1
        assert self.gate.wait(30), "test never opened the gate"
        return super().run(req, image, task_uuid=task_uuid)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Any]]:
    """One shared no-auth server (loopback URLs allowed) and its app, for most tests."""
    app = create_app(test_config(queue_size=32))
    with run_server(app=app) as base:
        yield base, app


@pytest.fixture()
def base(server: tuple[str, Any]) -> str:
    return server[0]


# -- basics --------------------------------------------------------------------------------


def test_healthz_and_ping(base: str) -> None:
    assert httpx.get(f"{base}/healthz").status_code == 200
    r = post(base, [{"taskType": "ping", "ping": True}])
    assert r.status_code == 200
    assert r.json() == {"data": [{"taskType": "ping", "pong": True}]}
    tid = uid()
    assert post(base, [{"taskType": "ping", "ping": True, "taskUUID": tid}]).json()["data"] == [
        {"taskType": "ping", "pong": True, "taskUUID": tid}
    ]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "invalidJSON"),
        (b'{"taskType": "ping"}', "invalidRequestBody"),
        (b"[]", "invalidRequestBody"),
        (b"[NaN]", "invalidJSON"),
    ],
)
def test_malformed_bodies_are_400_error_objects(base: str, content: bytes, code: str) -> None:
    r = httpx.post(f"{base}/v1", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert "data" not in r.json()
    assert [e["code"] for e in r.json()["errors"]] == [code]


def test_unknown_task_type_is_a_per_task_error(base: str) -> None:
    tid = uid()
    r = post(base, [{"taskType": "imageInference", "taskUUID": tid, "positivePrompt": "a cat"}])
    assert r.status_code == 400
    (err,) = r.json()["errors"]
    assert (err["code"], err["parameter"], err["taskUUID"]) == ("invalidTaskType", "taskType", tid)


def test_body_limit_413(server_factory: Callable[..., str]) -> None:
    base = server_factory(test_config(max_body_bytes=2000))
    big = [canny_task(image="A" * 3000)]
    r = post(base, big)
    assert r.status_code == 413
    assert r.json()["errors"][0]["code"] == "payloadTooLarge"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'[{"taskType":"ping","ping":true,"pad":"'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]'

    r = httpx.post(f"{base}/v1", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # a body under the limit still works on the same server
    assert post(base, [{"taskType": "ping", "ping": True}]).status_code == 200


def test_openapi_declares_the_protocol_models(base: str) -> None:
    doc = httpx.get(f"{base}/openapi.json").json()
    op = doc["paths"]["/v1"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["type"] == "array"
    assert schema["items"] == {"$ref": "#/components/schemas/Task"}
    schemas = doc["components"]["schemas"]
    task_refs = {v["$ref"].rsplit("/", 1)[1] for v in schemas["Task"]["oneOf"]}
    assert task_refs == {
        "PreprocessTask",
        "ImageUploadTask",
        "GetResponseTask",
        "PingTask",
        "AuthenticationTask",
    }
    assert "inputs" in schemas["PreprocessTask"]["properties"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ApiResponse"
    }
    items = schemas["ApiResponse"]["properties"]["data"]["items"]["anyOf"]
    assert {"$ref": "#/components/schemas/PreprocessResult"} in items
    assert "guideImageURL" in schemas["PreprocessResult"]["properties"]
    assert "Retry-After" in op["responses"]["429"]["headers"]


# -- preprocess: outputs -------------------------------------------------------------------


def test_every_output_type_and_format(base: str) -> None:
    tasks = [
        canny_task(outputType=otype, outputFormat=fmt, includeCost=True)
        for otype in ("URL", "base64Data", "dataURI")
        for fmt in ("JPG", "PNG", "WEBP")
    ]
    r = post(base, tasks)
    assert r.status_code == 200, r.text
    items = r.json()["data"]
    assert "errors" not in r.json()
    assert [i["taskUUID"] for i in items] == [t["taskUUID"] for t in tasks]
    pil_format = {"JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}
    mime = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
    for task, item in zip(tasks, items, strict=True):
        otype, fmt = task["outputType"], task["outputFormat"]
        fields = {"guideImageURL", "guideImageBase64Data", "guideImageDataURI"} & item.keys()
        expected_field = {
            "URL": "guideImageURL",
            "base64Data": "guideImageBase64Data",
            "dataURI": "guideImageDataURI",
        }
        assert fields == {expected_field[otype]}
        assert item["taskType"] == "controlNetPreprocess"
        assert item["cost"] == pytest.approx(0.0006)
        uuid.UUID(item["guideImageUUID"])
        uuid.UUID(item["inputImageUUID"])
        if otype == "URL":
            ext = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
            assert item["guideImageURL"] == f"{base}/image/{item['guideImageUUID']}.{ext}"
            got = httpx.get(item["guideImageURL"])
            assert got.status_code == 200
            assert got.headers["content-type"] == mime[fmt]
            data = got.content
        elif otype == "base64Data":
            data = base64.b64decode(item["guideImageBase64Data"])
        else:
            prefix = f"data:{mime[fmt]};base64,"
            assert item["guideImageDataURI"].startswith(prefix)
            data = base64.b64decode(item["guideImageDataURI"].removeprefix(prefix))
        im = decode(data)
        assert im.format == pil_format[fmt]
        assert im.size == (ROOM_W, ROOM_H)
        edges = np.asarray(im.convert("L"))
        assert 0.01 < (edges > 128).mean() < 0.5  # an edge map, not a blank or the photo


def test_quality_and_size_fields(base: str) -> None:
    low, high, small = (
        canny_task(outputType="base64Data", outputQuality=20),
        canny_task(outputType="base64Data", outputQuality=99),
        canny_task(outputType="base64Data", width=256),
    )
    items = post(base, [low, high, small]).json()["data"]
    sizes = [len(base64.b64decode(i["guideImageBase64Data"])) for i in items]
    assert sizes[0] < sizes[1]  # quality reached the JPEG encoder
    im = decode(base64.b64decode(items[2]["guideImageBase64Data"]))
    assert im.size == (256, round(ROOM_H * 256 / ROOM_W))
    assert "cost" not in items[0]  # includeCost defaults to false


def test_both_request_forms_give_identical_bytes(base: str) -> None:
    legacy = PreprocessTask.build(
        "shuffle", ROOM_URI, form="legacy", settings={"seed": 7}, outputType="base64Data"
    ).wire()
    new = PreprocessTask.build(
        "shuffle", ROOM_B64, form="new", settings={"seed": 7}, outputType="base64Data"
    ).wire()
    canny_legacy = PreprocessTask.build(
        "canny",
        ROOM_B64,
        form="legacy",
        settings={"lowThresholdCanny": 50},
        outputType="base64Data",
        outputFormat="PNG",
    ).wire()
    canny_new = PreprocessTask.build(
        "canny",
        ROOM_B64,
        form="new",
        settings={"lowThresholdCanny": 50},
        outputType="base64Data",
        outputFormat="PNG",
    ).wire()
    assert legacy["taskType"] == "imageControlNetPreProcess" and "inputs" in new
    assert canny_legacy["lowThresholdCanny"] == 50 and canny_new["settings"] == {
        "lowThresholdCanny": 50
    }
    items = post(base, [legacy, new, canny_legacy, canny_new]).json()["data"]
    assert [i["taskType"] for i in items] == [
        "imageControlNetPreProcess",
        "controlNetPreprocess",
        "imageControlNetPreProcess",
        "controlNetPreprocess",
    ]
    data = [base64.b64decode(i["guideImageBase64Data"]) for i in items]
    assert data[0] == data[1]
    assert data[2] == data[3]
    default = post(base, [canny_task(outputType="base64Data", outputFormat="PNG")]).json()
    assert base64.b64decode(default["data"][0]["guideImageBase64Data"]) != data[2]  # low=50 used


def test_include_cost_by_price_class(base: str) -> None:
    canny = canny_task(includeCost=True, width=128)
    mlsd = canny_task(includeCost=True, width=128, model="runware:controlnet-preprocess@mlsd")
    items = post(base, [canny, mlsd]).json()["data"]
    assert [i["cost"] for i in items] == [pytest.approx(0.0006), pytest.approx(0.0013)]


# -- per-task errors -------------------------------------------------------------------------


def test_mixed_batch_errors_are_scoped_per_task(base: str) -> None:
    good = canny_task()
    bad_image = canny_task(image=base64.b64encode(bytes(range(7, 250))).decode())
    bad_proc = canny_task(model="runware:controlnet-preprocess@sketchify")
    bad_setting = canny_task(settings={"lowThresholdCanny": 300})
    legacy_bad_setting = {
        "taskType": "imageControlNetPreProcess",
        "taskUUID": uid(),
        "inputImage": ROOM_B64,
        "preProcessorType": "openpose",
        "lowThresholdCanny": 50,
    }
    missing_image = {"taskType": "controlNetPreprocess", "taskUUID": uid(), "model": CANNY}
    r = post(base, [good, bad_image, bad_proc, bad_setting, legacy_bad_setting, missing_image])
    assert r.status_code == 200
    body = r.json()
    assert [i["taskUUID"] for i in body["data"]] == [good["taskUUID"]]
    errors = {e["taskUUID"]: e for e in body["errors"]}
    expected = {
        bad_image["taskUUID"]: ("invalidImage", "inputs.image"),
        bad_proc["taskUUID"]: ("invalidPreProcessorType", "model"),
        bad_setting["taskUUID"]: ("invalidParameter", "lowThresholdCanny"),
        legacy_bad_setting["taskUUID"]: ("invalidParameter", "lowThresholdCanny"),
    }
    for tid, (code, parameter) in expected.items():
        assert (errors[tid]["code"], errors[tid]["parameter"]) == (code, parameter)
        assert errors[tid]["message"]
        assert errors[tid]["taskType"] in ("controlNetPreprocess", "imageControlNetPreProcess")
    assert errors[missing_image["taskUUID"]]["code"] in ("invalidParameter", "missingParameter")
    assert len(errors) == 5


def test_all_failed_takes_the_most_relevant_status(base: str) -> None:
    r = post(base, [canny_task(settings={"lowThresholdCanny": -1})])
    assert r.status_code == 400
    r = post(base, [canny_task(image=uid()), canny_task(settings={"highThresholdCanny": "x"})])
    assert r.status_code == 400  # 400 outranks 404
    r = post(base, [canny_task(image=uid())])
    assert r.status_code == 404
    assert r.json()["errors"][0]["code"] == "imageNotFound"
    assert r.json()["errors"][0]["parameter"] == "inputs.image"


def test_duplicate_and_reused_task_uuids(base: str) -> None:
    first = canny_task(outputType="base64Data")
    dup = dict(first)
    r = post(base, [first, dup])
    assert r.status_code == 200
    assert len(r.json()["data"]) == 1
    (err,) = r.json()["errors"]
    assert (err["code"], err["taskUUID"]) == ("conflictTaskUUID", first["taskUUID"])
    original = r.json()["data"][0]
    # an idempotent retry (same payload) returns the stored result: same guideImageUUID
    again = post(base, [first]).json()["data"][0]
    assert again == original
    # a repeat is a conflict even when the first occurrence was itself invalid
    invalid = canny_task(settings={"lowThresholdCanny": 999})
    r = post(base, [invalid, dict(invalid, settings=None)])
    assert [e["code"] for e in r.json()["errors"]] == ["invalidParameter", "conflictTaskUUID"]
    # the same taskUUID with another payload is a conflict (409 when it is the only task)
    changed = dict(first, outputFormat="PNG")
    r = post(base, [changed])
    assert r.status_code == 409
    assert r.json()["errors"][0]["code"] == "conflictTaskUUID"


# -- async + getResponse -----------------------------------------------------------------------


def test_async_delivery_and_get_response(base: str) -> None:
    task = canny_task(deliveryMethod="async", includeCost=True)
    r = post(base, [task])
    assert r.status_code == 200
    assert r.json()["data"] == [
        {"taskType": "controlNetPreprocess", "taskUUID": task["taskUUID"], "status": "processing"}
    ]
    body = poll(base, task["taskUUID"])
    (item,) = body["data"]
    assert item["status"] == "success"
    assert item["cost"] == pytest.approx(0.0006)
    assert decode(httpx.get(item["guideImageURL"]).content).size == (ROOM_W, ROOM_H)
    # cumulative state: polling again returns the same item
    assert poll(base, task["taskUUID"])["data"] == [item]


def test_async_failure_and_unknown_uuid(base: str) -> None:
    task = canny_task(image=base64.b64encode(ROOM[:300]).decode(), deliveryMethod="async")
    assert post(base, [task]).json()["data"][0]["status"] == "processing"
    body = poll(base, task["taskUUID"])
    (item,) = body["data"]
    assert item["status"] == "error"
    assert item["error"]["code"] == "invalidImage"
    (err,) = body["errors"]
    assert (err["code"], err["taskUUID"], err["parameter"]) == (
        "invalidImage",
        task["taskUUID"],
        "inputs.image",
    )
    r = post(base, [{"taskType": "getResponse", "taskUUID": uid()}])
    assert r.status_code == 404
    assert r.json()["errors"][0]["code"] == "taskNotFound"


def test_get_response_also_knows_sync_tasks(base: str) -> None:
    task = canny_task()
    item = post(base, [task]).json()["data"][0]
    polled = poll(base, task["taskUUID"])["data"][0]
    assert polled == {**item, "status": "success"}


# -- images by UUID ----------------------------------------------------------------------------


def test_image_upload_then_preprocess_by_uuid(base: str) -> None:
    up = {"taskType": "imageUpload", "taskUUID": uid(), "image": ROOM_URI}
    item = post(base, [up]).json()["data"][0]
    assert item["taskType"] == "imageUpload" and item["taskUUID"] == up["taskUUID"]
    assert item["imageURL"] == f"{base}/image/{item['imageUUID']}.png"
    assert httpx.get(item["imageURL"]).content == ROOM
    task = canny_task(image=item["imageUUID"])
    result = post(base, [task]).json()["data"][0]
    assert result["inputImageUUID"] == item["imageUUID"]
    # the generated guide image is itself a valid input, by its UUID
    again = post(base, [canny_task(image=result["guideImageUUID"], outputType="base64Data")])
    second = again.json()["data"][0]
    assert second["inputImageUUID"] == result["guideImageUUID"]
    assert decode(base64.b64decode(second["guideImageBase64Data"])).size == (ROOM_W, ROOM_H)
    # an inline input gets its own UUID and is addressable afterwards too
    inline = post(base, [canny_task()]).json()["data"][0]
    by_input = post(base, [canny_task(image=inline["inputImageUUID"])]).json()
    assert by_input["data"][0]["inputImageUUID"] == inline["inputImageUUID"]


@pytest.mark.parametrize(
    ("image", "code"),
    [
        (
            base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>").decode(),
            "unsupportedImageFormat",
        ),
        ("data:image/png;base64," + base64.b64encode(ROOM[:200]).decode(), "invalidImage"),
        ("data:text/plain;base64,aGVsbG8=", "unsupportedImageFormat"),
    ],
)
def test_image_upload_rejects_non_images(base: str, image: str, code: str) -> None:
    r = post(base, [{"taskType": "imageUpload", "taskUUID": uid(), "image": image}])
    assert r.status_code == 400
    assert (r.json()["errors"][0]["code"], r.json()["errors"][0]["parameter"]) == (code, "image")


def test_input_and_upload_by_url(base: str, receiver: Receiver) -> None:
    receiver.files["/room.png"] = (ROOM, "image/png")
    up = post(
        base,
        [
            {
                "taskType": "imageUpload",
                "taskUUID": uid(),
                "image": f"{receiver.url}/room.png?sig=abc",
            }
        ],
    ).json()
    assert httpx.get(up["data"][0]["imageURL"]).content == ROOM
    r = post(
        base,
        [
            canny_task(image=f"{receiver.url}/room.png"),
            canny_task(image=f"{receiver.url}/missing.png"),
        ],
    )
    assert len(r.json()["data"]) == 1
    assert r.json()["errors"][0]["code"] == "imageDownloadFailed"
    assert r.json()["errors"][0]["parameter"] == "inputs.image"


def test_private_urls_are_refused_without_allow_list(
    server_factory: Callable[..., str], receiver: Receiver
) -> None:
    base = server_factory(test_config(net_policy=NetPolicy()))
    receiver.files["/room.png"] = (ROOM, "image/png")
    r = post(
        base,
        [
            canny_task(image=f"{receiver.url}/room.png"),
            canny_task(uploadEndpoint=f"{receiver.url}/put"),
        ],
    )
    codes = {e["parameter"]: e["code"] for e in r.json()["errors"]}
    assert codes == {"inputs.image": "forbiddenURL", "uploadEndpoint": "forbiddenURL"}
    assert receiver.requests == []  # nothing reached the private address


# -- ttl and storage -----------------------------------------------------------------------


def test_ttl_expiry_with_an_injected_clock(server_factory: Callable[..., str]) -> None:
    clock = FakeClock()
    app = create_app(test_config(clock=clock))
    base = server_factory(app=app)
    store: ImageStore = app.state.dispatcher.store
    short, default = canny_task(ttl=60), canny_task()
    items = post(base, [short, default]).json()["data"]
    urls = [i["guideImageURL"] for i in items]
    files = [store.root / u.rsplit("/", 1)[1] for u in urls]
    assert all(f.exists() for f in files)
    assert [httpx.get(u).status_code for u in urls] == [200, 200]
    clock.now += 61
    assert httpx.get(urls[0]).status_code == 404  # expired: checked on access...
    assert not files[0].exists()  # ...and deleted
    assert httpx.get(urls[1]).status_code == 200  # the default ttl is 24 h
    # the expired guide can no longer be used as an input either
    r = post(base, [canny_task(image=items[0]["guideImageUUID"])])
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "imageNotFound"
    clock.now += 86_400
    assert store.sweep() >= 1  # the periodic sweeper's work
    assert not files[1].exists()


def test_public_url_and_image_limits(
    server_factory: Callable[..., str], receiver: Receiver
) -> None:
    limits = ImageLimits(max_pixels=100_000, max_bytes=200_000)
    base = server_factory(
        test_config(public_url="https://cdn.example.test/gf/", image_limits=limits)
    )
    small = Image.open(io.BytesIO(ROOM)).resize((200, 300))
    buf = io.BytesIO()
    small.save(buf, "PNG")
    small_b64 = base64.b64encode(buf.getvalue()).decode()
    item = post(base, [canny_task(image=small_b64)]).json()["data"][0]
    assert item["guideImageURL"] == (
        f"https://cdn.example.test/gf/image/{item['guideImageUUID']}.jpg"
    )
    # ROOM is 564x846 = 477k pixels: over max_pixels, for preprocess and upload alike
    receiver.files["/room.png"] = (ROOM, "image/png")
    big = bytes(250_000)  # over max_bytes: the URL fetch stops at the cap
    receiver.files["/big.png"] = (big, "image/png")
    r = post(
        base,
        [
            canny_task(),
            {"taskType": "imageUpload", "taskUUID": uid(), "image": ROOM_URI},
            canny_task(image=f"{receiver.url}/big.png"),
        ],
    )
    assert r.status_code == 400
    errors = [(e["code"], e["parameter"]) for e in r.json()["errors"]]
    assert errors == [
        ("imageTooLarge", "inputs.image"),
        ("imageTooLarge", "image"),
        ("imageTooLarge", "inputs.image"),
    ]


def test_ttl_below_60_is_invalid(base: str) -> None:
    r = post(base, [canny_task(ttl=59)])
    assert r.status_code == 400
    assert r.json()["errors"][0]["parameter"] == "ttl"


def test_store_caps_total_bytes_oldest_first(tmp_path: Path) -> None:
    clock = FakeClock()
    store = ImageStore(tmp_path, max_bytes=250, clock=clock)
    a = store.put(b"a" * 100, "png", ttl=60, kind="guide")
    b = store.put(b"b" * 100, "png", ttl=60, kind="guide")
    c = store.put(b"c" * 100, "png", ttl=60, kind="guide")
    assert store.lookup(a.uuid) is None and not store.path_of(a).exists()
    assert store.lookup(b.uuid) is not None and store.lookup(c.uuid) is not None
    assert store.total_bytes == 200
    files = sorted(p.name for p in store.root.iterdir())
    assert files == sorted([b.filename, c.filename])
    store.close()
    assert not store.root.exists()


def test_store_write_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred put is live at once (served from memory), on disk after the writer ran,
    and leaves no file when deleted or evicted before its write, or when the write fails."""
    store = ImageStore(tmp_path / "a", max_bytes=200, clock=FakeClock())
    first = store.put(b"1" * 10, "png", ttl=60, kind="input", defer=True)
    gate = threading.Event()
    assert store._writer is not None
    store._writer.submit(gate.wait, 30)  # hold the writer: what follows stays pending
    a = store.put(b"a" * 100, "png", ttl=60, kind="input", defer=True)
    b = store.put(b"b" * 100, "png", ttl=60, kind="guide", defer=True)  # evicts `first`
    assert store.lookup(first.uuid) is None
    found = store.read(a.uuid, touch=True)
    assert found is not None and found[1] == b"a" * 100
    assert not store.path_of(a).exists()  # not written yet, but usable
    store.delete(b.uuid)
    assert store.read(b.uuid) is None
    gate.set()
    store.flush()
    assert store.path_of(a).read_bytes() == b"a" * 100
    assert sorted(p.name for p in store.root.iterdir()) == [a.filename]  # no .part left
    assert store.total_bytes == 100
    store.close()
    assert not store.root.exists()

    failing = ImageStore(tmp_path / "b", max_bytes=200, clock=FakeClock())

    def fail(self: Path, data: bytes) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", fail)
    d = failing.put(b"d" * 10, "png", ttl=60, kind="input", defer=True)
    failing.flush()
    assert failing.lookup(d.uuid) is None  # dropped, as if evicted
    assert failing.total_bytes == 0 and list(failing.root.iterdir()) == []
    failing.close()


def test_inline_answers_are_reusable_at_once(base: str) -> None:
    """Inputs and base64Data guides are stored behind the answer, yet usable right away."""
    item = post(base, [canny_task(outputType="base64Data", outputFormat="PNG")]).json()["data"][0]
    guide = base64.b64decode(item["guideImageBase64Data"])
    assert httpx.get(f"{base}/image/{item['guideImageUUID']}.png").content == guide
    assert httpx.get(f"{base}/image/{item['inputImageUUID']}.png").content == ROOM
    r = post(
        base, [canny_task(image=item["guideImageUUID"]), canny_task(image=item["inputImageUUID"])]
    )
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a (nested) record value: dict keys and values, list items."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def test_job_records_keep_no_inline_image_yet_replays_are_identical(
    server_factory: Callable[..., str], receiver: Receiver
) -> None:
    """base64Data/dataURI results are answered in full (first answer, idempotent replay,
    getResponse, webhook), while the job records hold only the guide's UUID."""
    engine = GatedEngine()
    engine.gate.set()
    app = create_app(test_config(engine=engine))
    base = server_factory(app=app)
    tasks = [canny_task(outputType="base64Data", outputFormat="PNG") for _ in range(3)]
    tasks += [canny_task(outputType="dataURI", outputFormat="WEBP")]
    tasks += [canny_task(outputType="base64Data", webhookURL=f"{receiver.url}/hook")]
    first = post(base, tasks).json()["data"]
    assert len(first) == len(tasks)
    async_task = canny_task(outputType="dataURI", deliveryMethod="async")
    assert post(base, [async_task]).json()["data"][0]["status"] == "processing"
    async_item = poll(base, async_task["taskUUID"])["data"][0]
    assert async_item["guideImageDataURI"].startswith("data:image/jpeg;base64,")
    assert engine.calls == len(tasks) + 1

    records = app.state.dispatcher.jobs.records()
    assert len(records) == len(tasks) + 1
    for job in records:
        assert job.status == "success" and job.inline is not None
        assert job.inline.image_uuid == job.result["guideImageUUID"]
        texts = list(_strings([job.result, job.webhook, job.inline.prefix, job.fingerprint]))
        assert max(len(t) for t in texts) <= 64  # UUIDs, field names, hashes: no image data
    for item in [*first, async_item]:
        inline = item.get("guideImageBase64Data") or item["guideImageDataURI"]
        assert all(inline[-200:] not in t for job in records for t in _strings(job.result))

    # the answers are rebuilt from the stored guide, byte for byte, without recomputing
    replay = post(base, tasks).json()["data"]
    assert replay == first
    for task, item in zip([*tasks, async_task], [*first, async_item], strict=True):
        polled = post(base, [{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        polled_item = {k: v for k, v in polled.json()["data"][0].items() if k != "webhook"}
        assert polled_item == {**item, "status": "success"}
    assert engine.calls == len(tasks) + 1
    stored = httpx.get(f"{base}/image/{first[0]['guideImageUUID']}.png").content
    assert base64.b64decode(first[0]["guideImageBase64Data"]) == stored
    (hook,) = receiver.wait_for(1)
    assert json.loads(hook.body) == {**first[-1], "status": "success"}


def test_inline_result_whose_guide_was_evicted(server_factory: Callable[..., str]) -> None:
    """Once the stored guide is gone (a 1-byte store cap keeps only the newest image), an
    inline result cannot be rebuilt: a replay is a 410 ``guideImageExpired``, getResponse a
    per-task error item, and nothing is recomputed. URL results still replay."""
    engine = GatedEngine()
    engine.gate.set()
    app = create_app(test_config(engine=engine, storage_max_bytes=1))
    base = server_factory(app=app)
    gone, url_task = canny_task(outputType="base64Data"), canny_task()
    assert post(base, [gone]).status_code == 200
    assert post(base, [url_task]).status_code == 200  # its input and guide evict `gone`'s
    latest = canny_task(outputType="dataURI")
    latest_item = post(base, [latest]).json()["data"][0]
    assert engine.calls == 3

    r = post(base, [gone])
    assert r.status_code == 410
    (err,) = r.json()["errors"]
    assert (err["code"], err["taskUUID"], err["parameter"]) == (
        "guideImageExpired",
        gone["taskUUID"],
        "taskUUID",
    )
    r = post(base, [{"taskType": "getResponse", "taskUUID": gone["taskUUID"]}])
    assert r.status_code == 200
    (item,) = r.json()["data"]
    assert item["status"] == "error" and item["error"]["code"] == "guideImageExpired"
    assert "guideImageBase64Data" not in item
    assert r.json()["errors"][0]["code"] == "guideImageExpired"
    # in a mixed batch the expired task fails alone; the newest guide is still stored
    r = post(base, [gone, latest])
    assert r.status_code == 200
    assert r.json()["data"] == [latest_item]
    assert [e["taskUUID"] for e in r.json()["errors"]] == [gone["taskUUID"]]
    assert post(base, [url_task]).status_code == 200  # a URL record needs no stored bytes
    assert engine.calls == 3  # never recomputed


# -- webhooks and uploads ----------------------------------------------------------------------


def test_webhook_retried_until_delivered(base: str) -> None:
    with Receiver(statuses=[500, 500]) as hook:
        task = canny_task(webhookURL=f"{hook.url}/hook?token=s3cret")
        item = post(base, [task]).json()["data"][0]
        posts = hook.wait_for(3)
        assert [p.method for p in posts] == ["POST"] * 3
        payloads = [json.loads(p.body) for p in posts]
        assert payloads[-1] == {**item, "status": "success"}
        assert posts[0].path == "/hook?token=s3cret"
        for _ in range(200):  # the record is written right after the third POST returns
            webhook = poll(base, task["taskUUID"])["data"][0]["webhook"]
            if webhook["status"] != "pending":
                break
            time.sleep(0.02)
        assert webhook == {
            "url": f"{hook.url}/hook",
            "status": "delivered",
            "attempts": 3,
            "lastStatus": 200,
        }


def test_webhook_gives_up_and_records_the_failure(server_factory: Callable[..., str]) -> None:
    base = server_factory(test_config(webhook_attempts=3))
    with Receiver(default_status=503) as hook:
        task = canny_task(deliveryMethod="async", webhookURL=f"{hook.url}/hook")
        post(base, [task])
        hook.wait_for(3)
        for _ in range(200):
            item = poll(base, task["taskUUID"])["data"][0]
            if item.get("webhook", {}).get("status") == "failed":
                break
            time.sleep(0.02)
        assert item["webhook"]["status"] == "failed"
        assert item["webhook"]["attempts"] == 3
        assert item["webhook"]["lastStatus"] == 503
        assert item["status"] == "success"  # the task itself succeeded
        assert len(hook.writes()) == 3


def test_failing_upload_endpoint_fails_the_task(base: str) -> None:
    with Receiver(statuses=[500, 403]) as sink:
        retryable = canny_task(uploadEndpoint=f"{sink.url}/put")
        r = post(base, [retryable])
        assert r.status_code == 502
        err = r.json()["errors"][0]
        assert (err["code"], err["parameter"]) == ("uploadFailed", "uploadEndpoint")
        final = canny_task(uploadEndpoint=f"{sink.url}/put")
        r = post(base, [final])
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "uploadFailed"
        ok = canny_task(uploadEndpoint=f"{sink.url}/put", outputFormat="WEBP")
        r = post(base, [ok])
        assert r.status_code == 200
        put = sink.writes()[-1]
        assert put.method == "PUT" and put.headers["Content-Type"] == "image/webp"
        assert decode(put.body).format == "WEBP"
        # the response fields stay normal: our own URL, same bytes as uploaded
        assert httpx.get(r.json()["data"][0]["guideImageURL"]).content == put.body


def test_upload_endpoint_presigned_s3_put(
    base: str, s3_endpoint: str, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A presigned PUT URL of a real S3 endpoint (moto's server, from tests/s3.py)."""
    import boto3
    import s3fs

    s3 = s3_endpoint
    bucket = s3_bucket.removeprefix("s3://")
    fs = s3fs.S3FileSystem(
        anon=False,
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": s3},
        skip_instance_cache=True,
    )
    client = boto3.client(
        "s3",
        endpoint_url=s3,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    url = client.generate_presigned_url(
        "put_object",
        Params={"Bucket": bucket, "Key": "room/canny.png", "ContentType": "image/png"},
        ExpiresIn=600,
    )
    assert "X-Amz-Signature" in url or "Signature=" in url
    for name in WATCHED_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    task = canny_task(uploadEndpoint=url, outputFormat="PNG", outputType="base64Data")
    r = post(base, [task])
    assert r.status_code == 200, r.text
    guide = base64.b64decode(r.json()["data"][0]["guideImageBase64Data"])
    stored = fs.cat(f"{bucket}/room/canny.png")
    assert stored == guide
    assert decode(stored).format == "PNG"
    assert fs.info(f"{bucket}/room/canny.png")["ContentType"] == "image/png"
    # the presigned signature never reaches our logs (ours, netguard's, httpx's, uvicorn's),
    # though the upload was logged (moto's and botocore's own logs are not ours)
    ours = our_log_text(caplog)
    assert "uploaded guide image to" in ours
    assert "HTTP Request: PUT" in ours  # httpx logged the request, redacted
    assert "X-Amz-Signature" not in ours
    assert "Signature=" not in ours


# -- auth --------------------------------------------------------------------------------------

KEY = "gf-test-key-7f3a9c2e1b"


@pytest.fixture()
def auth_base(server_factory: Callable[..., str]) -> str:
    return server_factory(test_config(no_auth=False, api_keys=("other-key-0000", KEY)))


def test_auth_required_for_every_task_type(auth_base: str) -> None:
    tasks = [
        {"taskType": "ping", "ping": True},
        canny_task(),
        {"taskType": "getResponse", "taskUUID": uid()},
    ]
    for key in (None, "wrong-key", KEY[:-1]):
        r = post(auth_base, tasks, key=key)
        assert r.status_code == 401
        errors = r.json()["errors"]
        assert len(errors) == 3 and "data" not in r.json()
        assert {(e["code"], e["parameter"]) for e in errors} == {("invalidApiKey", "apiKey")}
        assert errors[1]["taskUUID"] == tasks[1]["taskUUID"]
    r = post(auth_base, tasks[:2], key=KEY)
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_authentication_task_form(auth_base: str) -> None:
    ok = [{"taskType": "authentication", "apiKey": KEY}, {"taskType": "ping", "ping": True}]
    r = post(auth_base, ok)
    assert r.status_code == 200
    auth, pong = r.json()["data"]
    assert auth["taskType"] == "authentication"
    uuid.UUID(auth["connectionSessionUUID"])
    assert pong == {"taskType": "ping", "pong": True}
    bad = [{"taskType": "authentication", "apiKey": "nope"}, {"taskType": "ping", "ping": True}]
    r = post(auth_base, bad)
    assert r.status_code == 401
    assert r.json()["errors"][0] == {
        "code": "invalidApiKey",
        "message": r.json()["errors"][0]["message"],
        "parameter": "apiKey",
        "taskType": "authentication",
        "documentation": r.json()["errors"][0]["documentation"],
    }
    # a valid header does not excuse a wrong key in the body
    assert post(auth_base, bad, key=KEY).status_code == 401


def test_no_keys_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="no-auth"):
        create_app(ServerConfig(api_keys=()))
    from typer.testing import CliRunner

    from guideflow.cli import app

    result = CliRunner().invoke(app, ["serve", "--api-key-env", "GF_TEST_UNSET_KEYS"])
    assert result.exit_code == 2


def test_keys_never_logged(auth_base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    post(
        auth_base,
        [{"taskType": "authentication", "apiKey": KEY}, {"taskType": "ping", "ping": True}],
    )
    post(auth_base, [canny_task(webhookURL="http://127.0.0.1:9/x?X-Amz-Signature=abc")], key=KEY)
    post(auth_base, [{"taskType": "ping", "ping": True}], key="wrong-" + KEY)
    logging.getLogger("guideflow.server").info("leak test %s", f"Bearer {KEY}")
    assert caplog.records  # the server did log
    assert KEY not in caplog.text
    assert "X-Amz-Signature" not in caplog.text
    assert "leak test Bearer ***" in caplog.text


def test_redacting_filter_rewrites_records() -> None:
    flt = RedactingFilter(["sekrit-key-123"])
    record = logging.LogRecord(
        "httpx",
        logging.INFO,
        __file__,
        1,
        'HTTP Request: PUT %s "%s"',
        (
            "https://b.s3.amazonaws.com/k.png?X-Amz-Signature=deadbeef&X-Amz-Credential=x",
            "Authorization: Bearer sekrit-key-123",
        ),
        None,
    )
    assert flt.filter(record)
    text = record.getMessage()
    assert "deadbeef" not in text and "sekrit-key-123" not in text
    assert "https://b.s3.amazonaws.com/k.png" in text


# -- capacity ----------------------------------------------------------------------------------


def test_over_capacity_is_429_and_nothing_starts(server_factory: Callable[..., str]) -> None:
    engine = GatedEngine()
    base = server_factory(test_config(queue_size=2, workers=1, engine=engine))
    too_big = [canny_task(model="runware:controlnet-preprocess@mlsd") for _ in range(3)]
    r = post(base, too_big)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert [e["code"] for e in r.json()["errors"]] == ["rateLimitExceeded"] * 3
    assert engine.calls == 0
    for t in too_big:  # nothing of the refused batch was started
        assert (
            post(base, [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]).status_code == 404
        )

    held = [canny_task(deliveryMethod="async") for _ in range(2)]
    assert post(base, held).status_code == 200
    r = post(base, [canny_task()])  # the queue is full while both are held
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert post(base, [{"taskType": "ping", "ping": True}]).status_code == 200  # no work: fine
    engine.gate.set()
    for t in held:
        assert poll(base, t["taskUUID"])["data"][0]["status"] == "success"
    assert post(base, [canny_task()]).status_code == 200  # capacity is back


# -- the docs' own examples ----------------------------------------------------------------------

DOCS_AUTH_EXAMPLE = """[
  {
    "taskType": "authentication",
    "apiKey": "<API_KEY>"
  },
  {
    "taskType": "imageInference",
    "taskUUID": "39d7207a-87ef-4c93-8082-1431f9c1dc97",
    "positivePrompt": "a cat",
    "width": 512,
    "height": 512,
    "model": "civitai:102438@133677",
    "numberResults": 1
  }
]"""
DOCS_LEGACY_REQUEST = """[
  {
    "taskType": "imageControlNetPreProcess",
    "taskUUID": "3303f1be-b3dc-41a2-94df-ead00498db57",
    "inputImage": "ff1d9a0b-b80f-4665-ae07-8055b99f4aea",
    "preProcessorType": "canny",
    "height": 512,
    "width": 512
  }
]"""
DOCS_LEGACY_RESPONSE = {
    "taskType": "imageControlNetPreProcess",
    "taskUUID": "3303f1be-b3dc-41a2-94df-ead00498db57",
    "guideImageUUID": "b6a06b3b-ce32-4884-ad93-c5eca7937ba0",
    "inputImageUUID": "ff1d9a0b-b80f-4665-ae07-8055b99f4aea",
    "guideImageURL": "https://im.runware.ai/image/ws/0.5/ii/b6a06b3b-ce32-4884-ad93-c5eca7937ba0.jpg",
    "cost": 0.0006,
}
DOCS_NEW_FORM_EXAMPLES = [
    """{"taskType": "controlNetPreprocess", "model": "runware:controlnet-preprocess@canny",
        "inputs": {"image": "https://example.com/leather-armchair.jpg"},
        "settings": {"lowThresholdCanny": 100, "highThresholdCanny": 200}}""",
    """{"taskType": "controlNetPreprocess", "model": "runware:controlnet-preprocess@openpose",
        "inputs": {"image": "https://example.com/runner-reference.jpg"},
        "settings": {"includeHandsAndFaceOpenPose": true}}""",
    """{"taskType": "controlNetPreprocess", "model": "runware:controlnet-preprocess@depth",
        "inputs": {"image": "https://example.com/plain-living-room.jpg"}}""",
]


def test_docs_authentication_example(server_factory: Callable[..., str]) -> None:
    base = server_factory(test_config(no_auth=False, api_keys=(KEY,)))
    body = json.loads(DOCS_AUTH_EXAMPLE.replace("<API_KEY>", KEY))
    r = post(base, body)
    assert r.status_code == 200
    assert r.json()["data"][0]["taskType"] == "authentication"
    (err,) = r.json()["errors"]
    assert (err["code"], err["taskUUID"]) == (
        "invalidTaskType",
        "39d7207a-87ef-4c93-8082-1431f9c1dc97",
    )
    assert post(base, json.loads(DOCS_AUTH_EXAMPLE)).status_code == 401  # "<API_KEY>" itself


def test_docs_legacy_example_by_uploaded_uuid(server_factory: Callable[..., str]) -> None:
    base = server_factory()
    body = json.loads(DOCS_LEGACY_REQUEST)
    r = post(base, body)
    assert r.status_code == 404
    err = r.json()["errors"][0]
    assert (err["code"], err["parameter"], err["taskUUID"]) == (
        "imageNotFound",
        "inputImage",
        body[0]["taskUUID"],
    )
    up = post(base, [{"taskType": "imageUpload", "taskUUID": uid(), "image": ROOM_URI}])
    image_uuid = up.json()["data"][0]["imageUUID"]
    body[0]["inputImage"] = image_uuid
    r = post(base, body)
    assert r.status_code == 200
    item = r.json()["data"][0]
    assert set(item) == set(DOCS_LEGACY_RESPONSE) - {"cost"}  # cost only with includeCost
    assert item["taskType"] == "imageControlNetPreProcess"
    assert item["inputImageUUID"] == image_uuid
    assert item["guideImageURL"].endswith(f"/image/{item['guideImageUUID']}.jpg")
    im = decode(httpx.get(item["guideImageURL"]).content)
    assert im.format == "JPEG" and max(im.size) <= 512  # height/width 512 downscaled it


def test_docs_new_form_examples(server_factory: Callable[..., str]) -> None:
    def unresolvable(host: str, port: int) -> list[str]:
        raise OSError(f"no DNS in tests ({host})")

    policy = NetPolicy(allow=("127.0.0.0/8",), resolver=unresolvable)
    base = server_factory(test_config(net_policy=policy))
    tasks = []
    for text in DOCS_NEW_FORM_EXAMPLES:
        raw = json.loads(text) | {"taskUUID": uid()}
        parse_task(raw)  # every docs example is a valid task once it has a taskUUID
        tasks.append(raw)
    r = post(base, tasks)
    # they parse and validate; only fetching example.com fails (no network in tests)
    assert [e["code"] for e in r.json()["errors"]] == ["imageDownloadFailed"] * 3
    assert {e["parameter"] for e in r.json()["errors"]} == {"inputs.image"}
    assert r.status_code == 502
