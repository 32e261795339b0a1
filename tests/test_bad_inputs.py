"""Issue 6 R3: the bad-input corpus gets a clear Runware error code everywhere, and never
costs its neighbours.

Each case of :mod:`tests.corpus` (built in memory) goes through every surface that can
take it, *between good inputs*:

* the CLI: ``guideflow preprocess good_a.png <bad> good_b.png`` through typer's
  ``CliRunner``; the error objects are read from stderr, the good guides must exist;
* the real server (uvicorn on 127.0.0.1, ``tests/live_server.py``): a batch
  ``[good, bad, good, ...]`` with inline data URIs / raw base64, or URLs served by a
  loopback :class:`~tests.corpus.CorpusWeb`; the good tasks must succeed (HTTP 200);
* the pipeline: ``connectors.manifest`` planning and reading plus
  ``tasks.work.expand_row`` for manifest cases.

Every code is asserted against :data:`tests.corpus.EXPECTED_CODES` (the table for the
closing note: ``python -m tests.corpus``). Success cases also check the guide itself:
the 1×1 input gives a 1×1 guide, the EXIF-rotated JPEG comes out upright, the animated
GIF uses its first frame, RGBA is composited over white.
"""

from __future__ import annotations

import io
import json
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from connectors.manifest import ManifestError, ManifestSpec, plan_shards, read_shard
from engine import imageio
from guideflow.cli import app as cli_app
from guideflow.netguard import NetPolicy
from tasks.work import RunConfig, expand_row
from tests import corpus
from tests.corpus import EXPECTED_CODES, SUCCESS, CorpusWeb
from tests.live_server import run_server, test_config

CANNY = "runware:controlnet-preprocess@canny"
FETCH_TIMEOUT = 0.5  # seconds; the hanging URL must fail fast

runner = CliRunner()


# -- helpers --------------------------------------------------------------------------------


def uid() -> str:
    return str(uuid.uuid4())


def error_objects(stderr: str) -> list[dict[str, Any]]:
    """Every JSON object printed on stderr (rich pretty-prints each over several lines)."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    i = stderr.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(stderr, i)
        except json.JSONDecodeError:
            i = stderr.find("{", i + 1)
            continue
        found.append(obj)
        i = stderr.find("{", end)
    return found


def guide_array(data: bytes) -> np.ndarray:
    return imageio.decode_image(data)


def edge_centroid(guide: np.ndarray) -> tuple[float, float]:
    """(x, y) of the white edge pixels, as fractions of width and height."""
    ys, xs = np.nonzero(guide[:, :, 0] > 127)
    assert len(xs) >= 20, "the guide has (almost) no edges: the picture was lost"
    h, w = guide.shape[:2]
    return float(xs.mean()) / w, float(ys.mean()) / h


def check_success_guide(case: str, guide: np.ndarray) -> None:
    """What a correct guide of each success case looks like (canny edges)."""
    if case == "one_pixel":
        assert guide.shape == (1, 1, 3)
        return
    if case == "exif_rotated_jpeg":
        # upright: landscape 80×48, rectangle outline in the top-left quadrant
        assert guide.shape == (corpus.EXIF_UPRIGHT_H, corpus.EXIF_UPRIGHT_W, 3)
        x, y = edge_centroid(guide)
        assert x < 0.5 and y < 0.5, (x, y)
        return
    assert guide.shape == (corpus.GOOD_H, corpus.GOOD_W, 3)
    x, y = edge_centroid(guide)
    if case == "animated_gif":
        assert x < 0.5, "not the first frame (its rectangle is on the left)"
        return
    # every other success case draws corpus.shape_image(): a rectangle top-left
    assert x < 0.5 and y < 0.5, (x, y)


def canny_task(image: str, *, form: str = "new", **fields: Any) -> dict[str, Any]:
    """A canny task returning its guide inline as PNG, in either request form."""
    task: dict[str, Any] = {"taskUUID": uid(), "outputType": "base64Data", "outputFormat": "PNG"}
    if form == "new":
        task |= {"taskType": "controlNetPreprocess", "model": CANNY, "inputs": {"image": image}}
    else:
        task |= {
            "taskType": "imageControlNetPreProcess",
            "preProcessorType": "canny",
            "inputImage": image,
        }
    task.update(fields)
    return task


def good_task(variant: int, **fields: Any) -> dict[str, Any]:
    return canny_task(corpus.b64(corpus.good_png(variant)), **fields)


def post(base: str, tasks: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{base}/v1", json=tasks, timeout=60)


def split_answer(
    response: httpx.Response, tasks: list[dict[str, Any]], bad: set[int]
) -> dict[int, dict[str, Any]]:
    """Check the good tasks succeeded (HTTP 200, a proper guide each); return the error
    object of each bad task, by its index in ``tasks``.

    Errors are matched to the bad tasks by position (they come in request order), and
    each must echo its task's taskUUID when that was a string.
    """
    assert response.status_code == 200, response.text  # the good neighbours succeeded
    body = response.json()
    good = [t for i, t in enumerate(tasks) if i not in bad]
    assert [item["taskUUID"] for item in body["data"]] == [t["taskUUID"] for t in good]
    for item in body["data"]:
        guide = guide_array(imageio.decode_base64_image(item["guideImageBase64Data"]))
        check_success_guide("good", guide)
    errors = body.get("errors", [])
    assert len(errors) == len(bad), errors
    by_index = dict(zip(sorted(bad), errors, strict=True))
    for i, err in by_index.items():
        assert err["taskUUID"] == tasks[i]["taskUUID"]
        assert isinstance(err["message"], str) and err["message"]
    return by_index


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web() -> Iterator[CorpusWeb]:
    with CorpusWeb() as w:
        w.redirects["/to-private"] = corpus.PRIVATE_TARGET
        yield w


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    """The real server: only 127.0.0.1 may be fetched (the corpus web server lives there)."""
    config = test_config(
        fetch_timeout=FETCH_TIMEOUT,
        net_policy=NetPolicy(allow=("127.0.0.1/32",)),
        queue_size=64,
    )
    with run_server(config) as url:
        yield url


@pytest.fixture(scope="module")
def goods(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("good")
    a, b = folder / "good_a.png", folder / "good_b.png"
    a.write_bytes(corpus.good_png(0))
    b.write_bytes(corpus.good_png(1))
    return a, b


def run_cli(inputs: list[Path], out: Path, *args: str) -> Any:
    return runner.invoke(
        cli_app, ["preprocess", *map(str, inputs), "-t", "canny", "-o", str(out), *args]
    )


# -- image files: CLI -----------------------------------------------------------------------


@pytest.mark.parametrize("case", corpus.IMAGE_CASES, ids=lambda c: c.name)
def test_image_case_cli(case: corpus.ImageCase, goods: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / case.filename
    bad.write_bytes(case.build())
    out = tmp_path / "out"
    result = run_cli([goods[0], bad, goods[1]], out)
    written = {p.name for p in out.iterdir()}
    assert {"good_a.canny.png", "good_b.canny.png"} <= written
    errors = error_objects(result.stderr)
    observed = errors[0]["code"] if errors else SUCCESS
    assert {"cli": observed} == {"cli": EXPECTED_CODES[case.name]["cli"]}, result.stderr
    if observed == SUCCESS:
        assert result.exit_code == 0, result.output
        stem = bad.name.rpartition(".")[0]
        check_success_guide(case.name, guide_array((out / f"{stem}.canny.png").read_bytes()))
    else:
        assert result.exit_code == 1
        assert len(errors) == 1
        assert errors[0]["input"] == str(bad) and errors[0]["parameter"] == "inputImage"
        assert len(written) == 2


# -- image files: server (data URI and raw base64, both request forms) ----------------------


@pytest.mark.parametrize("case", corpus.IMAGE_CASES, ids=lambda c: c.name)
def test_image_case_server(case: corpus.ImageCase, base: str) -> None:
    data = case.build()
    tasks = [
        good_task(0),
        canny_task(corpus.data_uri(data, case.filename)),  # new form, data URI
        good_task(1),
        canny_task(corpus.b64(data), form="legacy"),  # legacy form, raw base64
        good_task(2),
    ]
    expected = EXPECTED_CODES[case.name]
    response = post(base, tasks)
    if expected["server"] == SUCCESS:
        assert expected["server_base64"] == SUCCESS
        assert response.status_code == 200, response.text
        body = response.json()
        assert "errors" not in body and len(body["data"]) == 5
        for i in (1, 3):
            item = body["data"][i]
            assert item["taskUUID"] == tasks[i]["taskUUID"]
            guide = guide_array(imageio.decode_base64_image(item["guideImageBase64Data"]))
            check_success_guide(case.name, guide)
        return
    errors = split_answer(response, tasks, bad={1, 3})
    observed = {"server": errors[1]["code"], "server_base64": errors[3]["code"]}
    assert observed == {k: expected[k] for k in observed}, errors
    assert errors[1]["parameter"] == "inputs.image"
    assert errors[3]["parameter"] == "inputImage"


# -- decompression bombs: fast rejection with bounded memory ------------------------------


class PeakMemory:
    """Peak traced Python allocations (tracemalloc) and peak RSS growth of a block.

    RSS: Linux's high-water mark (VmHWM) is reset through /proc/self/clear_refs where
    the kernel allows it; elsewhere ``rss_growth`` stays ``None``.
    """

    def __enter__(self) -> PeakMemory:
        self.rss_growth: int | None = None
        self._rss0 = self._reset_hwm()
        tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _, self.traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if self._rss0 is not None:
            self.rss_growth = self._status("VmHWM") - self._rss0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def _reset_hwm(self) -> int | None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return self._status("VmRSS")
        except (OSError, KeyError):
            return None


BOMBS = [c for c in corpus.IMAGE_CASES if c.expect == "imageTooLarge"]
TRACED_BOUND = 16 * 1024**2  # decoding would need ≥ 12 GB; measured: < 3 MB
RSS_BOUND = 64 * 1024**2  # measured: < 7 MB


@pytest.mark.parametrize("case", BOMBS, ids=lambda c: c.name)
def test_bomb_rejected_with_bounded_memory(
    case: corpus.ImageCase, base: str, goods: tuple[Path, Path], tmp_path: Path
) -> None:
    data = case.build()
    assert len(data) < 2048  # a tiny file claiming billions of pixels
    bad = tmp_path / case.filename
    bad.write_bytes(data)
    with PeakMemory() as cli_mem:
        result = run_cli([goods[0], bad, goods[1]], tmp_path / "out")
    assert [e["code"] for e in error_objects(result.stderr)] == ["imageTooLarge"]
    tasks = [good_task(0), canny_task(corpus.data_uri(data, case.filename)), good_task(1)]
    with PeakMemory() as server_mem:
        response = post(base, tasks)
    errors = split_answer(response, tasks, bad={1})
    assert errors[1]["code"] == "imageTooLarge"
    for mem in (cli_mem, server_mem):
        assert mem.traced_peak < TRACED_BOUND, mem.traced_peak
        if mem.rss_growth is not None:
            assert mem.rss_growth < RSS_BOUND, mem.rss_growth


# -- inline references and URLs (server only) ---------------------------------------------


@pytest.mark.parametrize("case", corpus.REF_CASES, ids=lambda c: c.name)
def test_image_reference_case(case: corpus.RefCase, base: str) -> None:
    tasks = [good_task(0), canny_task(case.ref), good_task(1)]
    errors = split_answer(post(base, tasks), tasks, bad={1})
    assert {"server": errors[1]["code"]} == EXPECTED_CODES[case.name]
    assert errors[1]["parameter"] == "inputs.image"


@pytest.mark.parametrize("case", corpus.URL_CASES, ids=lambda c: c.name)
def test_url_case(case: corpus.UrlCase, base: str, web: CorpusWeb) -> None:
    url = case.path if "://" in case.path else web.url + case.path
    before = len(web.hits)
    tasks = [good_task(0), canny_task(url), good_task(1)]
    errors = split_answer(post(base, tasks), tasks, bad={1})
    assert {"server": errors[1]["code"]} == EXPECTED_CODES[case.name]
    assert errors[1]["parameter"] == "inputs.image"
    hits = [h.path for h in web.hits[before:]]
    if case.name == "url_timeout":
        assert "timed out" in errors[1]["message"]
    if case.name == "url_redirect_to_private":
        assert hits == ["/to-private"]  # followed no further: 10.x was refused, not tried
        assert "10.255.0.1" in errors[1]["message"]
    if case.name == "url_ftp":
        assert hits == []


def test_url_good_neighbour_by_url(base: str, web: CorpusWeb) -> None:
    """Control: the same web server's good file is fetched fine, so the refusals are real."""
    web.files["/good.png"] = (corpus.good_png(4), "image/png")
    tasks = [canny_task(f"{web.url}/good.png")]
    response = post(base, tasks)
    assert response.status_code == 200 and "errors" not in response.json()


# -- request parameters: server and CLI ----------------------------------------------------


@pytest.mark.parametrize("case", corpus.PARAM_CASES, ids=lambda c: c.name)
def test_param_case_server(case: corpus.ParamCase, base: str) -> None:
    first = good_task(0)
    fields = dict(case.fields)
    if case.name == "task_uuid_duplicate_in_batch":
        fields["taskUUID"] = first["taskUUID"]
    tasks = [first, good_task(1, **fields), good_task(2)]
    errors = split_answer(post(base, tasks), tasks, bad={1})
    assert {"server": errors[1]["code"]} == {"server": EXPECTED_CODES[case.name]["server"]}
    assert errors[1]["parameter"] == case.parameter


@pytest.mark.parametrize(
    "case", [c for c in corpus.PARAM_CASES if c.cli_args], ids=lambda c: c.name
)
def test_param_case_cli(case: corpus.ParamCase, goods: tuple[Path, Path], tmp_path: Path) -> None:
    """A bad option applies to every input: exit 2 before any work, one error object."""
    args = list(case.cli_args or ())
    type_index = args.index("--type") if "--type" in args else None
    out = tmp_path / "out"
    if type_index is not None:
        name = args[type_index + 1]
        del args[type_index : type_index + 2]
        result = runner.invoke(
            cli_app, ["preprocess", *map(str, goods), "-t", name, "-o", str(out), *args]
        )
    else:
        result = run_cli(list(goods), out, *args)
    assert result.exit_code == 2, result.output
    (error,) = error_objects(result.stderr)
    assert {"cli": error["code"]} == {"cli": EXPECTED_CODES[case.name]["cli"]}
    assert error["parameter"] == ("preProcessorType" if type_index is not None else case.parameter)
    assert error["input"] == "<arguments>"
    assert not out.exists() or not any(out.iterdir())


# -- manifests: pipeline ---------------------------------------------------------------------


def manifest_outcomes(spec: ManifestSpec, config: RunConfig) -> list[tuple[str, str | None]]:
    """(outcome, error parameter) per data row: ``"success"`` or the row's error code."""
    outcomes: list[tuple[str, str | None]] = []
    for shard in plan_shards(spec, shard_size=2):
        for row in read_shard(shard):
            items, errors = expand_row(row, shard.index, config)
            if errors:
                err = errors[0].error
                assert err is not None and not items
                outcomes.append((err.code, err.parameter))
            else:
                assert len(items) == 1 and items[0].input_uri == row.image
                outcomes.append((SUCCESS, None))
    return outcomes


@pytest.mark.parametrize("case", corpus.MANIFEST_CASES, ids=lambda c: c.name)
def test_manifest_case(case: corpus.ManifestCase, tmp_path: Path) -> None:
    path = tmp_path / case.filename
    path.write_bytes(case.content)
    spec = ManifestSpec(url=str(path))
    config = RunConfig(
        manifest=spec,
        preprocessors=("canny",),
        output=str(tmp_path / "out"),
        ledger=str(tmp_path / "ledger"),
    )
    if case.expect is not None:
        with pytest.raises(ManifestError) as info:
            manifest_outcomes(spec, config)
        observed = info.value.code
        assert str(path.name) in info.value.message
    else:
        outcomes = manifest_outcomes(spec, config)
        observed = " / ".join(code for code, _ in outcomes)
        assert tuple(p for _, p in outcomes) == case.error_parameters
    assert {"pipeline": observed} == EXPECTED_CODES[case.name]


# -- the table itself -----------------------------------------------------------------------


def test_corpus_covers_every_kind() -> None:
    """At least 20 kinds, every one with an expected code on at least one surface."""
    assert len(EXPECTED_CODES) >= 20
    assert all(EXPECTED_CODES[name] for name in EXPECTED_CODES)
    table = corpus.markdown_table()
    assert all(f"| {name} |" in table for name in EXPECTED_CODES)
    # the generated inputs are what they claim to be
    assert imageio.sniff_format(corpus.bomb_png()) == "PNG"
    assert imageio.sniff_format(corpus.exif_rotated_jpeg()) == "JPEG"
    assert io.BytesIO(corpus.animated_gif()).read(6) == b"GIF89a"
