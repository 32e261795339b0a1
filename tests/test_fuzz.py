"""Issue 6 R3: property-based fuzzing of ``POST /v1`` request bodies (hypothesis).

Bodies mix valid task fields with wrong types, extra keys, huge and negative numbers,
weird strings (lone surrogates, NUL, RTL marks, very long), nested garbage, deep
nesting, non-array bodies and NaN literals. Whatever arrives, the real server (uvicorn on
127.0.0.1) must answer like a Runware API:

* never a 5xx;
* a JSON object with ``data`` and/or ``errors``;
* every error a proper error object: ``code`` and ``message`` non-empty strings,
  ``parameter`` a string or null, ``taskType``/``taskUUID`` strings when present;
* every task object that carried a string ``taskUUID`` is answered under that
  taskUUID, in ``data`` or in ``errors`` (unless the body as a whole was refused).

The server's network policy resolves every host name to 10.0.0.1 and allows nothing
private, so URL inputs are refused without any connection (there is no real DNS or
network here, and a fuzzer must not reach one). Only classical preprocessors appear
(canny, shuffle, tile), so no model weights are needed.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from guideflow.netguard import NetPolicy
from tests import corpus
from tests.live_server import run_server, test_config

KEY = "fuzz-key-4c1d9a7e"
#: Codes of errors that refuse the whole body (no task was looked at).
BODY_CODES = {"invalidJSON", "invalidRequestBody", "payloadTooLarge"}


def _resolve_private(host: str, port: int) -> list[str]:
    return ["10.0.0.1"]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    config = test_config(
        no_auth=False,
        api_keys=(KEY,),
        net_policy=NetPolicy(resolver=_resolve_private),
        fetch_timeout=2.0,
        queue_size=512,
        max_body_bytes=4 * 1024**2,
    )
    with run_server(config) as base, httpx.Client(base_url=base, timeout=30) as http:
        yield http


# -- strategies -----------------------------------------------------------------------------

GOOD_PNG = corpus.good_png(0)
IMAGE_REFS = [
    corpus.b64(GOOD_PNG),
    corpus.data_uri(GOOD_PNG, "x.png"),
    corpus.data_uri(corpus.one_pixel_png(), "x.png"),
    corpus.data_uri(corpus.truncated_png(), "x.png"),
    corpus.data_uri(corpus.svg_image(), "x.svg"),
    "data:text/plain;base64,aGVsbG8=",
    "data:image/png,notbase64",
    "data:",
    "iVBORw0KGgo=",
    "!!!",
    " ",
    "00000000-0000-4000-8000-000000000000",
    "http://internal.example/a.png",
    "http://10.0.0.5/a.png",
    "http://127.0.0.1:9/a.png",
    "http://[::1]/a.png",
    "https://user:pass@example.com/a.png",
    "ftp://example.com/a.png",
    "file:///etc/passwd",
    "gopher://x",
    "http://",
]
MODELS = [
    "runware:controlnet-preprocess@canny",
    "runware:controlnet-preprocess@shuffle",
    "runware:controlnet-preprocess@tile",
    "runware:controlnet-preprocess@",
    "runware:controlnet-preprocess@nope",
    "civitai:1@2",
]
PREPROCESSOR_TYPES = ["canny", "shuffle", "tile", "CANNY", "canny ", "", "lineart-nope"]
TASK_TYPES = [
    "controlNetPreprocess",
    "imageControlNetPreProcess",
    "imageUpload",
    "getResponse",
    "ping",
    "authentication",
    "imageInference",
    "",
]
FIELDS = [
    "taskType",
    "taskUUID",
    "model",
    "inputs",
    "settings",
    "inputImage",
    "preProcessorType",
    "lowThresholdCanny",
    "highThresholdCanny",
    "includeHandsAndFaceOpenPose",
    "width",
    "height",
    "outputType",
    "outputFormat",
    "outputQuality",
    "deliveryMethod",
    "webhookURL",
    "uploadEndpoint",
    "ttl",
    "includeCost",
    "image",
    "ping",
    "apiKey",
    "connectionSessionUUID",
    "seed",
    "variant",
]

WEIRD_STRINGS = st.sampled_from(
    [
        "\ud800",
        "a\udfffb",
        "\x00",
        "\u202e\u200b",
        "🤖" * 3,
        "A" * 300,
        "null",
        "NaN",
        "-1",
        "1e999",
        "JPEG",
        "png",
        "URL",
        "base64Data",
        "dataURI",
        "async",
        "sync",
        KEY,
    ]
)
weird_text = st.one_of(
    WEIRD_STRINGS,
    st.text(max_size=20),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),  # surrogates too
)
huge_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 19, 20, 99, 100, 255, 256, 16384, 16385, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, 1e308, -0.0, 0.5, 512.0]),
)
scalars = st.one_of(st.none(), st.booleans(), huge_numbers, weird_text)


class Deep(list):
    """``depth`` nested one-element lists; prints short (hypothesis' printer would recurse)."""

    def __init__(self, depth: int) -> None:
        inner: Any = 1
        for _ in range(depth - 1):
            inner = [inner]
        super().__init__([inner])
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def _deep(depth: int) -> Deep:
    return Deep(depth)


garbage = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), inner, max_size=3),
    ),
    max_leaves=8,
) | st.sampled_from([_deep(40), _deep(3000), {"a": _deep(600)}])

field_values = {
    "taskType": st.sampled_from(TASK_TYPES),
    "taskUUID": st.one_of(
        st.builds(lambda: str(uuid.uuid4())), st.just("not-a-uuid"), weird_text, garbage
    ),
    "model": st.sampled_from(MODELS),
    "preProcessorType": st.sampled_from(PREPROCESSOR_TYPES),
    "inputImage": st.sampled_from(IMAGE_REFS),
    "image": st.sampled_from(IMAGE_REFS),
    "inputs": st.builds(lambda ref: {"image": ref}, st.sampled_from(IMAGE_REFS)),
    "settings": st.dictionaries(
        st.one_of(st.sampled_from(FIELDS), weird_text), st.one_of(scalars, garbage), max_size=3
    ),
    "outputType": st.sampled_from(["URL", "base64Data", "dataURI", "url"]),
    "outputFormat": st.sampled_from(["JPG", "PNG", "WEBP", "jpeg", "gif"]),
    "deliveryMethod": st.sampled_from(["sync", "async", "later"]),
    "webhookURL": st.sampled_from(IMAGE_REFS),
    "uploadEndpoint": st.sampled_from(IMAGE_REFS),
    "apiKey": st.sampled_from([KEY, "wrong", ""]),
}


def _field(name: str) -> st.SearchStrategy[Any]:
    """Mostly a plausible value for ``name``, sometimes anything at all."""
    plausible = field_values.get(name, huge_numbers)
    return st.one_of(plausible, plausible, garbage)


def _valid_base(kind: str, ref: str) -> dict[str, Any]:
    task_uuid = str(uuid.uuid4())
    if kind == "new":
        return {
            "taskType": "controlNetPreprocess",
            "taskUUID": task_uuid,
            "model": "runware:controlnet-preprocess@canny",
            "inputs": {"image": ref},
            "outputType": "base64Data",
        }
    if kind == "legacy":
        return {
            "taskType": "imageControlNetPreProcess",
            "taskUUID": task_uuid,
            "preProcessorType": "canny",
            "inputImage": ref,
        }
    if kind == "upload":
        return {"taskType": "imageUpload", "taskUUID": task_uuid, "image": ref}
    if kind == "poll":
        return {"taskType": "getResponse", "taskUUID": task_uuid}
    if kind == "auth":
        return {"taskType": "authentication", "apiKey": KEY}
    return {"taskType": "ping", "ping": True}


@st.composite
def task_objects(draw: st.DrawFn) -> Any:
    """A valid task of some type, then some fields changed, added or removed."""
    kind = draw(st.sampled_from(["new", "legacy", "upload", "poll", "ping", "auth"]))
    task = _valid_base(kind, draw(st.sampled_from(IMAGE_REFS[:3])))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        task[name] = draw(_field(name))
    if kind == "new" and draw(st.booleans()):
        task["settings"] = draw(field_values["settings"])
    extra = draw(st.dictionaries(weird_text, scalars, max_size=2))
    task.update(extra)
    for name in draw(st.lists(st.sampled_from(sorted(task)), max_size=2, unique=True)):
        if draw(st.booleans()):
            del task[name]
    return task


bodies = st.one_of(
    st.lists(task_objects(), min_size=1, max_size=4),
    st.lists(task_objects(), min_size=1, max_size=4),
    st.lists(task_objects(), min_size=1, max_size=4),
    st.lists(st.one_of(task_objects(), garbage), min_size=0, max_size=3),
    task_objects(),  # not wrapped in an array
    garbage,
)


# -- the property ---------------------------------------------------------------------------


def _echoed_uuids(body: dict[str, Any]) -> set[str]:
    found = {i.get("taskUUID") for i in body.get("data", []) if isinstance(i, dict)}
    found |= {e.get("taskUUID") for e in body.get("errors", []) if isinstance(e, dict)}
    return {u for u in found if isinstance(u, str)}


def check_answer(request_body: Any, response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    body = response.json()
    assert isinstance(body, dict) and ({"data", "errors"} & body.keys()), body
    assert set(body) <= {"data", "errors"}
    data, errors = body.get("data", []), body.get("errors", [])
    assert isinstance(data, list) and isinstance(errors, list)
    assert all(isinstance(item, dict) for item in data)
    if response.status_code != 200:
        assert errors and not data
    for err in errors:
        assert isinstance(err, dict)
        assert isinstance(err.get("code"), str) and err["code"], err
        assert isinstance(err.get("message"), str) and err["message"], err
        assert isinstance(err.get("parameter"), str | None), err
        for name in ("taskType", "taskUUID", "documentation"):
            assert isinstance(err.get(name), str | None), err
    if any(e["code"] in BODY_CODES for e in errors):
        assert len(errors) == 1 and not data
        return
    if isinstance(request_body, RawBody):
        return
    assert isinstance(request_body, list)
    echoed = _echoed_uuids(body)
    missing = {
        t["taskUUID"]
        for t in request_body
        if isinstance(t, dict) and isinstance(t.get("taskUUID"), str)
    } - echoed
    assert not missing, (missing, body)
    assert len(data) + len(errors) >= len(request_body)


@dataclass(frozen=True)
class RawBody:
    """Bytes sent as they are (bodies no JSON encoder would write)."""

    data: bytes


def _dumps(body: Any) -> bytes:
    """JSON as a sloppy client writes it: NaN/Infinity literals and all.

    The recursion limit is raised for the encoder so that the deeply nested samples
    (900 levels) are sent as they are.
    """
    if isinstance(body, RawBody):
        return body.data
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 5000))
    try:
        return json.dumps(body, allow_nan=True).encode()
    finally:
        sys.setrecursionlimit(limit)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=bodies)
# Regressions the fuzzer found (each was an HTTP 500 before the fix in engine/server/app.py):
@example(body=RawBody(b"[" * 5000))  # RecursionError in json.loads
@example(body=[{"taskType": "ping", "ping": True, "taskUUID": "\ud800"}])  # echo not UTF-8
@example(body=[_valid_base("new", IMAGE_REFS[0]) | {"settings": {"x\udfff": 1}}])  # hashing
@example(body=[_valid_base("new", IMAGE_REFS[0]) | {"settings": {"seed": _deep(500)}}])  # depth
@example(body=RawBody(b'[{"taskType":"ping","ping":true,"connectionSessionUUID":"\xed\xa0\x80"}]'))
@example(body=RawBody('[{"taskType": "ping", "ping": true}]'.encode("utf-16")))
def test_fuzzed_requests_get_proper_answers(client: httpx.Client, body: Any) -> None:
    response = client.post(
        "/v1",
        content=_dumps(body),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    check_answer(body, response)


def test_fuzz_checker_would_catch_a_bad_answer() -> None:
    """The property is not vacuous: a 5xx, a bare object or a lost taskUUID all fail it."""
    task = {"taskType": "ping", "ping": True, "taskUUID": str(uuid.uuid4())}
    request = httpx.Request("POST", "http://x/v1")
    bad_answers = [
        httpx.Response(500, json={"errors": [{"code": "internalError", "message": "x"}]}),
        httpx.Response(200, json={"ok": True}),
        httpx.Response(200, json={"data": [{"taskType": "ping", "pong": True}]}),
        httpx.Response(400, json={"errors": [{"code": 3, "message": "x"}]}),
        httpx.Response(400, json={"errors": [{"code": "x", "message": "x", "parameter": 1}]}),
    ]
    for answer in bad_answers:
        answer.request = request
        with pytest.raises(AssertionError):
            check_answer([task], answer)
    good = httpx.Response(200, json={"data": [{"taskType": "ping", "pong": True, **task}]})
    good.request = request
    check_answer([task], good)
    assert math.isnan(json.loads(_dumps([float("nan")]), parse_constant=float)[0])
