"""Samplers: names built from a model's config, every class real checkpoints name loading and sampling (checked
against an exact denoiser), per-tour noise with each, and clear refusals for classes that cannot sample."""

from __future__ import annotations

import importlib.util
import io

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from tiny_sd import SD1_SCHEDULER, with_scheduler_class

from diffpano.geometry.trajectories import walk
from diffpano.pipelines.factory import build_pipeline, default_scheduler, tiny_unet_config
from diffpano.pipelines.loading import check_model, load_model
from diffpano.pipelines.schedulers import (
    SAMPLABLE_CLASSES,
    SCHEDULER_NAMES,
    check_samplable,
    make_scheduler,
    scheduler_from_class,
    scheduler_name,
    unet_calls,
)

FAST = dict(num_inference_steps=2, guidance_scale=3.0, height=16, width=32)


def sd1(class_name: str, **changes):
    """A scheduler of class_name built from Stable Diffusion 1.x's scheduler config (with changes)."""
    return getattr(diffusers, class_name).from_config(SD1_SCHEDULER | changes)


def test_names_build_their_schedulers_from_the_model_config():
    assert SCHEDULER_NAMES == ("ddim", "dpmpp-2m", "euler", "euler-a", "unipc", "pndm", "lms", "heun")
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
    assert scheduler_name(make_scheduler("pndm", sd1("PNDMScheduler").config)) == "pndm"
    with pytest.raises(ValueError, match="scheduler: unknown 'plms'"):
        make_scheduler("plms", base.config)


class ExactDenoiser(UNet2DConditionModel):
    """A UNet that predicts the exact noise of x_t when all data is one image x0: eps = (x_t - sqrt(ab) x0) /
    sqrt(1 - ab), with ab at the timestep it is given (fractional ones by log-sigma interpolation, as Karras-style
    samplers map sigmas to timesteps). Every correct sampler ends at x0."""

    def set_target(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        self.x0, self.log_sigmas = x0, ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log().double()

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0].clamp(0, len(self.log_sigmas) - 1)
        lo = int(t.floor())
        hi = min(lo + 1, len(self.log_sigmas) - 1)
        sigma = torch.lerp(self.log_sigmas[lo], self.log_sigmas[hi], t - lo).exp()
        ab = 1 / (1 + sigma**2)
        eps = (sample.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return UNet2DConditionOutput(sample=eps.to(sample.dtype))


@pytest.fixture(scope="module")
def exact_pipe():
    """A pixel-space pipeline whose UNet is the exact denoiser of a smooth target image."""
    pipe = build_pipeline(tiny_unet_config(3))
    unet = ExactDenoiser(**tiny_unet_config(3))
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 32), indexing="ij")
    x0 = torch.stack([0.7 * torch.sin(3 * xs), 0.6 * ys, 0.5 * torch.cos(2 * xs + ys)]).double()
    unet.set_target(x0, default_scheduler().alphas_cumprod)
    pipe.unet = unet
    pipe.set_progress_bar_config(disable=True)
    return pipe, x0


@pytest.mark.parametrize("class_name", sorted(SAMPLABLE_CLASSES))
def test_every_samplable_class_ends_at_the_data_with_an_exact_denoiser(exact_pipe, class_name):
    """PNDM's warm-up, LMS's sigma scaling of the input, Heun's and KDPM2's two calls a step, the ancestral and DDPM
    noise: a sampler driven wrong by the pipeline (unscaled input, skipped calls, wrong timesteps) misses x0."""
    pipe, x0 = exact_pipe
    pipe.scheduler = sd1(class_name, set_alpha_to_one=True)  # DDIM-style samplers end at t=0's noise level otherwise
    known = ((x0.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    out = pipe("a room", walk(3), seed=0, output_type="latent", known_views={1: known}, num_inference_steps=6,
               guidance_scale=3.0, height=16, width=32).images
    err = (out[0].double() - x0).abs().amax(dim=(1, 2, 3))
    print(f"{class_name}: max error per view {[round(float(e), 4) for e in err]}")
    # DEIS ends at the first training timestep's noise level (diffusers' design), 0.029 of unit noise, not at 0
    residual = 5 * (1 - pipe.scheduler.alphas_cumprod[0]).sqrt() if class_name == "DEISMultistepScheduler" else 0
    assert float(err[[0, 2]].max()) < 0.02 + residual


def test_an_edm_sampler_misses_the_data_and_is_refused(exact_pipe):
    """EDMEuler feeds the UNet EDM noise levels: with an SD-style UNet it cannot reach x0, so it is refused."""
    pipe, x0 = exact_pipe
    pipe.scheduler = sd1("EDMEulerScheduler")
    with pytest.raises(ValueError, match="scheduler: the model's EDMEulerScheduler cannot sample tours .*--scheduler"):
        pipe("a room", walk(2), seed=0, output_type="latent", **FAST)
    sched = sd1("EDMEulerScheduler")
    sched.set_timesteps(6)
    x = torch.randn(1, *x0.shape, generator=torch.Generator().manual_seed(0)).double() * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = pipe.unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(eps, t, x).prev_sample
    assert float((x[0] - x0).abs().max()) > 0.1


@pytest.mark.parametrize("class_name", sorted(SAMPLABLE_CLASSES))
def test_each_sampler_keeps_per_tour_noise_alone_or_in_a_batch(tiny_pipe, class_name):
    """A tour's images depend on its seed only: the same alone and in a batch, at either position."""
    tiny_pipe.scheduler, saved = sd1(class_name), tiny_pipe.scheduler
    try:
        poses = walk(3, spacing=0.8)
        a, b, other = (tiny_pipe("a blue bedroom", poses, seed=s, **FAST).images[0] for s in (7, 7, 8))
        both = tiny_pipe([["a blue bedroom"] * 3] * 2, torch.stack([poses] * 2), seed=[8, 7], **FAST).images
    finally:
        tiny_pipe.scheduler = saved
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 1
    assert np.abs(both[1].astype(int) - a.astype(int)).max() <= 1
    assert np.abs(both[0].astype(int) - other.astype(int)).max() <= 1


@pytest.mark.parametrize("name, calls", [("pndm", 4), ("heun", 5), ("lms", 3), ("ddim", 3)])
def test_unet_calls_and_progress_follow_the_sampler(tiny_pipe, name, calls):
    """PNDM adds a warm-up call, Heun calls the UNet twice per step but the last: the bar counts real calls."""
    seen = []
    hook = tiny_pipe.unet.register_forward_hook(lambda *_: seen.append(1))
    bar = io.StringIO()
    tiny_pipe.set_progress_bar_config(file=bar, disable=False)
    try:
        tiny_pipe("a room", walk(2), seed=0, scheduler=name, **FAST | {"num_inference_steps": 3})
    finally:
        hook.remove()
        tiny_pipe.set_progress_bar_config(disable=True)
    assert len(seen) == calls == unet_calls(make_scheduler(name, default_scheduler().config), 3)
    assert f"{calls}/{calls}" in bar.getvalue()


def test_eta_is_refused_by_samplers_without_it(tiny_pipe):
    with pytest.raises(ValueError, match="eta: pndm takes no eta"):
        tiny_pipe("a room", walk(2), seed=0, scheduler="pndm", eta=0.5, **FAST)
    assert tiny_pipe("a room", walk(2), seed=0, scheduler="ddim", eta=0.5, **FAST).scheduler == "ddim"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_runs_a_tour_with_a_known_view(tiny_pipe, name):
    given = np.zeros((16, 32, 3), np.uint8)
    given[..., 2] = 200
    out = tiny_pipe("a blue bedroom", walk(3, spacing=0.8), seed=0, scheduler=name, known_views={1: given}, **FAST)
    assert out.images.shape == (1, 3, 16, 32, 3) and out.scheduler == name
    assert np.array_equal(out.images[0, 1], given)
    assert out.images[0, [0, 2]].std() > 1  # not blank
    again = tiny_pipe("a blue bedroom", walk(3, spacing=0.8), seed=0, scheduler=name, known_views={1: given}, **FAST)
    assert np.array_equal(out.images, again.images)  # a fresh scheduler each call: no state carried over


def test_a_call_leaves_the_pipeline_scheduler_untouched(tiny_pipe):
    before = dict(tiny_pipe.scheduler.config)
    tiny_pipe("a room", walk(2), seed=0, **FAST)
    assert tiny_pipe.scheduler.num_inference_steps is None and dict(tiny_pipe.scheduler.config) == before


def test_load_model_builds_the_scheduler_the_model_index_names(tiny_model_dir, tmp_path):
    assert isinstance(load_model(tiny_model_dir, "cpu").scheduler, DDIMScheduler)
    dpm = make_scheduler("dpmpp-2m", default_scheduler().config)
    with_scheduler_class(tiny_model_dir, tmp_path / "dpm", "DPMSolverMultistepScheduler", dict(dpm.config))
    pipe = load_model(tmp_path / "dpm", "cpu")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and scheduler_name(pipe.scheduler) == "dpmpp-2m"
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a room", walk(2), seed=0, **FAST).images.shape == (1, 2, 16, 32, 3)
    with_scheduler_class(tiny_model_dir, tmp_path / "anc", "EulerAncestralDiscreteScheduler", dict(dpm.config))
    assert isinstance(load_model(tmp_path / "anc", "cpu").scheduler, EulerAncestralDiscreteScheduler)
    replaced = load_model(tmp_path / "anc", "cpu", scheduler="ddim")
    assert isinstance(replaced.scheduler, DDIMScheduler)


def test_classes_that_cannot_sample_are_refused_in_one_line_and_a_name_replaces_them(tiny_model_dir, tmp_path):
    base = dict(default_scheduler().config)
    with_scheduler_class(tiny_model_dir, tmp_path / "gone", "FancyNewScheduler", base)
    with pytest.raises(ValueError, match=r"^scheduler: the model names 'FancyNewScheduler', which diffusers "
                                         r"[\d.]+ does not have; choose a sampler by name with --scheduler") as err:
        load_model(tmp_path / "gone", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="FancyNewScheduler"):
        check_model(str(tmp_path / "gone"))
    check_model(str(tmp_path / "gone"), own_scheduler=False)
    assert isinstance(load_model(tmp_path / "gone", "cpu", scheduler="ddim").scheduler, DDIMScheduler)
    with_scheduler_class(tiny_model_dir, tmp_path / "lcm", "LCMScheduler", base)
    assert type(load_model(tmp_path / "lcm", "cpu").scheduler).__name__ == "LCMScheduler"  # any diffusers class
    with pytest.raises(ValueError, match="the model's LCMScheduler cannot sample tours"):
        check_model(str(tmp_path / "lcm"))
    if importlib.util.find_spec("torchsde") is None:  # diffusers' dummy class: the extra package is missing
        with pytest.raises(ValueError, match="DPMSolverSDEScheduler cannot be built here .*torchsde"):
            scheduler_from_class("DPMSolverSDEScheduler", base)
    else:
        with pytest.raises(ValueError, match="DPMSolverSDEScheduler cannot sample tours .*depend on its batch"):
            check_samplable(scheduler_from_class("DPMSolverSDEScheduler", base))
