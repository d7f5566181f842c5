"""The `diffpano generate` and `diffpano video` commands, end to end on a tiny model directory."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from PIL import Image, ImageSequence
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.io import storage
from diffpano.io.manifest import TOUR_SCHEMA, decode_rgb, read_manifest

app = build_app()

runner = CliRunner()


def generate(model_dir, out, *extra):
    """Run `diffpano generate` with fast settings."""
    args = ["generate", "a red bedroom", "--views", "3", "--steps", "2", "--size", "16x32", "--seed", "5",
            "--model", str(model_dir), "--out", str(out), *extra]
    return runner.invoke(app, args, catch_exceptions=False)


def plain(output: str) -> str:
    """CLI output with rich's box drawing and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


def check_tours(out: str, tours: int, views: int):
    """The manifest under out has tours x views rows, each image a complete 2:1 PNG."""
    table = read_manifest(out)
    assert table.schema.equals(TOUR_SCHEMA) and table.num_rows == tours * views
    df = table.to_pandas()
    assert df.tour_id.nunique() == tours and not df.duplicated(["tour_id", "view_index"]).any()
    for uri in df.image_uri:
        img = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, uri))))
        img.load()
        assert img.size == (32, 16)
    return df


def test_generate_writes_a_tour_and_adds_more(tiny_model_dir, tmp_path):
    out = tmp_path / "tours"
    result = generate(tiny_model_dir, out)
    assert result.exit_code == 0, result.output
    assert "3 views 16x32" in result.output
    df = check_tours(str(out), 1, 3)
    assert set(df.seed) == {5} and df.model.iloc[0].startswith("tiny@") and set(df.num_inference_steps) == {2}
    assert generate(tiny_model_dir, out, "--no-epipolar").exit_code == 0
    check_tours(str(out), 2, 3)
    # the manifest reads with pyarrow.dataset, pandas and DuckDB
    assert pads.dataset(str(out / "manifest"), format="parquet").count_rows() == 6
    assert len(pd.read_parquet(out / "manifest")) == 6
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/manifest/*.parquet')").fetchall()[0][0] == 6


def test_prompts_per_view_and_trajectory_file(tiny_model_dir, tmp_path):
    traj = tmp_path / "traj.json"
    traj.write_text('{"kind": "orbit", "radius": 2.0}')
    prompts = ["--prompts-per-view", "a red bedroom", "--prompts-per-view", "a red bedroom",
               "--prompts-per-view", "a blue kitchen"]
    result = generate(tiny_model_dir, tmp_path / "o", "--trajectory", str(traj), *prompts)
    assert result.exit_code == 0, result.output
    df = check_tours(str(tmp_path / "o"), 1, 3).sort_values("view_index")
    assert df.prompt.tolist() == ["a red bedroom", "a red bedroom", "a blue kitchen"]


def test_a_trajectory_file_sets_the_views_and_option_mistakes_are_named(tiny_model_dir, tmp_path):
    """Without --views, a pose file's poses are the tour; a bad --trajectory, --guidance or --device is exit 2 with
    the rule it breaks, no traceback, nothing written."""
    import torch

    from diffpano.geometry.trajectories import walk

    traj = tmp_path / "five.json"
    traj.write_text(json.dumps([p.reshape(16).tolist() for p in walk(5).numpy()]))
    base = ["generate", "a room", "--steps", "1", "--size", "16x32", "--model", str(tiny_model_dir)]
    result = runner.invoke(app, [*base, "--trajectory", str(traj), "--out", str(tmp_path / "five")])
    assert result.exit_code == 0, result.output
    check_tours(str(tmp_path / "five"), 1, 5)
    bad = [(["--trajectory", "spiral"], "expected walk, orbit or a JSON file of poses; there is no file 'spiral'"),
           (["--guidance", "nan"], "must be a finite number"), (["--guidance", "-1"], "must be >= 0.0"),
           (["--device", "gpu"], "device: expected auto, cpu, cuda or cuda:N")]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "device: cuda was asked for, but this torch build or machine has no CUDA"))
    for extra, message in bad:
        result = runner.invoke(app, [*base, *extra, "--out", str(tmp_path / "none")])
        assert result.exit_code == 2 and message in plain(result.output), (extra, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "none").exists()


def test_video_of_a_tour(tiny_model_dir, tmp_path):
    out = tmp_path / "tours"
    assert generate(tiny_model_dir, out).exit_code == 0
    gif = tmp_path / "tour.gif"
    result = runner.invoke(app, ["video", str(out), "--out", str(gif), "--frames-per-view", "4"])
    assert result.exit_code == 0, result.output
    with Image.open(gif) as im:  # 3 views x 4 frames at 12 fps; identical consecutive frames merge, keeping time
        durations = [f.info["duration"] for f in ImageSequence.Iterator(im)]
    assert len(durations) >= 2 and abs(sum(durations) - 12 * 83) < 10 * len(durations), durations
    bad = runner.invoke(app, ["video", str(out), "--tour", "nope", "--out", str(gif)])
    assert bad.exit_code != 0 and "--tour" in plain(bad.output)


@pytest.mark.parametrize(
    "extra, message",
    [(["--size", "16x16"], "width = 2"), (["--size", "abc"], "--size"), (["--size", "18x36"], "multiples of 4"),
     (["--prompts-per-view", "one"], "--prompts-per-view"), (["--num-samples", "0"], "num_samples")],
)
def test_bad_input_is_a_clear_error(tiny_model_dir, tmp_path, extra, message):
    out = tmp_path / "o"
    result = generate(tiny_model_dir, out, *extra)
    assert result.exit_code != 0 and message in plain(result.output)
    assert not storage.list_files(str(out / "manifest"))  # nothing half-written


def png_file(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


def tour_images(out) -> np.ndarray:
    """(views, H, W, 3) of the one tour under out, by view index."""
    df = read_manifest(str(out)).to_pandas().sort_values("view_index")
    return np.stack([decode_rgb(storage.read_bytes(storage.join(str(out), u))) for u in df.image_uri])


def test_a_tour_starts_from_your_own_panoramas_kept_exactly(tiny_model_dir, tmp_path):
    """--image 1=BIG.png: resized to the tour's size with a note, then returned exactly; --image at the tour's size
    comes back pixel for pixel; the other views are generated around it."""
    rng = np.random.default_rng(0)
    big = png_file(tmp_path / "big.png", rng.integers(0, 256, (64, 128, 3), dtype=np.uint8))
    exact = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    result = generate(tiny_model_dir, tmp_path / "a", "--image", f"1={big}", "--image",
                      f"2={png_file(tmp_path / 'exact.png', exact)}")
    assert result.exit_code == 0, result.output
    assert "note: --image 1: resized 64x128 -> 16x32 (the tour's size)" in result.output
    assert "--image 2:" not in result.output  # already the tour's size: no note
    images = tour_images(tmp_path / "a")
    fitted = np.asarray(Image.open(big).convert("RGB").resize((32, 16), Image.LANCZOS))
    assert np.array_equal(images[1], fitted) and np.array_equal(images[2], exact)
    assert generate(tiny_model_dir, tmp_path / "b").exit_code == 0
    assert not np.array_equal(images[0], tour_images(tmp_path / "b")[0])  # view 0 was steered by the given views


def test_given_panoramas_that_cannot_be_used_are_refused_naming_the_option(tiny_model_dir, tmp_path):
    square = png_file(tmp_path / "square.png", np.zeros((16, 16, 3), np.uint8))
    good = png_file(tmp_path / "good.png", np.zeros((16, 32, 3), np.uint8))
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        ([f"5={good}"], "--image: view 5 is outside the tour's 3 views"),
        ([f"0={square}"], "a panorama must be 2:1 equirectangular (width = 2 x height), got 16x16"),
        ([f"0={tmp_path / 'notes.png'}"], "not an image that can be decoded"),
        ([f"0={tmp_path / 'missing.png'}"], "there is no file"),
        ([str(good)], "expected INDEX=PANORAMA"),
        ([f"0={good}", f"0={good}"], "view 0 is given twice"),
    ]
    for values, message in cases:
        out = tmp_path / "refused"
        result = generate(tiny_model_dir, out, *[a for v in values for a in ("--image", v)])
        assert result.exit_code == 2 and message in plain(result.output), (values, result.output)
        assert not out.exists()  # nothing written


def test_generate_to_s3(tiny_model_dir, s3_endpoint):
    out = "s3://diffpano-test/tours"
    result = generate(tiny_model_dir, out)
    assert result.exit_code == 0, result.output
    check_tours(out, 1, 3)


def test_generate_with_a_named_scheduler_is_reproducible_and_differs_from_the_default(tiny_model_dir, tmp_path):
    """--scheduler euler-a (stochastic) twice with one seed: the same images; DDIM (the model's own) gives others."""
    images = {}
    for name, extra in (("a", ["--scheduler", "euler-a"]), ("b", ["--scheduler", "euler-a"]), ("ddim", [])):
        out = tmp_path / name
        result = generate(tiny_model_dir, out, *extra)
        assert result.exit_code == 0, result.output
        df = read_manifest(str(out)).to_pandas().sort_values("view_index")
        images[name] = [storage.read_bytes(storage.join(str(out), u)) for u in df.image_uri]
        assert set(df.scheduler) == {"euler-a" if name != "ddim" else "ddim"}  # what a seed reproduces with
    assert images["a"] == images["b"]
    assert images["a"] != images["ddim"]


def test_an_unknown_scheduler_is_refused_naming_the_choices(tiny_model_dir, tmp_path):
    result = generate(tiny_model_dir, tmp_path / "x", "--scheduler", "plms")
    assert result.exit_code == 2
    assert "--scheduler" in plain(result.output) and "dpmpp-2m" in plain(result.output)
    assert not (tmp_path / "x").exists()


def test_an_unknown_compile_mode_is_refused_by_generate_bulk_and_serve(tiny_model_dir, tmp_path):
    """--compile is checked before any model loads: exit 2 naming the option and the modes; nothing written."""
    for args in (["generate", "a red bedroom", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")],
                 ["bulk", "--synthetic", "1", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")],
                 ["serve", "--model", str(tiny_model_dir)]):
        result = runner.invoke(app, [*args, "--compile", "fast"], catch_exceptions=False)
        assert result.exit_code == 2, (args[0], result.output)
        assert "--compile" in plain(result.output) and "reduce-overhead" in plain(result.output)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_generate_with_compile_writes_the_eager_tour_from_a_compiled_unet(tiny_model_dir, tmp_path):
    """--compile default: the UNet ran compiled (said on the last line) and the images equal eager's within 8-bit."""
    pixels = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "default"])):
        result = generate(tiny_model_dir, tmp_path / name, *extra)
        assert result.exit_code == 0, result.output
        assert ("UNet compiled (default)" in result.output) == (name == "compiled"), result.output
        df = read_manifest(str(tmp_path / name)).to_pandas().sort_values("view_index")
        pixels[name] = np.stack([np.asarray(Image.open(io.BytesIO(storage.read_bytes(
            storage.join(str(tmp_path / name), u)))), dtype=np.int16) for u in df.image_uri])
    assert np.abs(pixels["compiled"] - pixels["eager"]).max() <= 2


def test_hints_name_the_command_as_the_user_can_run_it(monkeypatch, tmp_path):
    """After `make run` the virtual environment is not activated: hints say .venv/bin/diffpano, not diffpano."""
    import sys

    from diffpano.cli import command_name

    exe = tmp_path / "bin" / "diffpano"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(exe), "bulk"])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert command_name() == str(exe)
    monkeypatch.setenv("PATH", str(exe.parent))
    assert command_name() == "diffpano"
    result = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "is not a model directory" in plain(result.output)


def test_importing_the_library_logs_no_image_processor_fallback_warnings():
    """diffusers' SD imports make transformers warn once per process about PIL image processors (10 lines in a
    Ray Train run); the library filters that one warning."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c",
                           "import diffpano.models.lora, diffpano.pipelines.loading, diffpano.metrics.features"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "falling back" not in done.stderr, done.stderr[-2000:]
