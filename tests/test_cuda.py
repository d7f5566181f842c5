"""On a CUDA device: the Triton EA kernels against the CPU oracle, a bundled-model tour, compiled training steps.

Deselected by default (marker `cuda`); `pytest -m cuda` runs them, and bench/gpu_suite.py does so on a lent GPU.
Without a CUDA device they fail, rather than skip, so that a GPU run that lost its GPU cannot pass unnoticed.
"""

from __future__ import annotations

import copy
import csv
import logging
import math

import numpy as np
import pytest
import torch
from test_epipolar_ops import BF16_FWD_RTOL, BF16_GRAD_RTOL, random_block, relative

from diffpano.geometry.trajectories import walk
from diffpano.ops.reference import reference_forward

pytestmark = pytest.mark.cuda

CUDA_FP32_RTOL = 1e-4  # Triton's fp32 arithmetic and atomic sums in another order than the CPU's oracle
PROMPT = "A kitchen with white walls."


@pytest.fixture(scope="module", autouse=True)
def cuda_device() -> torch.device:
    """The CUDA device; without one every test of this module errors, loudly."""
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need a CUDA device (torch.cuda.is_available() is False)", pytrace=False)
    return torch.device("cuda")


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls and convolutions on CUDA for the duration of a test (TF32 keeps 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def triton_against_oracle(k: int, s: int, dtype: torch.dtype, views: int = 5) -> tuple[float, float]:
    """Relative errors of the Triton forward's EA contribution and of every gradient against the fp32 CPU oracle."""
    adapter, block = random_block(num_ref_views=k, num_samples=s)
    poses = walk(views, spacing=1.2, turn_deg=40).unsqueeze(0)
    x = torch.randn(2 * views, 64, 8, 16)  # two copies (classifier-free guidance) of the views
    xr = x.clone().requires_grad_()
    want = reference_forward(block, xr, adapter.context(poses))
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [xr, *block.parameters()], grad_out)
    gpu = copy.deepcopy(adapter).to("cuda")
    fused = gpu.blocks["x"].to(dtype)
    xf = x.clone().to("cuda", dtype).requires_grad_()
    got = fused(xf, gpu.context(poses), backend="triton")
    got_grads = torch.autograd.grad(got, [xf, *fused.parameters()], grad_out.to("cuda", dtype))
    fwd = relative((got - xf).cpu(), want - xr)
    return fwd, max(relative(g.cpu(), w) for g, w in zip(got_grads, want_grads, strict=True))


@pytest.mark.parametrize("k,s", [(1, 1), (2, 8), (4, 16)])
def test_triton_kernels_match_the_oracle_in_fp32(no_tf32, k, s):
    fwd, grad = triton_against_oracle(k, s, torch.float32)
    assert fwd < CUDA_FP32_RTOL and grad < CUDA_FP32_RTOL, (fwd, grad)


def test_triton_kernels_stay_within_the_bf16_tolerance(no_tf32):
    fwd, grad = triton_against_oracle(2, 8, torch.bfloat16)
    assert fwd < BF16_FWD_RTOL and grad < BF16_GRAD_RTOL, (fwd, grad)


def test_the_ea_backend_on_cuda_is_triton():
    from diffpano.ops.op import default_backend

    assert default_backend(torch.device("cuda"), head_dim=32) == "triton"


@pytest.fixture(scope="module")
def bundled_cuda():
    """The bundled model on CUDA in its default dtype (bf16 where supported)."""
    from diffpano.pipelines.loading import resolve_model

    pipe = resolve_model(None, "cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_model_generates_a_4_view_tour_on_cuda(bundled_cuda):
    assert bundled_cuda.device.type == "cuda" and not bundled_cuda.model_name.startswith("tiny-random")
    out = bundled_cuda([PROMPT] * 4, walk(4), num_inference_steps=4, seed=0)
    assert out.images.shape == (1, 4, 128, 256, 3) and out.images.dtype == np.uint8
    assert out.images.std() > 10  # not blank
    latents = bundled_cuda([PROMPT] * 4, walk(4), num_inference_steps=4, seed=0, output_type="latent").images
    assert tuple(latents.shape) == (1, 4, 4, 32, 64) and latents.device.type == "cuda"
    assert torch.isfinite(latents.float()).all()


def test_bundled_tour_on_cuda_in_fp32_matches_the_cpu(no_tf32):
    """The same seeds draw the same noise (CPU generators), so fp32 tours agree across devices up to rounding."""
    from diffpano.pipelines.loading import resolve_model

    tours = {}
    for device in ("cpu", "cuda"):
        pipe = resolve_model(None, device, torch.float32)
        pipe.set_progress_bar_config(disable=True)
        tours[device] = pipe([PROMPT] * 4, walk(4), num_inference_steps=4, seed=0).images.astype(np.float32)
    assert np.abs(tours["cuda"] - tours["cpu"]).mean() < 3.0  # of 255


def test_both_training_stages_take_compiled_steps_on_cuda(train_dataset, tmp_path, caplog):
    """One stage-1 and one stage-2 step with optim.compile=default, in this process on CUDA, without falling back."""
    from trainer.config import load_config
    from trainer.run import train

    cfg = load_config("trainer/configs/tiny.yaml", [
        f"data.dataset={train_dataset}", "data.size=[32, 64]", "scaling.num_workers=0", "stage1.steps=1",
        "stage2.steps=1", "optim.compile=default", "run.sample_steps=1", "run.max_failures=0"])
    with caplog.at_level(logging.WARNING, logger="diffpano.pipelines.compiling"):
        results = train(cfg, [1, 2], "cuda", str(tmp_path), local_device="cuda")
    assert [(r.stage, r.steps) for r in results] == [(1, 1), (2, 1)]
    assert all(r.loss is not None and math.isfinite(r.loss) for r in results), results
    assert not [r.getMessage() for r in caplog.records if r.name == "diffpano.pipelines.compiling"]
    for stage in (1, 2):
        rows = list(csv.DictReader((tmp_path / "cuda" / "logs" / f"stage{stage}" / "metrics.csv").open()))
        assert rows and all(math.isfinite(float(r["loss"])) for r in rows)
    assert (tmp_path / "cuda" / "model" / "model_index.json").exists()


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def test_training_steps_never_wait_for_the_gpu(train_dataset, tmp_path):
    """Under the profiler, the steps that neither log nor checkpoint make no synchronising CUDA call (stages 1, 2)."""
    from trainer.config import load_config
    from trainer.run import train
    from trainer.skeleton import STEP_RANGE

    cfg = load_config("trainer/configs/tiny.yaml", [
        f"data.dataset={train_dataset}", "data.size=[32, 64]", "scaling.num_workers=0", "stage1.steps=6",
        "stage2.steps=6", "run.log_every=100", "run.checkpoint_every=100", "run.sample_steps=1",
        "run.max_failures=0", "optim.min_snr_gamma=5.0", "stage1.ema.enabled=true"])
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        train(cfg, [1, 2], "nosync", str(tmp_path), local_device="cuda")
    events = prof.events()
    steps = sorted((e.time_range for e in events if e.name == STEP_RANGE), key=lambda r: r.start)
    assert len(steps) == 12
    quiet = steps[1:5] + steps[7:11]  # not the first (caches, compile) nor the last of a stage (it logs)
    syncs = [e.name for e in events if any(name in e.name for name in SYNC_CALLS)
             and any(s.start <= e.time_range.start <= s.end for s in quiet)]
    assert not syncs, syncs[:10]
