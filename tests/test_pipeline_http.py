"""End to end over HTTP: the ``preprocess_manifest`` flow → ``guideflow serve`` → S3.

Everything is real: an ephemeral Prefect API (one ``prefect_test_harness`` for the
session), our own server (``tests/live_server.run_server``) with API-key auth ON and
loopback URLs allowed (it fetches inputs from and uploads guide images to the moto S3
server on 127.0.0.1), and the moto S3 server (``tests/s3.py``) holding the manifest,
the inputs, the outputs and the ledger. The pipeline gets the API key only through the
environment variable named by ``api_key_env``.

A recording ASGI wrapper around the server app keeps every ``POST /v1`` request body
(and its answer), so the tests can count ``imageUpload`` / preprocess tasks and check
the presigned URLs the pipeline generated. moto accepts any signature, so presigned
URLs are proven valid by recomputing their SigV4 signature with botocore's own signer
(``tests.test_storage.botocore_presign``).

Photos are downscaled to at most 256 px and shards hold 2 rows, so every run has
several shards and the module stays fast.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from connectors import ledger as ledger_mod
from engine import registry
from engine.api import Engine
from engine.server import create_app
from flows.preprocess import RunSummary, build_config, flow_for
from guideflow.protocol import PREPROCESS_TASK_TYPES, parse_task
from tests.conftest import thumbnails
from tests.live_server import run_server, test_config
from tests.test_storage import botocore_presign, query

pytestmark = pytest.mark.timeout(300)

API_KEY = f"gf-test-{uuid.uuid4().hex}"  # a fresh secret per session, searched for in logs
CANNY = 0.0006  # includeCost price of a canny-class guide image (guideflow.pricing default)
DEPTH = 0.0013  # includeCost price of a depth-class guide image (mlsd is one)
PREPROCESSORS = ("canny", "shuffle", "mlsd")
PRICES = {"canny": CANNY, "shuffle": CANNY, "mlsd": DEPTH}
PHOTOS = ("room", "building", "human")
THUMB = 256
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


# -- a recording ASGI wrapper around the real server ---------------------------------------


@dataclass
class Exchange:
    """One ``POST /v1``: the task array sent, the bearer token, the status and JSON answer."""

    tasks: list[dict[str, Any]]
    authorization: str
    status: int
    answer: dict[str, Any]


class Recorder:
    """ASGI middleware that records every ``POST /v1`` request body and its response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status: list[int] = []
        answer: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
            await send(message)

        await self.app(scope, replay, capture)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        exchange = Exchange(
            tasks=json.loads(body),
            authorization=headers.get("authorization", ""),
            status=status[0],
            answer=json.loads(b"".join(answer)),
        )
        with self._lock:
            self.exchanges.append(exchange)

    def clear(self) -> None:
        with self._lock:
            self.exchanges.clear()

    def tasks(self, *task_types: str) -> list[dict[str, Any]]:
        """Every task sent so far whose taskType is one of ``task_types``."""
        with self._lock:
            return [t for e in self.exchanges for t in e.tasks if t.get("taskType") in task_types]

    def answers(self) -> list[dict[str, Any]]:
        """Every result item the server answered with."""
        with self._lock:
            return [item for e in self.exchanges for item in e.answer.get("data", [])]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api(prefect_harness: None) -> Iterator[None]:
    """The session's ephemeral Prefect API (tests/prefect_harness.py)."""
    yield


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Iterator[Any]:
    """A sync s3fs on moto; the pipeline finds moto only through GUIDEFLOW_S3_ENDPOINT."""
    import s3fs

    from tests.s3 import s3_options

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUIDEFLOW_S3_ENDPOINT", s3_endpoint)
        yield s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(s3_endpoint))


@pytest.fixture(scope="module")
def server(s3: Any) -> Iterator[tuple[str, Recorder]]:
    """``guideflow serve`` with auth ON (one key), loopback allowed; (base URL, recorder)."""
    recorder = Recorder(create_app(test_config(no_auth=False, api_keys=(API_KEY,))))
    with run_server(app=recorder) as base_url:
        yield base_url, recorder


@pytest.fixture(scope="module")
def photos(images_dir: Path) -> dict[str, bytes]:
    """Real photos as PNG, downscaled to at most THUMB px (RGBA kept, like the originals)."""
    return thumbnails(PHOTOS, THUMB)


@pytest.fixture()
def recorder(server: tuple[str, Recorder], prefect_api: None) -> Recorder:
    """The server's recorder, emptied for this test (Prefect is running)."""
    server[1].clear()
    return server[1]


@pytest.fixture()
def endpoint(server: tuple[str, Recorder]) -> str:
    return f"{server[0]}/v1"


@pytest.fixture()
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The right key in RUNWARE_API_KEY (the flow's default ``api_key_env``)."""
    monkeypatch.setenv("RUNWARE_API_KEY", API_KEY)
    return API_KEY


def make_job(s3: Any, bucket: str, photos: dict[str, bytes], rows: list[dict[str, str]]) -> dict:
    """Put the photos in ``<bucket>/in/`` and a CSV manifest of ``rows`` (plus one row per
    photo, id = name, the run's preprocessors); the job's URLs."""
    for name in PHOTOS:
        s3.pipe(f"{bucket}/in/{name}.png".removeprefix("s3://"), photos[name])
    rows = [{"id": n, "image": f"{bucket}/in/{n}.png", "preprocessor": ""} for n in PHOTOS] + rows
    manifest = f"{bucket}/manifests/batch.csv"
    s3.pipe(manifest.removeprefix("s3://"), pd.DataFrame(rows).to_csv(index=False).encode())
    return {
        "bucket": bucket,
        "manifest": manifest,
        "output": f"{bucket}/out",
        "ledger": f"{bucket}/ledger",
    }


@pytest.fixture()
def job(s3: Any, s3_bucket: str, photos: dict[str, bytes]) -> dict[str, str]:
    """A fresh bucket with the photos in ``in/`` and a CSV manifest of them (id = name)."""
    return make_job(s3, s3_bucket, photos, [])


# -- helpers -------------------------------------------------------------------------------


def run_flow(**params: Any) -> Any:
    """Run the flow the way the CLI does (HTTP backend); return its final state."""
    params.setdefault("backend", "http")
    params.setdefault("shard_size", 2)
    params.setdefault("max_shards_in_flight", 2)
    params.setdefault("concurrency", 4)
    config = build_config(**dict(params))
    return asyncio.run(flow_for(config)(**params, return_state=True))


def result_of(state: Any) -> Any:
    result = state.result(raise_on_failure=False)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return result


def summary_of(state: Any) -> RunSummary:
    result = result_of(state)
    assert isinstance(result, RunSummary), (state, result)
    return result


def ledger_blobs(s3: Any, ledger: str) -> list[bytes]:
    """The raw bytes of every ledger file."""
    s3.invalidate_cache()
    root = ledger.removeprefix("s3://")
    paths = sorted(p for p in s3.find(root) if p.endswith(".parquet")) if s3.exists(root) else []
    return [s3.cat(p) for p in paths]


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def log_text(caplog: pytest.LogCaptureFixture, exclude: str | None = None) -> str:
    """Every captured record (pipeline, Prefect, client, server, libraries) as one text,
    leaving out loggers under ``exclude``."""
    parts = []
    for record in caplog.records:
        if exclude and (record.name == exclude or record.name.startswith(f"{exclude}.")):
            continue
        parts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(repr(record.exc_info[1]))
    return "\n".join(parts)


def preprocess_tasks(recorder: Recorder) -> list[dict[str, Any]]:
    return recorder.tasks(*PREPROCESS_TASK_TYPES)


def image_of(task: dict[str, Any]) -> str:
    return parse_task(task).image


def name_of(task: dict[str, Any]) -> str:
    return registry.canonical_name(parse_task(task).preprocessor)


def key_of(url: str) -> str:
    """``/bucket/key`` of a path-style presigned URL, unquoted."""
    return unquote(urlsplit(url).path)


# -- 1-3, 5. the happy path, then a resume --------------------------------------------------


def test_http_backend_end_to_end(
    s3: Any,
    s3_endpoint: str,
    s3_bucket: str,
    photos: dict[str, bytes],
    recorder: Recorder,
    endpoint: str,
    api_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three preprocessors per image through the server; outputs land in S3 via presigned
    PUT, each input is uploaded once and referred to by UUID, costs come from the server's
    includeCost, and no signature or API key reaches a log or the ledger. One extra row
    names its input by an http presigned GET URL (canny only): it is passed to the
    server as it is. A second run sends nothing and costs nothing."""
    from connectors.storage import presign_get

    caplog.set_level(logging.DEBUG)
    linked = asyncio.run(presign_get(f"{s3_bucket}/in/room.png", expires=600))
    job = make_job(
        s3, s3_bucket, photos, [{"id": "linked", "image": linked, "preprocessor": "canny"}]
    )
    bucket, output, ledger = job["bucket"], job["output"], job["ledger"]
    params = {
        "manifest": job["manifest"],
        "preprocessors": list(PREPROCESSORS),
        "output": output,
        "ledger": ledger,
        "endpoint": endpoint,
    }
    config = build_config(**params, backend="http")
    expected = sorted([(i, p) for i in PHOTOS for p in PREPROCESSORS] + [("linked", "canny")])
    n = len(expected)

    state = run_flow(**params)

    assert state.is_completed() and state.name == "Completed", state
    summary = summary_of(state)
    assert (summary.rows, summary.shards, summary.success, summary.errors) == (4, 2, n, 0)
    assert summary.cost_by_preprocessor == pytest.approx(
        {p: len(PHOTOS) * PRICES[p] + (p == "canny") * CANNY for p in PREPROCESSORS}
    )

    # -- 1. outputs: <output>/<preprocessor>/<id>.png, decodable; canny == in-process engine
    engine = Engine()
    sources = {**photos, "linked": photos["room"]}
    for image_id, proc in expected:
        key = f"{output}/{proc}/{image_id}.png".removeprefix("s3://")
        data = s3.cat(key)
        assert s3.info(key).get("ContentType") == "image/png", key
        pixels = decode(data)
        assert pixels.ndim == 3 and pixels.shape[2] == 3, key
        with Image.open(io.BytesIO(sources[image_id])) as im:
            assert pixels.shape[:2] == (im.height, im.width), key
        assert pixels.std() > 0, f"{key} is blank"
        if proc == "canny":
            local = engine.preprocess(sources[image_id], "canny", output_format="PNG").data
            assert data == local, key

    # -- ledger: one success per (image, preprocessor), backend http, server's UUID and cost
    frame = ledger_mod.read_ledger(ledger)
    assert len(frame) == n
    assert set(frame["status"]) == {"success"}
    assert sorted(zip(frame["image_id"], frame["preprocessor"], strict=True)) == expected
    assert (frame["backend"] == "http").all()
    assert frame["guide_image_uuid"].str.fullmatch(UUID_RE).all()
    assert frame["guide_image_uuid"].is_unique
    for proc, cost in zip(frame["preprocessor"], frame["cost_usd"], strict=True):
        assert cost == pytest.approx(PRICES[proc]), proc
    for _, row in frame.iterrows():
        assert row["output_uri"] == f"{output}/{row['preprocessor']}/{row['image_id']}.png"
    assert frame.loc[frame["image_id"] == "linked", "input_uri"].tolist() == [linked.split("?")[0]]
    answered = {a["guideImageUUID"]: a for a in recorder.answers() if "guideImageUUID" in a}
    assert set(frame["guide_image_uuid"]) == set(answered)  # the server's UUIDs, verbatim
    for _, row in frame.iterrows():
        assert answered[row["guide_image_uuid"]]["taskUUID"] == row["task_uuid"]
        assert answered[row["guide_image_uuid"]]["cost"] == pytest.approx(row["cost_usd"])

    # -- 2. one imageUpload per image used by ≥2 preprocessors; its UUID reused by all
    bucket_name = bucket.removeprefix("s3://")
    uploads = recorder.tasks("imageUpload")
    assert len(uploads) == len(PHOTOS)
    upload_uuid = {a["taskUUID"]: a["imageUUID"] for a in recorder.answers() if "imageUUID" in a}
    id_of_upload: dict[str, str] = {}  # uploaded imageUUID -> image id
    for task in uploads:
        url = task["image"]  # a presigned GET URL of the input in S3, fetched by the server
        assert url.startswith(f"{s3_endpoint}/{bucket_name}/in/"), url
        params_q = query(url)
        assert params_q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
        assert params_q["X-Amz-Expires"] == str(config.presign_expiry_s)
        assert botocore_presign(url, method="GET")[0] == params_q["X-Amz-Signature"]
        id_of_upload[upload_uuid[task["taskUUID"]]] = Path(key_of(url)).stem
    assert sorted(id_of_upload.values()) == sorted(PHOTOS)
    tasks = preprocess_tasks(recorder)
    assert len(tasks) == n
    sent: dict[str, list[str]] = {}
    for task in tasks:
        sent.setdefault(image_of(task), []).append(name_of(task))
    assert sent.pop(linked) == ["canny"]  # used once: the URL as it is, no upload
    assert set(sent) == set(id_of_upload)  # every other task refers to an upload
    assert all(sorted(v) == sorted(PREPROCESSORS) for v in sent.values())

    # -- 3. the presigned PUT URLs are valid SigV4 for a PUT of exactly the output key
    for task in tasks:
        assert task["includeCost"] is True
        url = task["uploadEndpoint"]
        params_q = query(url)
        assert "content-type" in params_q["X-Amz-SignedHeaders"].split(";")
        assert params_q["X-Amz-Expires"] == str(config.presign_expiry_s)
        assert params_q["X-Amz-Credential"].split("/")[2:] == ["us-east-1", "s3", "aws4_request"]
        image_id = id_of_upload.get(image_of(task), "linked")
        assert key_of(url) == f"/{bucket_name}/out/{name_of(task)}/{image_id}.png"
        png = {"Content-Type": "image/png"}
        signature, resigned = botocore_presign(url, method="PUT", headers=png)
        assert signature == params_q["X-Amz-Signature"]
        assert resigned == url
        assert botocore_presign(url, method="GET", headers=png)[0] != signature
        wrong_type = {"Content-Type": "image/jpeg"}
        assert botocore_presign(url, method="PUT", headers=wrong_type)[0] != signature

    # -- no signature and no API key in the ledger's bytes or in any log record
    blobs = ledger_blobs(s3, ledger)
    assert len(blobs) == 2  # one file per shard
    for blob in blobs:
        assert b"X-Amz-Signature" not in blob and b"X-Amz-Credential" not in blob
        assert API_KEY.encode() not in blob
    text = log_text(caplog)
    assert any(r.name == "guideflow.server" for r in caplog.records)  # server logs captured
    assert "X-Amz-Signature" not in text
    assert API_KEY not in text
    # Nor any presigned signature's value, except in botocore's own signer debug output.
    ours = log_text(caplog, exclude="botocore")
    presigned = [linked, *(t["image"] for t in uploads), *(t["uploadEndpoint"] for t in tasks)]
    for url in presigned:
        assert query(url)["X-Amz-Signature"] not in ours
    assert all(e.authorization == f"Bearer {API_KEY}" for e in recorder.exchanges)

    # -- 5. resume: a second run sends no task at all and costs nothing
    recorder.clear()
    state = run_flow(**params)
    again = summary_of(state)
    assert state.is_completed(), state
    assert (again.success, again.errors, again.already_done) == (0, 0, n)
    assert again.cost_usd == 0
    assert recorder.exchanges == []
    assert ledger_mod.duplicate_successes(ledger).empty


def test_forced_rerun_sends_new_task_uuids(
    s3: Any, job: dict[str, str], recorder: Recorder, endpoint: str, api_key: str
) -> None:
    """``force`` over HTTP redoes the work with new taskUUIDs: re-sending a taskUUID the
    server already completed, with a new payload (fresh presigned URLs), would be
    answered ``conflictTaskUUID``."""
    params = {
        "manifest": job["manifest"],
        "preprocessors": ["canny"],
        "output": job["output"],
        "ledger": job["ledger"],
        "endpoint": endpoint,
        "shard_size": 3,
    }
    first = summary_of(run_flow(**params))
    second = summary_of(run_flow(**params, force=True))

    assert (first.success, second.success, second.errors) == (3, 3, 0)
    sent = [t["taskUUID"] for t in preprocess_tasks(recorder)]
    assert len(sent) == 6 and len(set(sent)) == 6
    frame = ledger_mod.read_ledger(job["ledger"])
    assert sorted(frame["task_uuid"]) == sorted(sent)  # the ledger names what was sent


def run_one_image_shards(job: dict[str, str], endpoint: str, in_flight: int) -> RunSummary:
    """The job's three images with canny, one image per shard, ``in_flight`` at a time."""
    return summary_of(
        run_flow(
            manifest=job["manifest"],
            preprocessors=["canny"],
            output=job["output"],
            ledger=job["ledger"],
            endpoint=endpoint,
            shard_size=1,
            max_shards_in_flight=in_flight,
        )
    )


def test_shards_on_the_flow_loop_share_clients_and_the_collector_is_restored(
    s3: Any,
    job: dict[str, str],
    recorder: Recorder,
    endpoint: str,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three one-image shards, at most two in flight: at most two clients are ever made
    (finished shards hand theirs on) and all are closed; the flow leaves the garbage
    collector as it found it (nothing frozen, the same thresholds)."""
    from tasks import shard as shard_mod

    made: list[Any] = []
    real_make = shard_mod.make_backend

    async def counting_make(config: Any) -> Any:
        backend = await real_make(config)
        made.append(backend)
        return backend

    monkeypatch.setattr(shard_mod, "make_backend", counting_make)
    thresholds = gc.get_threshold()
    summary = run_one_image_shards(job, endpoint, in_flight=2)
    assert (summary.shards, summary.success) == (3, 3)
    assert 1 <= len(made) <= 2
    assert all(b.client._http.is_closed for b in made)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):  # the flow set malloc for pyarrow
        assert pa.default_memory_pool().backend_name == "system"


def test_a_slow_progress_update_does_not_hold_up_the_next_shard(
    s3: Any,
    job: dict[str, str],
    recorder: Recorder,
    endpoint: str,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Progress artifacts are published off the scheduling path, one per shard, in order.

    One shard in flight at a time, and the first progress update cannot finish until the
    third shard is done: if the flow awaited the update before scheduling the next shard,
    the second shard would never start (the update gives up after 60 s and the test
    fails on the order of events).
    """
    import flows.preprocess as pipeline

    events: list[str] = []
    all_done = threading.Event()

    def hook(_shard: Any, summary: RunSummary) -> None:
        events.append(f"shard {summary.shards}")
        if summary.shards == 3:
            all_done.set()

    async def slow_progress(summary: RunSummary, *_: Any, final: bool = False) -> None:
        if not any(e.startswith("progress") for e in events):  # the first update only
            await asyncio.to_thread(all_done.wait, 60)
        events.append(f"progress {'final' if final else summary.shards}")

    monkeypatch.setattr(pipeline, "_progress", slow_progress)
    monkeypatch.setattr(pipeline, "PROGRESS_HOOKS", [hook])
    summary = run_one_image_shards(job, endpoint, in_flight=1)
    assert (summary.shards, summary.success) == (3, 3)
    # The first update waited for all three shards; every shard got its update, in order.
    assert events[:3] == ["shard 1", "shard 2", "shard 3"], events
    assert [e for e in events if e.startswith("progress")][-1] == "progress final"
    assert len([e for e in events if e.startswith("progress")]) == 4


# -- 4. a failed upload is an error row, never a success -----------------------------------


def test_failed_upload_is_an_error_row(
    s3: Any, job: dict[str, str], recorder: Recorder, endpoint: str, api_key: str
) -> None:
    """Outputs pointed at a bucket that does not exist: the server's PUT to the presigned
    URL gets 404, so every row is an ``uploadFailed`` error and none is a success."""
    output = f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}/out"
    state = run_flow(
        manifest=job["manifest"],
        preprocessors=["canny", "shuffle"],
        output=output,
        ledger=job["ledger"],
        endpoint=endpoint,
    )

    assert state.is_failed(), state
    summary = result_of(state)
    assert isinstance(summary, RunSummary)
    assert summary.success == 0 and summary.errors == 2 * len(PHOTOS)
    assert summary.errors_by_code == {"uploadFailed": 2 * len(PHOTOS)}
    assert summary.cost_usd == 0
    assert len(preprocess_tasks(recorder)) == 2 * len(PHOTOS)  # they were sent and failed
    frame = ledger_mod.read_ledger(job["ledger"])
    assert len(frame) == 2 * len(PHOTOS)
    assert set(frame["status"]) == {"error"}
    assert set(frame["error_code"]) == {"uploadFailed"}
    assert set(frame["error_parameter"]) == {"uploadEndpoint"}
    assert (frame["cost_usd"] == 0).all()
    assert frame["output_uri"].isna().all() and frame["guide_image_uuid"].isna().all()
    assert not frame["error_message"].str.contains("X-Amz-", regex=False).any()


# -- 6. a wrong API key --------------------------------------------------------------------


def test_wrong_api_key_every_row_is_invalid_api_key(
    s3: Any,
    job: dict[str, str],
    recorder: Recorder,
    endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong key (in a custom ``api_key_env``): every row is an ``invalidApiKey`` error,
    the run ends Failed saying so, nothing is written and nothing is charged."""
    caplog.set_level(logging.DEBUG)
    wrong = f"wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv("GF_TEST_OTHER_KEY", wrong)
    monkeypatch.setenv("RUNWARE_API_KEY", API_KEY)  # must not be used
    state = run_flow(
        manifest=job["manifest"],
        preprocessors=["canny", "mlsd"],
        output=job["output"],
        ledger=job["ledger"],
        endpoint=endpoint,
        api_key_env="GF_TEST_OTHER_KEY",
    )

    assert state.is_failed(), state
    assert "invalidApiKey" in (state.message or ""), state.message
    summary = result_of(state)
    assert isinstance(summary, RunSummary)
    assert summary.success == 0 and summary.errors_by_code == {"invalidApiKey": 2 * len(PHOTOS)}
    assert recorder.exchanges and all(e.status == 401 for e in recorder.exchanges)
    assert all(e.authorization == f"Bearer {wrong}" for e in recorder.exchanges)
    frame = ledger_mod.read_ledger(job["ledger"])
    assert len(frame) == 2 * len(PHOTOS)
    assert set(frame["status"]) == {"error"} and set(frame["error_code"]) == {"invalidApiKey"}
    assert (frame["cost_usd"] == 0).all()
    assert not s3.exists(job["output"].removeprefix("s3://"))
    assert wrong not in log_text(caplog)
    assert wrong not in " ".join(map(str, frame["error_message"]))


def test_missing_api_key_fails_the_run_before_any_request(
    s3: Any,
    job: dict[str, str],
    recorder: Recorder,
    endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No key in the ``api_key_env`` variable: the run fails at once naming the variable;
    no shard runs, nothing is sent, no ledger is written."""
    monkeypatch.delenv("GF_TEST_NO_SUCH_KEY", raising=False)
    state = run_flow(
        manifest=job["manifest"],
        preprocessors=["canny"],
        output=job["output"],
        ledger=job["ledger"],
        endpoint=endpoint,
        api_key_env="GF_TEST_NO_SUCH_KEY",
    )

    assert state.is_failed(), state
    assert "GF_TEST_NO_SUCH_KEY" in (state.message or ""), state.message
    assert recorder.exchanges == []
    assert ledger_blobs(s3, job["ledger"]) == []
