"""Fault injection (issue 6, R1): the pipeline survives a flaky service, exactly once.

Our real server (``tests/live_server.run_server``) runs with fault injection ON
(``ServerConfig(faults=FaultConfig(...))``, :mod:`engine.server.faults`), API-key auth ON
and loopback allowed; the moto S3 server (``tests/s3.py``) holds the manifests, outputs
(written by the server through presigned PUT) and ledgers, and the inputs of the outage
test (the 500 inputs of the 20 % test are local files, sent inline: a moto round trip per
input would double that test's time); an ephemeral Prefect API
(``prefect_test_harness``) runs the ``preprocess_manifest`` flow with the HTTP backend.

* The middleware itself: each fault kind answers what it says (first tests, one request).
* 20 % of ``POST /v1`` requests faulted (429 + Retry-After, 500, 502, 503, a delay past the
  client timeout, a connection dropped mid-body, truncated JSON, a failed upload PUT) over
  500 tiny images × canny + shuffle: every image ends with exactly one success row per
  preprocessor (re-runs are counted and reported: a per-task ``uploadFailed`` in an
  otherwise successful answer is final for the client), costs add up exactly, every
  output decodes, waits after a 429 were at least its Retry-After, and no API key or
  signature reaches a log or ledger.
* 100 % faults: the run ends Failed (listing the error codes) within its retry budget;
  the re-run at 0 % completes it with no duplicate.

The counts the lead's closing note needs are printed (``pytest -s``) as ``FAULTS ...``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from connectors import ledger as ledger_mod
from engine.server import create_app
from engine.server.faults import FAULT_KINDS, FaultConfig, FaultInjector
from flows.preprocess import RunSummary, build_config, flow_for
from guideflow.protocol import PreprocessTask
from tests.corpus import assert_no_secrets, capture_everything
from tests.live_server import Receiver, run_server, test_config

pytestmark = pytest.mark.timeout(300)

API_KEY = f"gf-fault-{uuid.uuid4().hex}"
PREPROCESSORS = ("canny", "shuffle")
PRICE = 0.0006  # includeCost of a canny-class guide image (guideflow.pricing default)
N_IMAGES = 500
RATE = 0.2
SEED = 6
RETRY_AFTER = 1  # seconds, sent with every injected 429
TIMEOUT_S = 3.0  # the pipeline client's per-request timeout
DELAY_S = 3.5  # the injected delay: past the client's timeout
BACKOFF_S = 0.05  # the client's first backoff (full jitter, doubling)
MAX_RETRIES = 5
#: "upload" applies only to requests holding preprocess tasks (about 1 in 6 here): weigh
#: it up so it is drawn a few times per run.
WEIGHTS = {**dict.fromkeys(FAULT_KINDS, 1.0), "upload": 3.0}
THIRD_PARTY_LOGGERS = ("werkzeug", "moto")  # moto logs the presigned URLs it is sent
#: Codes a task may end with when the client gave up on a transient failure.
TRANSIENT_CODES = {
    "rateLimitExceeded",
    "internalError",
    "serviceUnavailable",
    "serverError",
    "requestTimeout",
    "connectionError",
    "invalidResponse",
    "uploadFailed",
}


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


def chaos_config(rate: float, **kw: Any) -> FaultConfig:
    return FaultConfig(
        rate=rate,
        weights=kw.pop("weights", WEIGHTS),
        seed=kw.pop("seed", SEED),
        retry_after=RETRY_AFTER,
        delay_s=kw.pop("delay_s", DELAY_S),
        **kw,
    )


@pytest.fixture(scope="module")
def chaos(s3: Any) -> Iterator[tuple[str, FaultInjector]]:
    """Our server with auth ON, loopback allowed and fault injection (rate set per test)."""
    config = test_config(no_auth=False, api_keys=(API_KEY,), faults=chaos_config(0.0))
    app = create_app(config)
    with run_server(app=app) as base_url:
        yield base_url, app.state.faults


@pytest.fixture()
def injector(chaos: tuple[str, FaultInjector]) -> Iterator[FaultInjector]:
    """The server's injector (fresh counters, faults off after the test)."""
    inj = chaos[1]
    inj.counts = dict.fromkeys(FAULT_KINDS, 0)
    inj.requests = inj.upload_tasks_failed = inj.retry_checked = inj.retry_violations = 0
    inj.retry_min_gap = None
    yield inj
    inj.configure(chaos_config(0.0))


@pytest.fixture()
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RUNWARE_API_KEY", API_KEY)
    return API_KEY


# -- helpers -------------------------------------------------------------------------------


def tiny_png(rng: np.random.Generator) -> tuple[bytes, tuple[int, int]]:
    """A 32-64 px PNG with a few filled shapes (edges for canny); (bytes, (h, w))."""
    h, w = (int(v) for v in rng.integers(32, 65, size=2))
    img = np.full((h, w, 3), rng.integers(0, 256, size=3), dtype=np.uint8)
    for _ in range(3):
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, size=2))
        cv2.rectangle(img, (x0, y0), (x1 + 4, y1 + 4), color, thickness=-1)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes(), (h, w)


def make_job(
    s3: Any, bucket: str, n: int, seed: int, local_inputs: Path | None = None
) -> dict[str, Any]:
    """``n`` tiny PNGs in ``<bucket>/in/`` (or the directory ``local_inputs``: then the
    pipeline sends them inline, in ``imageUpload`` tasks) and a CSV manifest of them in
    the bucket; the job's URLs. Outputs and the ledger go to the bucket."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, tuple[int, int]] = {}
    blobs: dict[str, bytes] = {}
    rows = []
    for i in range(n):
        image_id = f"img{i:04d}"
        data, sizes[image_id] = tiny_png(rng)
        if local_inputs is not None:
            uri = str(local_inputs / f"{image_id}.png")
            Path(uri).write_bytes(data)
        else:
            uri = f"{bucket}/in/{image_id}.png"
            blobs[uri.removeprefix("s3://")] = data
        rows.append({"id": image_id, "image": uri})
    if blobs:
        s3.pipe(blobs)
    manifest = f"{bucket}/manifests/batch.csv"
    s3.pipe(manifest.removeprefix("s3://"), pd.DataFrame(rows).to_csv(index=False).encode())
    return {
        "manifest": manifest,
        "output": f"{bucket}/out",
        "ledger": f"{bucket}/ledger",
        "sizes": sizes,
    }


def run_flow(**params: Any) -> Any:
    """Run the flow the way the CLI does, with the HTTP backend and a small retry budget."""
    params = {
        "backend": "http",
        "preprocessors": list(PREPROCESSORS),
        "shard_size": 100,
        "max_shards_in_flight": 2,
        "concurrency": 4,
        "batch_size": 10,
        "request_timeout_s": TIMEOUT_S,
        "max_retries": MAX_RETRIES,
        "retry_backoff_s": BACKOFF_S,
        **params,
    }
    config = build_config(**dict(params))
    return asyncio.run(flow_for(config)(**params, return_state=True))


def summary_of(state: Any) -> RunSummary:
    result = state.result(raise_on_failure=False)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    assert isinstance(result, RunSummary), (state, result)
    return result


def ledger_blobs(s3: Any, ledger: str) -> list[bytes]:
    s3.invalidate_cache()
    root = ledger.removeprefix("s3://")
    return [s3.cat(p) for p in sorted(s3.find(root)) if p.endswith(".parquet")]


@contextlib.contextmanager
def everything_logged() -> Iterator[list[str]]:
    """:func:`tests.corpus.capture_everything` (every logger at DEBUG, minus moto's), with
    the handlers already installed (Prefect's console, pytest's capture) held at WARNING
    meanwhile: formatting ~10⁵ DEBUG records through them would cost more than the run."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}
    saved = [(h, h.level) for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, logging.WARNING))
    try:
        with capture_everything(exclude=THIRD_PARTY_LOGGERS) as lines:
            yield lines
    finally:
        for h, level in saved:
            h.setLevel(level)


def client_retries(lines: list[str]) -> Counter[str]:
    """The client's retries, from its log lines: POST retries by the error that caused
    them, plus ``taskResend``: tasks re-sent after a transient per-task error."""
    text = "\n".join(lines)
    found = Counter(re.findall(r"Runware request failed \((\w+)\); retry", text))
    resent = sum(int(n) for n in re.findall(r"re-sending (\d+) task\(s\)", text))
    if resent:
        found["taskResend"] = resent
    return found


def check_outputs(s3: Any, job: dict[str, Any]) -> int:
    """Every output object exists exactly once, decodes, and has its input's size."""
    s3.invalidate_cache()
    root = job["output"].removeprefix("s3://")
    keys = sorted(k for k in s3.find(root) if not k.startswith(f"{root}/_contact_sheets/"))
    expected = sorted(f"{root}/{p}/{i}.png" for i in job["sizes"] for p in PREPROCESSORS)
    assert keys == expected
    for key, data in s3.cat(keys).items():
        with Image.open(io.BytesIO(data)) as im:
            pixels = np.asarray(im.convert("RGB"))
        image_id = key.rsplit("/", 1)[1].removesuffix(".png")
        assert pixels.shape == (*job["sizes"][image_id], 3), key
    return len(keys)


def check_ledger(job: dict[str, Any]) -> pd.DataFrame:
    """Exactly one success per (image, preprocessor), priced exactly; the success rows."""
    frame = ledger_mod.read_ledger(job["ledger"])
    ok = frame[frame["status"] == "success"]
    expected = sorted((i, p) for i in job["sizes"] for p in PREPROCESSORS)
    assert sorted(zip(ok["image_id"], ok["preprocessor"], strict=True)) == expected
    assert ledger_mod.duplicate_successes(job["ledger"]).empty
    assert (ok["cost_usd"] == PRICE).all()  # each row the server's includeCost, exactly
    assert ok["cost_usd"].sum() == pytest.approx(PRICE * len(expected), rel=1e-12, abs=0)
    assert ok["guide_image_uuid"].is_unique
    return ok


# -- 1. the middleware, one fault at a time -----------------------------------------------


def _one_task(upload_endpoint: str | None = None) -> PreprocessTask:
    png, _ = tiny_png(np.random.default_rng(0))
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return PreprocessTask.build("canny", uri, uploadEndpoint=upload_endpoint)


def _post(base: str, tasks: list[PreprocessTask], timeout: float = 10.0) -> httpx.Response:
    return httpx.post(
        f"{base}/v1",
        json=[t.wire() for t in tasks],
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=timeout,
    )


def test_each_fault_kind_answers_as_documented(
    chaos: tuple[str, FaultInjector], injector: FaultInjector
) -> None:
    """At rate 1 with one kind at a time: the status, headers and body each kind promises;
    the request-level faults run nothing, the others leave the work done (a retry of the
    same task is answered from the stored job)."""
    base = chaos[0]

    def only(kind: str, **kw: Any) -> None:
        injector.configure(chaos_config(1.0, weights={kind: 1.0}, **kw))

    for kind, code in (("429", "rateLimitExceeded"), ("500", "internalError")):
        only(kind)
        task = _one_task()
        r = _post(base, [task])
        assert r.status_code == int(kind)
        assert [e["code"] for e in r.json()["errors"]] == [code]
        assert r.json()["errors"][0]["taskUUID"] == task.taskUUID
        assert (r.headers.get("retry-after") == str(RETRY_AFTER)) is (kind == "429")
    only("503")
    assert _post(base, [_one_task()]).json()["errors"][0]["code"] == "serviceUnavailable"
    only("502")
    r = _post(base, [_one_task()])
    assert r.status_code == 502 and r.headers["content-type"] == "text/html"

    clean = chaos_config(0.0)
    only("truncate")
    task = _one_task()
    r = _post(base, [task])
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.content)
    injector.configure(clean)
    replayed = _post(base, [task]).json()["data"][0]  # the work was done: replayed
    assert replayed["taskUUID"] == task.taskUUID
    assert replayed["guideImageUUID"].encode() in r.content  # the same answer, cut

    only("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        _post(base, [_one_task()])

    only("delay", delay_s=0.5)
    task = _one_task()
    with pytest.raises(httpx.ReadTimeout):
        _post(base, [task], timeout=0.2)
    injector.configure(clean)
    again = _post(base, [task])  # joins the delayed request's job or replays its result
    assert again.status_code == 200 and again.json()["data"][0]["taskUUID"] == task.taskUUID

    # upload: one task of the batch fails uploadFailed (a real refused PUT); its sibling not
    only("upload")
    with Receiver() as sink:  # answers 200 to every PUT
        pair = [_one_task(f"{sink.url}/a.png"), _one_task(f"{sink.url}/b.png")]
        r = _post(base, pair)
        assert len(sink.writes()) == 1  # the other PUT never reached it
    body = r.json()
    assert r.status_code == 200, body
    assert len(body["data"]) == 1 and [e["code"] for e in body["errors"]] == ["uploadFailed"]
    assert body["errors"][0]["parameter"] == "uploadEndpoint"
    assert {body["data"][0]["taskUUID"], body["errors"][0]["taskUUID"]} == {
        t.taskUUID for t in pair
    }

    stats = httpx.get(f"{base}/faults/stats").json()
    assert stats["faults"] == {
        "429": 1,
        "500": 1,
        "502": 1,
        "503": 1,
        "delay": 1,
        "drop": 1,
        "truncate": 1,
        "upload": 1,
    }
    assert stats["uploadTasksFailed"] == 1


def test_oversized_bodies_pass_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body arriving in parts past the inspection cap reaches the app whole, in order,
    and is never faulted (ASGI level: the parts are what a server's ``receive`` yields)."""
    from engine.server import faults

    monkeypatch.setattr(faults, "MAX_INSPECTED_BYTES", 1000)
    parts = [b"[" + b" " * 699, b" " * 700, b" " * 700, b"]"]
    got: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        got.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def call() -> list[dict[str, Any]]:
        last = len(parts) - 1
        queue = [
            {"type": "http.request", "body": p, "more_body": i < last} for i, p in enumerate(parts)
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1", "headers": []}
        await middleware(scope, receive, send)
        return sent

    injector = FaultInjector(FaultConfig(rate=1.0, weights={"500": 1.0}))
    middleware = faults.FaultMiddleware(app, injector)
    sent = asyncio.run(call())
    injector.close()
    assert got == [b"".join(parts)]
    assert sent[0]["status"] == 200 and injector.stats()["faulted"] == 0


def test_faults_are_off_by_default_and_validated() -> None:
    """No middleware, no ``/faults/stats`` unless configured; bad settings are refused."""
    app = create_app(test_config())
    assert not hasattr(app.state, "faults")
    with run_server(app=app) as base:
        assert httpx.get(f"{base}/faults/stats").status_code == 404
    for bad in ({"rate": 1.5}, {"weights": {"teapot": 1}}, {"weights": {"429": 0}}, {"x": 1}):
        with pytest.raises(ValueError):
            FaultConfig.from_mapping(bad)
    parsed = FaultConfig.from_json('{"rate": 0.3, "seed": 9, "weights": {"drop": 2}}')
    assert (parsed.rate, parsed.seed, dict(parsed.weights)) == (0.3, 9, {"drop": 2.0})
    with pytest.raises(ValueError):
        FaultConfig.from_mapping({"rate": "high", "weights": [1]})


def test_cli_serve_fault_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """``guideflow serve --faults JSON --fault-rate R`` builds the app with faults on (the
    flag overriding the JSON's rate); bad settings exit 2; without them, faults are off."""
    from typer.testing import CliRunner

    from guideflow.cli import app

    served: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda application, **kw: served.append(application))
    runner = CliRunner()
    flags = ["serve", "--no-auth", "--faults", '{"rate": 0.5, "seed": 3, "retry_after": 2}']
    result = runner.invoke(app, [*flags, "--fault-rate", "0.25"])
    assert result.exit_code == 0, result.output
    config = served[-1].state.faults.config
    assert (config.rate, config.seed, config.retry_after) == (0.25, 3, 2)
    assert runner.invoke(app, ["serve", "--no-auth"]).exit_code == 0
    assert not hasattr(served[-1].state, "faults")
    for bad in (["--fault-rate", "1.5"], ["--faults", "[1]"], ["--faults", '{"rate": 2}']):
        result = runner.invoke(app, ["serve", "--no-auth", *bad])
        assert result.exit_code == 2, (bad, result.output)


def test_draws_are_repeatable_for_a_seed() -> None:
    """The same seed gives the same sequence of decisions, at the configured rate."""

    def draws(seed: int) -> list[str | None]:
        inj = FaultInjector(FaultConfig(rate=RATE, seed=seed))
        try:
            return [inj.draw(set(FAULT_KINDS)) for _ in range(2000)]
        finally:
            inj.close()

    first = draws(1)
    assert first == draws(1) and first != draws(2)
    faulted = sum(d is not None for d in first)
    assert 0.15 < faulted / len(first) < 0.25
    assert set(first) == {None, *FAULT_KINDS}
    assert draws(3).count("upload") > 0
    inj = FaultInjector(FaultConfig(rate=1.0, weights={"upload": 1.0, "drop": 1.0}))
    assert {inj.draw({"drop", "429"}) for _ in range(50)} == {"drop"}  # upload not applicable
    inj.close()


# -- 2. 20 % faults over 500 images -----------------------------------------------------


def test_pipeline_survives_20_percent_faults(
    s3: Any,
    s3_bucket: str,
    chaos: tuple[str, FaultInjector],
    injector: FaultInjector,
    prefect_api: None,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """500 images × canny + shuffle against a server faulting 20 % of requests: exactly one
    success per image and preprocessor, exact cost, decodable outputs, Retry-After
    honoured, no secret in any log line or ledger file. Runs again (same fault rate) while
    some rows are errors, at most three times, and reports how many rows needed it."""
    clock = [time.monotonic()]
    job = make_job(s3, s3_bucket, N_IMAGES, seed=SEED, local_inputs=tmp_path)
    clock.append(time.monotonic())
    params = {
        "manifest": job["manifest"],
        "output": job["output"],
        "ledger": job["ledger"],
        "endpoint": f"{chaos[0]}/v1",
    }
    injector.configure(chaos_config(RATE))
    runs: list[RunSummary] = []
    with everything_logged() as lines:
        for _ in range(4):
            state = run_flow(**params)
            summary = summary_of(state)
            runs.append(summary)
            assert state.is_completed() or not summary.success, state
            assert set(summary.errors_by_code) <= TRANSIENT_CODES, summary.errors_by_code
            if not summary.errors:
                break
        stats = injector.stats()
        retries = client_retries(lines)
        injector.configure(chaos_config(0.0))
    first = runs[0]
    clock.append(time.monotonic())

    # -- every image: one success per preprocessor (over the runs), exact cost
    assert sum(r.success for r in runs) == 2 * N_IMAGES
    assert runs[-1].errors == 0, [r.errors_by_code for r in runs]
    ok = check_ledger(job)
    assert len(ok) == 2 * N_IMAGES
    assert sum(r.cost_usd for r in runs) == pytest.approx(PRICE * 2 * N_IMAGES, rel=1e-12)
    outputs = check_outputs(s3, job)
    clock.append(time.monotonic())

    # -- the faults really happened, every kind, at about the configured rate
    assert all(stats["faults"][k] > 0 for k in FAULT_KINDS), stats
    assert 0.1 < stats["faulted"] / stats["requests"] < 0.3, stats
    assert sum(retries.values()) > 0
    # A failed upload PUT is final for the client (a per-task uploadFailed in a 200 carries
    # nothing that says "transient"), so those rows need the re-run. Every request-level
    # fault is retried in place: a row fails only when one POST drew a fault on each of
    # its 1 + MAX_RETRIES attempts (p = 0.2**6 per POST); without retries ~20 % would.
    upload_rows = first.errors_by_code.get("uploadFailed", 0)
    assert upload_rows <= stats["uploadTasksFailed"]
    assert first.errors - upload_rows <= 20, first.errors_by_code

    # -- Retry-After: every task re-sent after an injected 429 waited at least that long
    waits = stats["retryAfter"]
    assert waits["checked"] > 0 and waits["violations"] == 0, waits
    assert waits["minGapS"] >= RETRY_AFTER

    # -- no API key, no presigned signature, in any log line or ledger file
    checked = assert_no_secrets(lines, [API_KEY, "X-Amz-Signature"])
    clock.append(time.monotonic())
    blobs = ledger_blobs(s3, job["ledger"])
    assert blobs and not any(API_KEY.encode() in b or b"X-Amz-Signature" in b for b in blobs)

    with capsys.disabled():
        print(
            f"\nFAULTS 20%: {N_IMAGES} images x {len(PREPROCESSORS)} preprocessors; "
            f"{stats['requests']} POST /v1, {stats['faulted']} faulted "
            f"({stats['faulted'] / stats['requests']:.1%}): {stats['faults']}; "
            f"upload tasks failed {stats['uploadTasksFailed']}; "
            f"client retries {sum(retries.values())} {dict(retries)}; "
            f"Retry-After checked {waits['checked']} (min gap {waits['minGapS']:.3f} s, "
            f"violations 0); rows needing a re-run {first.errors}; runs {len(runs)} "
            f"(errors per run {[r.errors_by_code for r in runs]}); "
            f"successes {len(ok)}, outputs {outputs}, "
            f"duplicates 0; cost ${ok['cost_usd'].sum():.4f}; "
            f"run times {[round(r.elapsed_s, 1) for r in runs]} s; {checked} log lines clean; "
            f"phases (inputs, runs, ledger+outputs, secrets) "
            f"{[round(b - a, 1) for a, b in itertools.pairwise(clock)]} s"
        )


# -- 3. a total outage, then recovery ------------------------------------------------------


def test_total_outage_fails_within_budget_then_rerun_completes(
    s3: Any,
    s3_bucket: str,
    chaos: tuple[str, FaultInjector],
    injector: FaultInjector,
    prefect_api: None,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every request faulted: the run ends Failed, its message listing the error codes,
    after each request spent its retries (no hang: the module's timeout bounds it); at 0 %
    the re-run makes exactly the missing guide images, with no duplicate."""
    n = 20
    job = make_job(s3, s3_bucket, n, seed=SEED + 1)
    params = {
        "manifest": job["manifest"],
        "output": job["output"],
        "ledger": job["ledger"],
        "endpoint": f"{chaos[0]}/v1",
        "shard_size": 10,
    }
    injector.configure(chaos_config(1.0))
    with everything_logged() as lines:
        failed = run_flow(**params)
        outage = injector.stats()
        retries = client_retries(lines)
        injector.configure(chaos_config(0.0))
        recovered = run_flow(**params)

    assert failed.is_failed(), failed
    bad = summary_of(failed)
    assert bad.success == 0 and bad.errors == 2 * n and bad.cost_usd == 0
    assert set(bad.errors_by_code) <= TRANSIENT_CODES, bad.errors_by_code
    assert (failed.message or "").startswith("every item failed")
    for code in bad.errors_by_code:
        assert code in failed.message
    # every request was faulted and retried to the end of its budget: each image's upload
    # POST went 1 + MAX_RETRIES times (none got far enough to send a preprocess task)
    assert outage["requests"] == outage["faulted"] == n * (1 + MAX_RETRIES), outage
    assert sum(retries.values()) == n * MAX_RETRIES

    assert recovered.is_completed() and recovered.name == "Completed", recovered
    good = summary_of(recovered)
    assert (good.success, good.errors, good.already_done) == (2 * n, 0, 0)
    ok = check_ledger(job)
    frame = ledger_mod.read_ledger(job["ledger"])
    assert len(frame) == 4 * n and (frame["status"] == "error").sum() == 2 * n
    assert (frame.loc[frame["status"] == "error", "cost_usd"] == 0).all()
    check_outputs(s3, job)
    assert_no_secrets(lines, [API_KEY, "X-Amz-Signature"])
    assert not any(API_KEY.encode() in b for b in ledger_blobs(s3, job["ledger"]))

    with capsys.disabled():
        print(
            f"\nFAULTS 100% then 0%: {n} images; outage run Failed in {bad.elapsed_s:.1f} s "
            f"({failed.message}); {outage['requests']} POST /v1 all faulted "
            f"{outage['faults']}; client retries {dict(retries)}; re-run at 0%: "
            f"{good.success} made in {good.elapsed_s:.1f} s, {len(ok)} successes, duplicates 0"
        )
