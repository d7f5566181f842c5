"""Stable Diffusion directories as users download them (written by diffusers' own save_pretrained): every scheduler
class real checkpoints name loads and generates, with its own sampler and with --scheduler; sizes and seeds are
checked before any weights load; a size the model was not trained for is warned about once."""

from __future__ import annotations

import logging
import shutil

import pytest
from helpers import plain
from tiny_sd import CHECKPOINT_SCHEDULERS, with_scheduler_class, write_tiny_sd
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.geometry.trajectories import walk
from diffpano.io.manifest import read_manifest

# The sampler each class's directory records in the manifest when it samples with its own scheduler.
OWN_LABEL = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "LMSDiscreteScheduler": "lms",
             "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler-a",
             "DPMSolverMultistepScheduler": "dpmpp-2m", "HeunDiscreteScheduler": "heun"}


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory) -> dict:
    """One tiny SD directory per scheduler class that real checkpoints name."""
    root = tmp_path_factory.mktemp("sd-dirs")
    return {name: write_tiny_sd(root / name, name) for name in CHECKPOINT_SCHEDULERS}


def generate(model, out, *extra: str):
    """`diffpano generate` of a 2-view tour, 3 steps, seed 1 (in this process)."""
    args = ["generate", "a red room", "--views", "2", "--steps", "3", "--seed", "1", "--model", str(model),
            "--out", str(out), *extra]
    return CliRunner().invoke(build_app(), args)


@pytest.mark.parametrize("class_name", CHECKPOINT_SCHEDULERS)
def test_each_checkpoint_scheduler_generates_with_its_own_sampler_and_with_ddim(sd_dirs, class_name, tmp_path):
    for extra, label in (([], OWN_LABEL[class_name]), (["--scheduler", "ddim"], "ddim")):
        out = tmp_path / ("named" if extra else "own")
        result = generate(sd_dirs[class_name], out, *extra)
        assert result.exit_code == 0, result.output
        table = read_manifest(str(out)).to_pandas()
        assert len(table) == 2 and set(table.scheduler) == {label} and set(table.seed) == {1}


def test_a_class_diffusers_lacks_is_one_line_and_exit_2_and_scheduler_is_the_way_out(sd_dirs, tmp_path):
    model = with_scheduler_class(sd_dirs["PNDMScheduler"], tmp_path / "renamed", "PLMSv9Scheduler")
    result = generate(model, tmp_path / "none")
    text = plain(result.output)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the model names 'PLMSv9Scheduler', which diffusers" in text and "--scheduler" in text
    assert not (tmp_path / "none").exists()
    assert generate(model, tmp_path / "ddim", "--scheduler", "ddim").exit_code == 0
    assert set(read_manifest(str(tmp_path / "ddim")).column("scheduler").to_pylist()) == {"ddim"}
    served = CliRunner().invoke(build_app(), ["serve", "--model", str(model), "--port", "1"])  # refused before Ray
    assert served.exit_code == 2 and "PLMSv9Scheduler" in plain(served.output) and "--scheduler" in plain(served.output)


def test_sizes_and_seeds_are_checked_before_any_weights_load(sd_dirs, tmp_path):
    """A directory with its configs but no weights: a bad size or seed is refused by the checks, not by a load."""
    configs = tmp_path / "configs-only"
    shutil.copytree(sd_dirs["PNDMScheduler"], configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for extra, expected in ((["--size", "20x40"], "size: height and width must be multiples of 8"),
                            (["--size", "16x48"], "width = 2*height"),
                            (["--seed", "-1"], "--seed"), (["--seed", str(2**63)], "--seed")):
        args = ["generate", "x", "--model", str(configs), "--out", str(tmp_path / "o"), *extra]
        result = CliRunner().invoke(build_app(), args)
        assert result.exit_code == 2 and expected in plain(result.output), (extra, result.output)
    assert not (tmp_path / "o").exists()


def test_a_size_the_model_was_not_trained_for_warns_once_naming_the_trained_size(tiny_pipe, caplog):
    tiny_pipe._sizes_warned.clear()
    fast = dict(num_inference_steps=1, guidance_scale=1.0, seed=0)
    with caplog.at_level(logging.WARNING, logger="diffpano.pipelines.pano"):
        tiny_pipe("a room", walk(2), **fast)  # the trained size (16x32): no warning
        for _ in range(2):
            tiny_pipe("a room", walk(2), height=32, width=64, **fast)
    warnings = [r.getMessage() for r in caplog.records if r.name == "diffpano.pipelines.pano"]
    assert len(warnings) == 1 and "32x64 is not the size" in warnings[0] and "(16x32" in warnings[0]
