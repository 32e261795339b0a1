"""The `guideflow` CLI, run in-process through typer's runner against the real engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from engine import imageio
from guideflow.cli import app

runner = CliRunner()


def error_objects(text: str) -> list[dict]:
    """Every JSON error object printed on stderr (rich pretty-prints them over several lines)."""
    objs, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and start is not None:
                objs.append(json.loads(text[start : i + 1]))
    return objs


def test_preprocess_goes_on_after_a_bad_input_and_exits_non_zero(
    tmp_path: Path, images_dir: Path
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    inputs = [images_dir / "room.png", bad, images_dir / "toy.png"]
    result = runner.invoke(
        app,
        ["preprocess", *map(str, inputs), "--type", "canny", "-o", str(tmp_path / "out")],
    )
    assert result.exit_code == 1, result.output
    errors = error_objects(result.stderr)
    assert [e["code"] for e in errors] == ["invalidImage"]
    assert errors[0]["input"] == str(bad) and errors[0]["parameter"] == "inputImage"
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["room.canny.png", "toy.canny.png"]
    guide = imageio.decode_image((tmp_path / "out" / "room.canny.png").read_bytes())
    assert set(np.unique(guide)) <= {0, 255}


def test_preprocess_downscales_and_honours_format(tmp_path: Path, images_dir: Path) -> None:
    args = ["preprocess", str(images_dir / "room.png"), "-t", "canny", "-o", str(tmp_path)]
    result = runner.invoke(app, [*args, "--width", "200", "--format", "JPG", "--quality", "80"])
    assert result.exit_code == 0, result.output
    data = (tmp_path / "room.canny.jpg").read_bytes()
    assert imageio.sniff_format(data) == "JPEG"
    src = imageio.decode_image((images_dir / "room.png").read_bytes())
    expected_h = round(src.shape[0] * 200 / src.shape[1])
    assert imageio.decode_image(data).shape == (expected_h, 200, 3)


def test_invalid_settings_fail_before_any_work(tmp_path: Path, images_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "preprocess",
            str(images_dir / "room.png"),
            "-t",
            "canny",
            "--low",
            "200",
            "--high",
            "100",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2
    (err,) = error_objects(result.stderr)
    assert err["code"] == "invalidParameter" and err["parameter"] == "lowThresholdCanny"
    assert not (tmp_path / "out").exists()


def test_unknown_preprocessor_is_a_clear_error(tmp_path: Path, images_dir: Path) -> None:
    result = runner.invoke(
        app, ["preprocess", str(images_dir / "room.png"), "-t", "sketchify", "-o", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert error_objects(result.stderr)[0]["code"] == "invalidPreProcessorType"


def test_seed_makes_shuffle_reproducible_from_the_cli(tmp_path: Path, images_dir: Path) -> None:
    for run in ("a", "b"):
        result = runner.invoke(
            app,
            [
                "preprocess",
                str(images_dir / "toy.png"),
                "-t",
                "shuffle",
                "--seed",
                "7",
                "-o",
                str(tmp_path / run),
            ],
        )
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "toy.shuffle.png").read_bytes() == (
        tmp_path / "b" / "toy.shuffle.png"
    ).read_bytes()


def test_models_list_shows_licence_and_where_found(models_dir: Path) -> None:
    result = runner.invoke(app, ["models", "list"], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "mlsd" in result.output
    assert "Apache-2.0" in result.output
    assert "found" in result.output


def test_models_verify_catches_a_corrupt_copy(tmp_path: Path, models_dir: Path, monkeypatch):
    shutil.copytree(models_dir, tmp_path / "models")
    victim = next((tmp_path / "models").rglob("*.onnx"))
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:-10])
    from engine.models import store

    monkeypatch.setattr(store, "_default", store.ModelStore(tmp_path / "models"))
    result = runner.invoke(app, ["models", "verify"])
    assert result.exit_code == 1
    assert any(e["code"] == "modelCorrupt" for e in error_objects(result.stderr))


def test_every_command_has_help() -> None:
    for args in (
        ["--help"],
        ["preprocess", "--help"],
        ["models", "--help"],
        ["models", "list", "--help"],
        ["models", "pull", "--help"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output
