"""The pipeline's per-row fast paths give exactly what the slow paths gave.

bench/pipeline.py found the HTTP pipeline spending most of its time per row on work whose
result rarely changes (validating and hashing the same settings, finding the same
filesystem, escaping ids that need no escaping, deep-copying ledger rows, re-sorting the
done index). Each fast path below is checked against the computation it replaces.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import random
import string
import sys
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

import fsspec.core
import numpy as np
import pyarrow.parquet as pq
import pytest

from connectors import ledger, runware, storage
from connectors.ledger import DoneIndex, LedgerRow, rows_to_table, settings_hash
from connectors.manifest import ManifestRow, ManifestSpec
from engine import registry
from guideflow import protocol
from guideflow.errors import GuideflowError, InvalidParameter
from guideflow.pricing import PriceTable
from guideflow.protocol import (
    ErrorObject,
    PreprocessTask,
    TaskTemplate,
    new_task_uuid,
    stable_task_uuid,
)
from tasks import work
from tasks.work import RunConfig, make_item


def config(**overrides: Any) -> RunConfig:
    return RunConfig(
        manifest=ManifestSpec(url="memory://unused.csv"),
        preprocessors=("canny",),
        output="s3://bucket/out",
        ledger="memory://ledger",
        **overrides,
    )


def uncached_hash(name: str, settings: dict[str, Any], cfg: RunConfig) -> str:
    """What make_item hashed before it was memoised."""
    return settings_hash(
        name,
        {
            **settings,
            "width": cfg.width,
            "height": cfg.height,
            "outputFormat": cfg.output_format,
            "outputQuality": cfg.output_quality,
        },
    )


@pytest.fixture(autouse=True)
def empty_cache() -> None:
    work._checked_cache.clear()


def test_memoised_settings_keep_their_types_apart() -> None:
    """1, 1.0 and True are equal in Python but not as settings: each is checked on its own."""
    cfg = config()
    for value in (100, 100.0, 100, 100.0):
        row = ManifestRow(
            row=0, image="s3://b/x.png", id="x", settings={"lowThresholdCanny": value}
        )
        item = make_item(row, "canny", 0, cfg)
        assert item.settings_hash == uncached_hash("canny", {"lowThresholdCanny": value}, cfg)
    assert len(work._checked_cache) == 2
    # 1 is valid and now cached; True == 1 must not ride on that entry.
    make_item(
        ManifestRow(row=0, image="s3://b/x", id="x", settings={"lowThresholdCanny": 1}),
        "canny",
        0,
        cfg,
    )
    with pytest.raises(InvalidParameter):
        registry.get("canny").validate({"lowThresholdCanny": True})
    with pytest.raises(InvalidParameter):
        make_item(
            ManifestRow(row=0, image="s3://b/x", id="x", settings={"lowThresholdCanny": True}),
            "canny",
            0,
            cfg,
        )


def test_invalid_settings_are_never_remembered() -> None:
    row = ManifestRow(row=0, image="s3://b/x.png", id="x", settings={"lowThresholdCanny": 999})
    for _ in range(2):
        with pytest.raises(InvalidParameter) as err:
            make_item(row, "canny", 0, config())
        assert err.value.parameter == "lowThresholdCanny"
    assert not work._checked_cache


def test_reregistering_a_preprocessor_invalidates_its_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    row = ManifestRow(row=0, image="s3://b/x.png", id="x", settings={"lowThresholdCanny": 10})
    make_item(row, "canny", 0, config())
    stricter = registry.get("canny")

    class Refusing(type(stricter)):  # type: ignore[misc]
        def validate(self, raw: Any) -> dict[str, Any]:
            raise InvalidParameter("refused", parameter="lowThresholdCanny")

    monkeypatch.setattr(registry, "get", lambda name: Refusing())
    with pytest.raises(InvalidParameter, match="refused"):
        make_item(row, "canny", 0, config())


def test_list_values_are_checked_every_time() -> None:
    settings = {"lowThresholdCanny": [1]}
    row = ManifestRow(row=0, image="s3://b/x.png", id="x", settings=settings)
    with pytest.raises(InvalidParameter):
        make_item(row, "canny", 0, config())
    assert not work._checked_cache


def test_dimensions_are_validated_through_the_cache() -> None:
    for _ in range(2):
        item = make_item(ManifestRow(row=0, image="s3://b/x", id="x"), "canny", 0, config(width=64))
        assert item.width == 64
    with pytest.raises(InvalidParameter):
        make_item(
            ManifestRow(row=0, image="s3://b/x", id="x", settings={"width": 0}),
            "canny",
            0,
            config(),
        )


def test_rows_to_table_matches_dataclass_asdict() -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    rows = [
        LedgerRow(
            run_id="r",
            shard=1,
            row=i,
            image_id=f"id{i}",
            input_uri="s3://b/in.png",
            status="success" if i % 2 else "error",
            error_code=None if i % 2 else "invalidParameter",
            cost_usd=0.0006 * i,
            started_at=now,
            finished_at=now.replace(tzinfo=None),  # naive: taken as UTC
        )
        for i in range(5)
    ]
    table = rows_to_table(iter(rows))  # any iterable, including a one-shot generator
    expected = [{k: ledger._utc(v) for k, v in dataclasses.asdict(row).items()} for row in rows]
    assert table.to_pylist() == expected


def test_done_index_with_pending_keys_behaves_like_a_plain_sorted_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ledger, "PENDING_MERGE", 700)
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 2**63, 20_000, dtype=np.uint64).astype(np.uint64)
    index = DoneIndex(keys[:5_000].copy())
    reference = set(keys[:5_000].tolist())
    for start in range(5_000, 15_000, 500):
        batch = np.concatenate([keys[start : start + 500], keys[:20]])  # repeats too
        index.add(batch.copy())
        reference.update(batch.tolist())
        assert len(index) == len(reference)
    probe = keys[::3]
    assert index.contains(probe).tolist() == [k in reference for k in probe.tolist()]
    assert index.nbytes == 8 * len(reference)


def test_done_index_add_leaves_the_callers_array_alone() -> None:
    index = DoneIndex(np.array([5, 1], dtype=np.uint64))
    new = np.array([9, 3, 7], dtype=np.uint64)
    index.add(new)
    assert new.tolist() == [9, 3, 7]
    assert index.contains(np.array([1, 3, 5, 7, 9, 4], dtype=np.uint64)).tolist() == [
        True,
        True,
        True,
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(
    "url",
    ["s3://b/k", "S3://b/k", "s3a://b/k", " s3://b/k", "memory://x", "/tmp/s3:x", "s3", "", "x:y"],
)
def test_is_s3_fast_path_agrees_with_urlsplit(url: str) -> None:
    assert storage.is_s3(url) == (urlsplit(url).scheme.lower() in {"s3", "s3a"})


@pytest.mark.parametrize(
    "url",
    ["memory://a/b.png", "memory:///a/b", "file:///tmp/x/y.png", "/tmp/x/y.png", "rel/p.png"],
)
def test_plain_filesystems_resolve_like_fsspec(url: str) -> None:
    fs, path = storage._plain_resolve(url)  # type: ignore[misc]
    expected_fs, expected_path = fsspec.core.url_to_fs(url)
    # The same kind of filesystem with the same options, not necessarily the same object:
    # fsspec caches one instance per thread, and the memo may have been filled in another.
    assert type(fs) is type(expected_fs)
    assert fs.storage_options == expected_fs.storage_options
    assert path == expected_path


@pytest.mark.parametrize("url", ["s3://b/k", "simplecache::memory://a", "data:,x", "gs://b/k"])
def test_other_urls_are_left_to_fsspec(url: str) -> None:
    assert storage._plain_resolve(url) is None


def test_key_segments_escape_exactly_as_quote() -> None:
    rng = random.Random(3)
    alphabet = string.ascii_letters + string.digits + "_.~!*'()-/%é :?#"
    for _ in range(5_000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        if value in (".", ".."):
            continue
        assert storage._key_segment(value, "x") == quote(value, safe=storage._KEY_SAFE)


# -- task templates, UUIDs, output names, ledger tables, result parsing -----------------------


@pytest.mark.parametrize("form", ["new", "legacy"])
@pytest.mark.parametrize("upload", [None, "https://b.s3.amazonaws.com/o.png?X-Amz-Signature=1"])
def test_stamped_tasks_are_the_tasks_build_would_make(form: str, upload: str | None) -> None:
    settings = {"lowThresholdCanny": 50, "highThresholdCanny": 120}
    fields: dict[str, Any] = {"width": 512, "outputType": "URL", "outputFormat": "PNG"}
    fields["includeCost"] = True
    template = TaskTemplate.build("canny", form=form, settings=settings, **fields)
    for image in ("https://in/x.png?sig=1", "data:image/png;base64,AAAA"):
        uuid_ = new_task_uuid()
        stamped = template.stamp(uuid_, image, upload)
        extra = {"uploadEndpoint": upload} if upload else {}
        built = PreprocessTask.build(
            "canny", image, form=form, settings=settings, task_uuid=uuid_, **fields, **extra
        )
        assert stamped.wire() == built.wire()
        assert PreprocessTask.model_validate(stamped.wire()).wire() == built.wire()
        assert (stamped.taskUUID, stamped.deliveryMethod) == (uuid_, "sync")


def test_stamped_tasks_share_nothing_and_refuse_bad_values() -> None:
    template = TaskTemplate.build("canny", settings={"lowThresholdCanny": 50})
    a = template.stamp(new_task_uuid(), "https://in/a.png")
    b = template.stamp(new_task_uuid(), "https://in/b.png")
    a.wire()["settings"]["lowThresholdCanny"] = 1
    a.wire()["inputs"]["image"] = "changed"
    assert b.wire()["settings"] == {"lowThresholdCanny": 50}
    assert b.wire()["inputs"] == {"image": "https://in/b.png"}
    for bad in ("not-a-uuid", str(uuid.uuid1()), str(uuid.uuid4()).upper(), "0" * 36):
        with pytest.raises(ValueError, match="UUID v4"):
            template.stamp(bad, "https://in/a.png")
    with pytest.raises(ValueError, match="image"):
        template.stamp(new_task_uuid(), "")


def test_task_uuids_are_canonical_version_4() -> None:
    for _ in range(2_000):
        raw = os.urandom(16)
        assert protocol._uuid4_text(raw) == str(uuid.UUID(bytes=raw, version=4))
    made = new_task_uuid()
    assert uuid.UUID(made).version == 4 and str(uuid.UUID(made)) == made
    digest = hashlib.sha256(b"a\x1fb").digest()[:16]
    assert stable_task_uuid("a", "b") == str(uuid.UUID(bytes=digest, version=4))


@pytest.mark.parametrize(
    "template",
    [
        "{prefix}/{preprocessor}/{image_id}.{ext}",
        "{prefix}/{image_id}/{preprocessor}.{ext}",
        "{prefix}/{image_id}-{image_id}.{ext}",  # the id twice: formatted every time
        "{image_id}.{ext}",
    ],
)
@pytest.mark.parametrize("prefix", ["s3://b/out", "", "memory://x/%00y"])
def test_output_namer_names_exactly_as_output_key(template: str, prefix: str) -> None:
    rng = random.Random(11)
    alphabet = string.ascii_letters + string.digits + "_.~!*'()-/%é :?#"
    namer = storage.output_namer(template, prefix=prefix, preprocessor="lineart_anime", ext="png")
    ids = ["img1", "a/b/c.png", ".", "..", "x/../y", "é"]
    ids += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(500)]
    for image_id in ids:
        try:
            expected = storage.output_key(
                template, prefix=prefix, preprocessor="lineart_anime", image_id=image_id, ext="png"
            )
        except ValueError:
            with pytest.raises(ValueError):
                namer(image_id)
            continue
        assert namer(image_id) == expected


def test_ledger_table_records_every_kind_of_outcome() -> None:
    cfg = config()
    good = ManifestRow(row=3, image="s3://in/a.png", id="a", settings={"lowThresholdCanny": 10})
    item = make_item(good, "canny", 2, cfg)
    bad_row = ManifestRow(row=4, image=None, id="b", settings={"x": 1})
    started = 1_767_323_045.5
    outcomes = [
        work.Outcome(
            status="success",
            item=item,
            task_uuid="sent-uuid",
            guide_image_uuid="g",
            cost_usd=0.0006,
            latency_ms=12.5,
            started_at=started,
            finished_at=started + 0.25,
            method="m",
            variant="v",
        ),
        work.Outcome.failed(
            item,
            ErrorObject(code="timeout", message="took too long"),
            started=started,
            attempts=3,
        ),
        work.Outcome(
            status="error",
            row=bad_row,
            preprocessor="canny",
            error=ErrorObject(code="missingImage", message="no URI", parameter="image"),
            attempts=0,
            started_at=started,
            finished_at=started,
        ),
    ]
    table = work.ledger_table(outcomes, "run1", 2, "http")
    assert table.schema == ledger.LEDGER_SCHEMA
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["success", "error", "error"]
    assert {r["run_id"] for r in rows} == {"run1"} and {r["shard"] for r in rows} == {2}
    assert {r["backend"] for r in rows} == {"http"}
    first, second, third = rows
    assert first["task_uuid"] == "sent-uuid"
    assert second["task_uuid"] == item.task_uuid  # none sent: the item's own
    assert first["output_uri"] == item.output_uri and second["output_uri"] is None
    assert first["settings_json"] == '{"lowThresholdCanny": 10}'
    assert first["settings_hash"] == item.settings_hash
    assert first["started_at"] == dt.datetime.fromtimestamp(started, dt.UTC)
    assert first["finished_at"] == dt.datetime.fromtimestamp(started + 0.25, dt.UTC)
    assert (first["cost_usd"], first["latency_ms"], first["method"]) == (0.0006, 12.5, "m")
    assert (second["error_code"], second["attempts"]) == ("timeout", 3)
    assert (third["row"], third["image_id"], third["input_uri"]) == (4, "b", "")
    assert (third["error_code"], third["error_parameter"]) == ("missingImage", "image")
    assert third["settings_json"] == '{"x": 1}' and third["settings_hash"] == ""
    assert work.ledger_table([], "run1", 2, "http").num_rows == 0


def test_only_values_that_can_hold_secrets_are_rewritten(tmp_path: Any) -> None:
    rows = [
        LedgerRow(run_id="r", shard=0, row=0, image_id="a", status="success", **kw)
        for kw in (
            {"input_uri": "s3://b/in/a.png", "output_uri": "s3://b/out/a.png"},
            {"input_uri": "https://u:p@h/a.png?X-Amz-Signature=s#f", "output_uri": None},
            {"input_uri": "DATA:image/png;base64,AAAA", "error_message": "see https://h/x?sig=1"},
            {"input_uri": "/local/path.png", "error_message": "plain text"},
        )
    ]
    written = ledger.LedgerWriter(str(tmp_path)).write_shard("r", 0, rows)
    got = pq.read_table(written).to_pylist()
    assert [r["input_uri"] for r in got] == [
        "s3://b/in/a.png",
        "https://h/a.png",
        "data:image/png;base64,<26 chars omitted>",
        "/local/path.png",
    ]
    assert [r["error_message"] for r in got] == [None, None, "see https://h/x", "plain text"]
    assert got[0]["output_uri"] == "s3://b/out/a.png"


def test_result_items_parse_together_or_one_by_one() -> None:
    good = {"taskUUID": new_task_uuid(), "guideImageURL": "https://x/g.png", "cost": 0.1}
    done = {"taskUUID": new_task_uuid(), "status": "COMPLETED", "guideImageUUID": "g"}
    broken = {"taskUUID": new_task_uuid(), "cost": "not a number"}
    items = [good, {"no": "uuid"}, "text", done, broken]
    parsed = runware.parse_preprocess_items(items)
    assert [r.taskUUID for r in parsed] == [good["taskUUID"], done["taskUUID"]]
    assert parsed[1].status == "success" and parsed[0].cost == 0.1
    assert [r.taskUUID for r in runware.parse_preprocess_items([good, done])] == [
        good["taskUUID"],
        done["taskUUID"],
    ]
    assert runware.parse_preprocess_item(broken) is None


def test_prices_are_memoised_per_spelling() -> None:
    prices = PriceTable(preprocessors={"openpose": 0.002})
    assert prices.price("openpose") == prices.price("runware:controlnet-preprocess@openpose")
    assert prices.price("depth") == 0.0013 and prices.price("canny") == 0.0006
    with pytest.raises(GuideflowError):
        prices.price("nope")
    assert prices.price("openpose") == 0.002


def test_freed_heap_is_handed_back_where_glibc_allows() -> None:
    """glibc's malloc_trim is found and called on glibc Linux; elsewhere it is a no-op."""
    import platform

    from guideflow.memory import release_free_heap

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert release_free_heap() is glibc


@pytest.mark.parametrize(("chosen", "switched"), [(None, True), ("mimalloc", False)])
def test_pyarrow_allocates_with_malloc_unless_the_user_chose_a_pool(
    chosen: str | None, switched: bool
) -> None:
    """In a fresh interpreter: the switch happens once, and a pool the user set is kept."""
    import json
    import subprocess

    script = (
        "import json, pyarrow as pa\n"
        "from guideflow.memory import use_system_arrow_pool\n"
        "before = pa.default_memory_pool().backend_name\n"
        "first, second = use_system_arrow_pool(), use_system_arrow_pool()\n"
        "print(json.dumps([before, first, second, pa.default_memory_pool().backend_name]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    before, first, second, after = json.loads(out.stdout)
    assert (first, second) == (switched, False)
    assert after == ("system" if switched else before)
    if chosen:
        assert before == chosen == after


def test_storage_scheme_shortcut_equals_urlsplit() -> None:
    """connectors.storage refuses http(s) URLs by scheme; its shortcut must read it as
    urlsplit does, including the odd URLs urlsplit cleans up first."""
    from urllib.parse import urlsplit

    from connectors.storage import _scheme

    rng = random.Random(7)
    alphabet = "aHs3:/.\\t\\n +-_1%@?#" + "\t\n\x00\x1f"
    urls = [
        "http://a/b", "HTTPS://x", " http://x", "\thttp://x", "h\nttp://x", "http:x",
        "memory://a", "s3://b/k", "s3a://b/k", "/tmp/x", "C:/x", "file:///x", "1http://x",
        "data:image/png;base64,xx", "a+b://x", "\x00http://x", "",
    ]  # fmt: skip
    urls += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    for url in urls:
        assert _scheme(url) == urlsplit(url).scheme.lower(), repr(url)
