"""torch.compile paths: the same results as eager, an eager fallback, no graph break at the EA operator, and a
training step that never reads values back from the device."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from diffpano.geometry.trajectories import walk
from diffpano.models.epipolar import EpipolarAttention, epipolar_kwargs
from diffpano.ops.op import epipolar_attention
from diffpano.pipelines.compiling import check_mode, compile_module, compile_pipeline, is_compiled, uncompile_module
from diffpano.pipelines.factory import build_tiny_pipeline
from trainer.config import load_config
from trainer.run import train

CONFIG = "trainer/configs/tiny.yaml"


def test_modes_are_checked_and_compiling_is_undone():
    """An unknown mode names the rule; `off` leaves forward alone; uncompile restores the module's own forward."""
    with pytest.raises(ValueError, match="compile: unknown mode 'fast'"):
        check_mode("fast")
    assert load_config(CONFIG, ["optim.compile=off"]).optim.compile == "off"  # YAML reads a bare off as false
    with pytest.raises(ValueError, match="optim.compile"):
        load_config(CONFIG, ["optim.compile=fast"])
    layer = nn.Linear(4, 4)
    assert not is_compiled(compile_module(layer, "off"))
    assert is_compiled(compile_module(layer, "default"))
    assert not is_compiled(uncompile_module(layer)) and "forward" not in layer.__dict__


def test_a_failed_compile_warns_once_and_runs_eagerly(caplog):
    """With no usable C++ compiler, inductor fails; the module still answers, eagerly, with one warning."""
    torch._dynamo.reset()
    layer = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    expected = layer(x)
    compile_module(layer, "default")
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), caplog.at_level(logging.WARNING):
        first, second = layer(x), layer(x)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    warnings = [r for r in caplog.records if "torch.compile (mode default) failed" in r.getMessage()]
    assert len(warnings) == 1 and not is_compiled(layer)
    torch._dynamo.reset()


def test_the_ea_operator_traces_into_one_graph_with_its_gradients():
    """fullgraph=True: the fused CPU operator is one opaque op (no graph break), forward and backward as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = EpipolarAttention(32, 2, 16, 36, 4)
    nn.init.normal_(module.to_out.weight, std=0.1)
    pipe = build_tiny_pipeline()
    ctx = pipe.epipolar.context(torch.as_tensor(walk(3, spacing=0.5), dtype=torch.float32)[None])
    x = torch.randn(6, 32, 8, 16, requires_grad=True)

    def run(inputs: torch.Tensor) -> torch.Tensor:
        return module(inputs, ctx, "cpu")

    ctx.table(8, 16)
    eager = run(x)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)(x)
    (gx_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_compiled, gx_eager, rtol=1e-4, atol=1e-5)
    assert torch.ops.diffpano.ea_forward.default is not None and epipolar_attention  # the registered op ran
    torch._dynamo.reset()


def test_channels_last_inputs_give_the_same_ea_output():
    """The EA module takes NHWC activations (channels_last training) without copies and returns the same values."""
    torch.manual_seed(1)
    module = EpipolarAttention(32, 2, 16, 36, 4)
    nn.init.normal_(module.to_out.weight, std=0.1)
    pipe = build_tiny_pipeline()
    ctx = pipe.epipolar.context(torch.as_tensor(walk(3, spacing=0.5), dtype=torch.float32)[None])
    x = torch.randn(6, 32, 8, 16)
    with torch.no_grad():
        plain = module(x, ctx)
        nhwc = module(x.contiguous(memory_format=torch.channels_last), ctx)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, plain, rtol=1e-5, atol=1e-5)


def test_prepare_fills_every_table_and_code_the_unet_reads():
    """After prepare, a UNet call with the EA context adds nothing to its caches (a compiled UNet traces none)."""
    pipe = build_tiny_pipeline()
    for block in pipe.epipolar.blocks.values():
        nn.init.normal_(block.to_out.weight, std=0.1)
    ctx = pipe.epipolar.context(torch.as_tensor(walk(4, spacing=0.5), dtype=torch.float32)[None])
    unet = pipe.unet
    x = torch.randn(4, unet.config.in_channels, 32, 64)
    emb = torch.randn(4, 8, unet.config.cross_attention_dim)
    with torch.no_grad():
        pipe.epipolar.prepare(ctx, unet, 32, 64, torch.float32)
        ready = set(ctx._cache)
        with_ea = unet(x, torch.tensor(500), encoder_hidden_states=emb, cross_attention_kwargs=epipolar_kwargs(ctx))
        without = unet(x, torch.tensor(500), encoder_hidden_states=emb)
    assert set(ctx._cache) == ready and len(ready) > len(pipe.epipolar.blocks)
    assert (with_ea.sample - without.sample).abs().max() > 1e-4  # the EA modules did read them


class ReadBacks(TorchDispatchMode):
    """Records the Python stack of every scalar read from a tensor (on a GPU, a wait for the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.stacks: list[list[tuple[str, str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.stacks.append([(Path(f.filename).name, f.name) for f in traceback.extract_stack()])
        return func(*args, **(kwargs or {}))


# Reads that stay on the host with a GPU too: the sampler's indices and the batch's poses, checked before the copy;
# the fused AdamW kernel reads its step counts where they live (on CUDA, on the device, inside the kernel).
HOST_READS = {("skeleton.py", "_open"), ("spherical.py", "validate_poses"), ("adamw.py", "_fused_adamw")}
STEP_FRAMES = {("skeleton.py", "accumulate"), ("skeleton.py", "step")}


def test_a_training_step_reads_nothing_back_from_the_device(train_dataset, tmp_path):
    """No optimiser step of stage 1 or 2 reads a value back (.item(), bool, float) but those that stay on the host;
    the losses and gradient norms are read only on the steps that log."""
    cfg = load_config(CONFIG, [f"data.dataset={train_dataset}", "scaling.num_workers=0", "stage1.steps=3",
                               "stage2.steps=3", "run.log_every=100", "run.checkpoint_every=100",
                               "optim.min_snr_gamma=5.0", "stage1.ema.enabled=true"])
    with ReadBacks() as reads:
        train(cfg, [1, 2], "nosync", str(tmp_path), local_device="cpu")
    in_steps = [stack for stack in reads.stacks if STEP_FRAMES & set(stack)]
    allowed = [stack for stack in in_steps if HOST_READS & set(stack)]
    assert allowed and len(reads.stacks) > len(in_steps)  # it saw host reads in steps, and the logging reads outside
    unexpected = [" <- ".join(f"{f}:{n}" for f, n in stack[-4:]) for stack in in_steps if stack not in allowed]
    assert not unexpected, unexpected[:5]


@pytest.mark.slow
def test_a_compiled_tour_matches_the_eager_tour():
    """The tiny latent pipeline with its UNet compiled by inductor: the same tour, no graph break in the UNet."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pipe = build_tiny_pipeline(latent=True)
    pipe.set_progress_bar_config(disable=True)
    for block in pipe.epipolar.blocks.values():
        nn.init.normal_(block.to_out.weight, std=0.1)

    def tour() -> torch.Tensor:
        out = pipe("a bedroom", walk(4, spacing=0.5), height=32, width=64, num_inference_steps=3, seed=0,
                   output_type="latent")
        return torch.as_tensor(out.images)

    eager = tour()
    compile_pipeline(pipe, "default")
    compiled = tour()
    assert is_compiled(pipe.unet)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2e-3)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_channels_last_training_matches_eager(train_dataset, tmp_path):
    """Stages 1 and 2 with optim.compile=default and channels_last log the same losses as eager training."""
    torch._dynamo.reset()
    losses = {}
    for name, sets in (("eager", []), ("compiled", ["optim.compile=default", "optim.channels_last=true"])):
        cfg = load_config(CONFIG, [f"data.dataset={train_dataset}", "scaling.num_workers=0", "stage1.steps=3",
                                   "stage2.steps=3", "run.log_every=1", *sets])
        train(cfg, [1, 2], name, str(tmp_path), local_device="cpu")
        losses[name] = [
            [float(line.split(",")[1]) for line in (tmp_path / name / "logs" / f"stage{k}" / "metrics.csv")
             .read_text().splitlines()[1:]]
            for k in (1, 2)
        ]
    np.testing.assert_allclose(np.array(losses["compiled"]), np.array(losses["eager"]), rtol=1e-3)
    torch._dynamo.reset()
