"""Samplers by name: building them from a model's config, running each in a tour, and loading the one a model names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from diffpano.factory import default_scheduler
from diffpano.modelio import load_model
from diffpano.schedulers import SCHEDULER_NAMES, make_scheduler, scheduler_name
from diffpano.trajectories import walk

FAST = dict(num_inference_steps=2, guidance_scale=3.0, height=16, width=32)


def test_names_build_their_schedulers_from_the_model_config():
    assert SCHEDULER_NAMES == ("ddim", "dpmpp-2m", "euler", "euler-a", "unipc")
    base = default_scheduler()
    for name in SCHEDULER_NAMES:
        sched = make_scheduler(name, base.config)
        assert scheduler_name(sched) == name
        assert sched.config.beta_schedule == base.config.beta_schedule
        assert sched.config.prediction_type == base.config.prediction_type
    dpm = make_scheduler("dpmpp-2m", base.config)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    sde = DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="sde-dpmsolver++")
    assert scheduler_name(sde) is None
    with pytest.raises(ValueError, match="scheduler: unknown 'heun'"):
        make_scheduler("heun", base.config)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_runs_a_tour_with_a_known_view(tiny_pipe, name):
    given = np.zeros((16, 32, 3), np.uint8)
    given[..., 2] = 200
    out = tiny_pipe("a blue bedroom", walk(3, spacing=0.8), seed=0, scheduler=name, known_views={1: given}, **FAST)
    assert out.images.shape == (1, 3, 16, 32, 3)
    assert np.array_equal(out.images[0, 1], given)
    assert out.images[0, [0, 2]].std() > 1  # not blank
    again = tiny_pipe("a blue bedroom", walk(3, spacing=0.8), seed=0, scheduler=name, known_views={1: given}, **FAST)
    assert np.array_equal(out.images, again.images)  # a fresh scheduler each call: no state carried over


def test_a_call_leaves_the_pipeline_scheduler_untouched(tiny_pipe):
    before = dict(tiny_pipe.scheduler.config)
    tiny_pipe("a room", walk(2), seed=0, **FAST)
    assert tiny_pipe.scheduler.num_inference_steps is None and dict(tiny_pipe.scheduler.config) == before


def with_scheduler(src, dst, scheduler) -> None:
    """Copy a model directory with `scheduler` as its scheduler (model_index.json entry and config)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "scheduler")
    scheduler.save_config(dst / "scheduler")
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (dst / "model_index.json").write_text(json.dumps(index))


def test_load_model_builds_the_scheduler_the_model_index_names(tiny_model_dir, tmp_path):
    assert isinstance(load_model(tiny_model_dir, "cpu").scheduler, DDIMScheduler)
    dpm = make_scheduler("dpmpp-2m", default_scheduler().config)
    with_scheduler(tiny_model_dir, tmp_path / "dpm", dpm)
    pipe = load_model(tmp_path / "dpm", "cpu")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and scheduler_name(pipe.scheduler) == "dpmpp-2m"
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a room", walk(2), seed=0, **FAST).images.shape == (1, 2, 16, 32, 3)
    with_scheduler(tiny_model_dir, tmp_path / "anc", EulerAncestralDiscreteScheduler.from_config(dpm.config))
    assert scheduler_name(load_model(tmp_path / "anc", "cpu").scheduler) == "euler-a"


def test_unknown_scheduler_class_in_a_model_is_a_clear_error(tiny_model_dir, tmp_path):
    from diffusers import HeunDiscreteScheduler

    with_scheduler(tiny_model_dir, tmp_path / "heun", HeunDiscreteScheduler.from_config(default_scheduler().config))
    with pytest.raises(ValueError, match="scheduler: the model names 'HeunDiscreteScheduler'"):
        load_model(tmp_path / "heun", "cpu")
