"""PanoPipeline and MultiViewPanoPipeline: reproducibility, tours, conditioning, model directories, bad input."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import torch

from diffpano import MultiViewPanoPipeline, PanoPipeline
from diffpano.defaults import WINDOW_VIEWS
from diffpano.geometry.trajectories import orbit, walk
from diffpano.pipelines.loading import load_model, save_model

SIZE = dict(height=16, width=32)
FAST = dict(num_inference_steps=3, guidance_scale=3.0, **SIZE)


def tour(pipe, n=3, seed=0, **kw):
    """Images (N, H, W, 3) of one tour."""
    args = FAST | kw
    return pipe("a blue bedroom", walk(n, spacing=0.8), seed=seed, **args).images[0]


def test_same_seed_same_images_different_seed_different(tiny_pipe):
    a, b, c = tour(tiny_pipe, seed=3), tour(tiny_pipe, seed=3), tour(tiny_pipe, seed=4)
    assert a.shape == (3, 16, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_batched_tours_match_tours_generated_alone(tiny_pipe):
    alone = [tour(tiny_pipe, seed=s) for s in (7, 8)]
    both = tiny_pipe(
        [["a blue bedroom"] * 3] * 2, torch.stack([walk(3, spacing=0.8)] * 2), seed=[7, 8], **FAST
    ).images
    for i in range(2):
        assert np.abs(both[i].astype(int) - alone[i].astype(int)).max() <= 1


def test_prompt_changes_the_output(tiny_pipe):
    a = tiny_pipe("a red kitchen", walk(2), seed=0, **FAST).images
    b = tiny_pipe("a green office", walk(2), seed=0, **FAST).images
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5


def test_epipolar_switch_changes_only_the_multi_view_coupling(tiny_pipe):
    with_ea, without = tour(tiny_pipe, n=3), tour(tiny_pipe, n=3, use_epipolar=False)
    assert np.abs(with_ea.astype(int) - without.astype(int)).mean() > 0.5
    single = [tiny_pipe("a blue bedroom", walk(3, spacing=0.8)[i : i + 1], seed=0, **FAST).images[0, 0]
              for i in range(3)]
    # without EA each view is denoised alone: equal to generating the view by itself with the same noise
    noise_first = single[0]
    assert np.abs(without[0].astype(int) - noise_first.astype(int)).max() <= 1


def test_epipolar_off_equals_a_model_without_ea_modules(tiny_pipe):
    from diffpano.pipelines.factory import build_tiny_pipeline

    bare = build_tiny_pipeline(latent=False, seed=0)  # the same weights; its EA modules are zero-initialised
    bare.set_progress_bar_config(disable=True)
    assert np.array_equal(tour(tiny_pipe, use_epipolar=False), tour(bare))
    assert not np.array_equal(tour(tiny_pipe), tour(bare))


def test_ancestral_sampler_same_seed_same_tour_and_batching_changes_nothing(tiny_pipe):
    a, b, other = (tour(tiny_pipe, seed=s, scheduler="euler-a") for s in (7, 7, 8))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 1
    both = tiny_pipe([["a blue bedroom"] * 3] * 2, torch.stack([walk(3, spacing=0.8)] * 2), seed=[8, 7],
                     scheduler="euler-a", **FAST).images
    assert np.abs(both[1].astype(int) - a.astype(int)).max() <= 1
    assert np.abs(both[0].astype(int) - other.astype(int)).max() <= 1


def test_ancestral_sampler_windows_of_a_long_tour_are_batch_independent(tiny_pipe):
    args = dict(scheduler="euler-a", window_views=3, window_context=1) | FAST
    alone = tiny_pipe("a red bedroom", walk(5), seed=3, **args).images[0]
    both = tiny_pipe([["a red bedroom"] * 5, ["a green office"] * 5], torch.stack([walk(5)] * 2), seed=[3, 4],
                     **args).images
    assert np.abs(both[0].astype(int) - alone.astype(int)).max() <= 1


def test_generator_is_the_same_as_its_seed(tiny_pipe):
    by_seed = tour(tiny_pipe, seed=5, scheduler="euler-a")
    out = tiny_pipe("a blue bedroom", walk(3, spacing=0.8), generator=torch.Generator().manual_seed(5),
                    scheduler="euler-a", **FAST)
    assert np.array_equal(out.images[0], by_seed) and out.seeds == [5]
    poses = torch.stack([walk(3, spacing=0.8)] * 2)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    listed = tiny_pipe([["a blue bedroom"] * 3] * 2, poses, generator=gens, **FAST)
    seeded = tiny_pipe([["a blue bedroom"] * 3] * 2, poses, seed=[5, 6], **FAST)
    assert np.array_equal(listed.images, seeded.images) and listed.seeds == [5, 6]


def test_ddim_eta_adds_reproducible_noise(tiny_pipe):
    plain, noisy = tour(tiny_pipe, seed=2, scheduler="ddim"), tour(tiny_pipe, seed=2, scheduler="ddim", eta=1.0)
    assert np.abs(plain.astype(int) - noisy.astype(int)).mean() > 0.5
    assert np.array_equal(noisy, tour(tiny_pipe, seed=2, scheduler="ddim", eta=1.0))


def test_output_types_and_tuples(tiny_latent_pipe):
    pipe, poses = tiny_latent_pipe, walk(2)
    images = pipe("a room", poses, seed=0, **FAST).images
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape == (1, 2, 16, 32, 3)
    pil = pipe("a room", poses, seed=0, output_type="pil", **FAST).images
    assert len(pil) == 1 and len(pil[0]) == 2 and pil[0][1].size == (32, 16)
    assert np.array_equal(np.asarray(pil[0][1]), images[0, 1])
    latent = pipe("a room", poses, seed=0, output_type="latent", **FAST).images
    f = pipe.vae_factor
    assert isinstance(latent, torch.Tensor) and latent.shape == (1, 2, pipe.unet.config.in_channels, 16 // f, 32 // f)
    assert np.array_equal(pipe._postprocess(latent, "np"), images)
    tup = pipe("a room", poses, seed=0, return_dict=False, **FAST)
    assert isinstance(tup, tuple) and np.array_equal(tup[0], images) and tup[3] == [0]
    pano = PanoPipeline(pipe.unet, pipe.scheduler, pipe.text_encoder, pipe.tokenizer, vae=pipe.vae)
    pano.set_progress_bar_config(disable=True)
    assert pano(["a", "b"], seed=0, **FAST).images.shape == (2, 16, 32, 3)
    assert [im.size for im in pano(["a", "b"], seed=0, output_type="pil", **FAST).images] == [(32, 16)] * 2
    assert pano("a", seed=0, output_type="latent", **FAST).images.shape == (1, latent.shape[2], 16 // f, 32 // f)
    (only,) = pano("a", seed=0, return_dict=False, **FAST)
    assert only.shape == (1, 16, 32, 3)


def test_single_view_pipeline(tiny_pipe):
    pano = PanoPipeline(tiny_pipe.unet, tiny_pipe.scheduler, tiny_pipe.text_encoder, tiny_pipe.tokenizer)
    pano.set_progress_bar_config(disable=True)
    out = pano(["a white bathroom", "a black office"], seed=1, **FAST).images
    assert out.shape == (2, 16, 32, 3)
    assert np.array_equal(out, pano(["a white bathroom", "a black office"], seed=1, **FAST).images)


def test_long_tour_in_windows(tiny_pipe):
    prompts = ["a red bedroom"] * 3 + ["a blue kitchen"] * 4  # room switching: one prompt per view
    out = tiny_pipe(prompts, walk(7), seed=0, window_views=3, window_context=1, **FAST)
    assert out.images.shape == (1, 7, 16, 32, 3) and out.prompts[0] == prompts
    plan = tiny_pipe._plan_windows(walk(7).unsqueeze(0), torch.zeros(7, dtype=torch.bool), 3, 1)
    assert [idx.shape[1] for idx, _ in plan] == [3, 3, 3] and [c for _, c in plan] == [0, 1, 1]
    new_views = sorted(int(i) for idx, c in plan for i in idx[0, c:])
    assert new_views == list(range(7))  # every view generated exactly once


def test_a_closed_loop_fits_one_window_and_longer_loops_attend_to_their_first_views(tiny_pipe):
    done = torch.zeros(24, dtype=torch.bool)
    plan = tiny_pipe._plan_windows(orbit(16).unsqueeze(0), done[:16], WINDOW_VIEWS, WINDOW_VIEWS // 2)
    assert WINDOW_VIEWS >= 16 and len(plan) == 1  # a 16-view orbit is denoised jointly: its last view meets its first
    plan = tiny_pipe._plan_windows(orbit(24).unsqueeze(0), done, 8, 4)
    last, n_ctx = plan[-1]
    assert 23 in last[0, n_ctx:].tolist() and {0, 1} & set(last[0, :n_ctx].tolist())  # the loop closes in context


def test_image_conditioned_views_are_kept_and_steer_the_rest(tiny_pipe):
    base = tour(tiny_pipe, n=3, seed=1)
    given = np.zeros_like(base[0])
    given[..., 0] = 255
    out = tiny_pipe("a blue bedroom", walk(3, spacing=0.8), seed=1, known_views={0: given}, **FAST).images[0]
    assert np.array_equal(out[0], given)
    assert np.abs(out[1:].astype(int) - base[1:].astype(int)).mean() > 0.1
    with pytest.raises(ValueError, match="known_views"):
        tiny_pipe("x", walk(3), known_views={5: given}, **FAST)
    with pytest.raises(ValueError, match=r"known_views\[0\]"):
        tiny_pipe("x", walk(3), known_views={0: given[:8]}, **FAST)


@pytest.mark.parametrize("output_type", ["np", "pil"])
def test_a_known_view_comes_back_exactly_as_given_through_a_vae(tiny_latent_pipe, output_type):
    """A latent model encodes the given view and would decode something close to it; the tour returns the given
    pixels themselves."""
    given = np.random.default_rng(3).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    out = tiny_latent_pipe("a room", walk(3), seed=0, known_views={2: given}, output_type=output_type, **FAST).images
    views = out[0] if output_type == "np" else [np.asarray(view) for view in out[0]]
    assert np.array_equal(views[2], given)
    decoded = tiny_latent_pipe("a room", walk(3), seed=0, known_views={2: given}, output_type="latent", **FAST).images
    assert not np.array_equal(tiny_latent_pipe._decode(decoded[0, 2:3])[0], given)  # what a decoding would give


def test_latent_pipeline_save_load_round_trip(tiny_latent_pipe, tmp_path):
    before = tour(tiny_latent_pipe, n=2)
    save_model(tiny_latent_pipe, str(tmp_path / "m"))
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "epipolar"} <= {
        p.name for p in (tmp_path / "m").iterdir()}
    assert (tmp_path / "m" / "epipolar" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_model(tmp_path / "m", device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(before, tour(loaded, n=2))


def test_model_directory_round_trip(tiny_pipe, tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "MultiViewPanoPipeline" and index["epipolar"][1] == "EpipolarAdapter"
    loaded = load_model(tiny_model_dir, device="cpu")
    loaded.set_progress_bar_config(disable=True)
    expected = tour(tiny_pipe)
    assert np.array_equal(expected, tour(loaded))
    assert loaded.model_name.startswith("tiny@")
    native = MultiViewPanoPipeline.from_pretrained(tiny_model_dir)  # diffusers' own loader reads it too
    native.set_progress_bar_config(disable=True)
    assert np.array_equal(expected, tour(native))


def test_directory_without_epipolar_modules_loads_as_single_view(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "sd-like"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "epipolar")
    pipe = load_model(copy, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert np.array_equal(tour(pipe), tour(pipe, use_epipolar=False))  # fresh EA modules are zero-initialised


KEY = "blocks.up_blocks_0_attentions_0.to_out.weight"


def test_s3_round_trip(tiny_pipe, s3_endpoint, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("DIFFPANO_CACHE", str(tmp_path / "cache"))
    uri = "s3://diffpano-test/models/tiny"
    save_model(tiny_pipe, uri)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="diffpano-test")["Contents"]]
    assert "models/tiny/model_index.json" in keys and "models/tiny/unet/diffusion_pytorch_model.safetensors" in keys
    loaded = load_model(uri, device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(tour(tiny_pipe), tour(loaded))
    changed = copy.deepcopy(tiny_pipe)
    torch.nn.init.normal_(next(iter(changed.epipolar.blocks.values())).to_out.weight, std=0.5)
    time.sleep(1.1)  # S3's LastModified counts whole seconds
    save_model(changed, uri)  # new weights at the same URI, same model_index.json: not the cached download
    reloaded = load_model(uri, device="cpu")
    assert torch.equal(reloaded.epipolar.state_dict()[KEY], changed.epipolar.state_dict()[KEY])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(height=16, width=48), "width = 2"),
        (dict(height=18, width=36), "multiples of 4"),
        (dict(prompt=["a", "b"]), "prompt: got 2 prompts for 3 views"),
        (dict(poses=[[1.0] * 16] * 3), "poses"),
        (dict(num_ref_views=0), "num_ref_views"),
        (dict(num_samples=100), "num_samples"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(seed=-1), "seed"),
        (dict(window_views=2, window_context=2), "window"),
        (dict(scheduler="plms"), "scheduler"),
        (dict(seed=1, generator=torch.Generator().manual_seed(1)), "seed/generator"),
        (dict(generator=[torch.Generator()] * 2), "generator: got 2"),
        (dict(output_type="pt"), "output_type"),
        (dict(eta=-1.0), "eta"),
    ],
)
def test_bad_input_names_the_field(tiny_pipe, kwargs, field):
    args = dict(prompt="a room", poses=walk(3)) | FAST | kwargs
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        tiny_pipe(**args)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model"):
        load_model(tmp_path / "nothing")


@pytest.mark.slow
def test_sd15_shaped_unet_runs_one_multiview_forward_pass():
    from diffusers import UNet2DConditionModel

    from diffpano.models.epipolar import EpipolarAdapter, epipolar_kwargs
    from diffpano.models.seamless import make_seamless
    from diffpano.pipelines.factory import sd_unet_config

    unet = make_seamless(UNet2DConditionModel(**sd_unet_config("1.5")).eval())
    adapter = EpipolarAdapter.for_unet(unet)
    assert [t.split(".")[1] for t in adapter.config.targets] == ["2"] * 3 + ["3"] * 3  # the two highest-res blocks
    adapter.attach(unet)
    ea = epipolar_kwargs(adapter.context(walk(2).unsqueeze(0)))
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 32, 64), 500, encoder_hidden_states=torch.randn(2, 77, 768),
                   cross_attention_kwargs=ea).sample
    assert out.shape == (2, 4, 32, 64) and torch.isfinite(out).all()


def test_given_latents_replace_the_seeded_noise(tiny_pipe):
    """latents= equal to the noise a seed draws give that seed's tour; other latents another; bad ones are refused."""
    c = tiny_pipe.unet.config.in_channels
    noise = torch.randn((3, c, 16, 32), generator=torch.Generator().manual_seed(4))
    assert np.array_equal(tour(tiny_pipe, seed=4, latents=noise), tour(tiny_pipe, seed=4))
    assert np.abs(tour(tiny_pipe, seed=4, latents=noise.flip(-1)).astype(int) - tour(tiny_pipe, seed=4)).mean() > 1
    with pytest.raises(ValueError, match=r"latents: expected a tensor of shape \(1, 3, 3, 16, 32\)"):
        tour(tiny_pipe, latents=noise[:2])
    with pytest.raises(ValueError, match="latents: must be finite"):
        tour(tiny_pipe, latents=torch.full_like(noise, float("nan")))


def test_callback_on_step_end_sees_every_unet_call_and_may_replace_the_latents(tiny_pipe):
    """diffusers' callback convention, over the windows of a long tour: steps 0..T-1 in order, the window's latents."""
    seen = []

    def record(pipe, step, t, kwargs):
        seen.append((step, tuple(kwargs["latents"].shape)))
        return {}

    tiny_pipe("a room", walk(5), seed=0, window_views=3, window_context=1, callback_on_step_end=record, **FAST)
    windows = len(MultiViewPanoPipeline._plan_windows(walk(5)[None].double(), torch.zeros(5, dtype=torch.bool), 3, 1))
    assert [s for s, _ in seen] == list(range(windows * 3)) and windows == 2
    assert {shape for _, shape in seen} == {(1, 3, 3, 16, 32)}
    zeroed = tiny_pipe("a room", walk(2), seed=0, output_type="latent", **FAST, callback_on_step_end=lambda p, i, t, kw:
                       {"latents": torch.zeros_like(kw["latents"])} if i == FAST["num_inference_steps"] - 1 else {})
    assert zeroed.images.abs().max() == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs: only 'latents' and"):
        tiny_pipe("a room", walk(2), seed=0, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["eps"],
                  **FAST)
    with pytest.raises(ValueError, match="callback_on_step_end: returned latents of shape"):
        tiny_pipe("a room", walk(2), seed=0, callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros(1)},
                  **FAST)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m", "euler", "unipc"])
def test_step_callbacks_see_the_clean_estimate_closing_in_on_the_result(tiny_pipe, scheduler):
    """pred_original_sample (the scheduler's own, or from the noise prediction) moves towards the final latents, and
    num_timesteps tells the callback the total; preview decodes one view of it."""
    estimates = []

    def record(pipe, step, t, kwargs):
        estimates.append((pipe.num_timesteps, kwargs["pred_original_sample"][0, 0].clone()))
        noisy.append(kwargs["latents"][0, 0].clone())
        return {}

    noisy = []
    final = tiny_pipe("a room", walk(2), seed=0, output_type="latent", scheduler=scheduler,
                      callback_on_step_end=record,
                      callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
                      **(FAST | {"num_inference_steps": 8})).images[0, 0]
    gaps = [float((x0 - final).norm() / final.norm()) for _, x0 in estimates]
    assert gaps[0] < 0.8 * float((noisy[0] - final).norm() / final.norm()), scheduler  # closer than the noisy latents
    assert {total for total, _ in estimates} == {tiny_pipe.num_timesteps} and len(estimates) == tiny_pipe.num_timesteps
    assert gaps[-1] < 0.01 and gaps[-1] < gaps[len(gaps) // 2] < gaps[0] and gaps[-1] < 0.1 * gaps[0], gaps
    image = tiny_pipe.preview(estimates[-1][1])
    assert image.dtype == np.uint8 and image.shape == (SIZE["height"], SIZE["width"], 3)


def test_inputs_are_checked_before_any_model_work(tiny_pipe):
    """check_inputs, sampling and known-view checks run before the text encoder, VAE or UNet sees anything."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (tiny_pipe.text_encoder, tiny_pipe.unet)]
    try:
        for bad, field in ((dict(num_ref_views=99), "num_ref_views"), (dict(window_views=2, window_context=2),
                           "window_views"), (dict(known_views={0: np.zeros((8, 8, 3), np.uint8)}), "known_views"),
                           (dict(num_inference_steps=0), "num_inference_steps"), (dict(height=18), "height")):
            with pytest.raises(ValueError, match=field):
                tiny_pipe("a room", walk(2), seed=0, **FAST | bad)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_known_views_follow_the_schedulers_noising_and_leave_unrelated_views_alone(tiny_pipe):
    """Oracles for image conditioning: at every step the UNet sees a known view as add_noise(clean, its own initial
    noise, t) (not the clean image), and with EA off the other views are exactly what they are without it."""
    from diffusers import DDIMScheduler

    given = np.zeros((16, 32, 3), np.uint8)
    given[:, :16] = (200, 30, 30)
    args = dict(seed=6, use_epipolar=False, scheduler="ddim") | FAST
    inputs = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, a, kw: inputs.append((a[0].clone(), a[1])),
                                                    with_kwargs=True)
    try:
        out = tiny_pipe("a room", walk(3), known_views={1: given}, **args).images[0]
    finally:
        hook.remove()
    plain = tiny_pipe("a room", walk(3), **args).images[0]
    assert np.array_equal(out[[0, 2]], plain[[0, 2]]) and np.array_equal(out[1], given)
    noise = torch.randn((3, 3, 16, 32), generator=torch.Generator().manual_seed(6))[1]
    clean = torch.from_numpy(given).permute(2, 0, 1).float() / 127.5 - 1
    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(FAST["num_inference_steps"])
    assert [int(t) for _, t in inputs] == [int(t) for t in sched.timesteps]
    for (sample, _), t in zip(inputs, sched.timesteps, strict=True):
        expected = sched.add_noise(clean[None], noise[None], t[None])[0]
        for half in sample.chunk(2):  # classifier-free guidance: the unconditional and conditional copies
            torch.testing.assert_close(half[1], expected, rtol=1e-5, atol=1e-5)
