"""Stage-1 LoRA through peft: only adapters train, the seam stays closed, merging keeps the function; a LoRA run
also writes the adapter alone, which diffusers' StableDiffusionPipeline and our load_lora apply to the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from tiny_sd import write_tiny_sd
from torch import nn

from diffpano.models.lora import DEFAULT_LORA_TARGETS, LORA_FILE, add_lora, load_lora, merge_lora
from diffpano.models.seamless import make_seamless
from diffpano.pipelines.factory import build_pipeline, tiny_unet_config


def test_lora_trains_only_adapters_and_merges_into_a_plain_seamless_unet(tmp_path):
    torch.manual_seed(0)
    unet = make_seamless(UNet2DConditionModel(**tiny_unet_config()).eval())
    x, emb = torch.randn(1, 3, 16, 32), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = unet(x, 10, encoder_hidden_states=emb).sample
    params = add_lora(unet, rank=4)
    total = sum(p.numel() for p in unet.parameters())
    assert params and all("lora" in n for n, p in unet.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in params) < 0.1 * total
    with torch.no_grad():
        assert torch.allclose(unet(x, 10, encoder_hidden_states=emb).sample, base)  # LoRA starts as a no-op
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)  # as after some training
        tuned = unet(x, 10, encoder_hidden_states=emb).sample
        rolled = unet(torch.roll(x, 8, -1), 10, encoder_hidden_states=emb).sample
    assert (tuned - base).abs().max() > 1e-4
    assert (rolled - torch.roll(tuned, 8, -1)).abs().max() < 1e-4  # still seamless
    merge_lora(unet)
    assert not any("lora" in n for n in unet.state_dict())
    unet.save_pretrained(tmp_path / "unet")
    reloaded = make_seamless(UNet2DConditionModel.from_pretrained(tmp_path / "unet"))
    with torch.no_grad():
        assert (reloaded(x, 10, encoder_hidden_states=emb).sample - tuned).abs().max() < 1e-4


def test_bad_rank():
    with pytest.raises(ValueError, match="lora_rank"):
        add_lora(UNet2DConditionModel(**tiny_unet_config()), rank=0)


def lora_train(dataset: str, base: Path, runs: Path, name: str, *overrides: str) -> Path:
    """A short stage-1 LoRA run (local, CPU, with an EMA) on a base model; returns the run's folder."""
    from trainer.config import load_config
    from trainer.run import train

    cfg = load_config("trainer/configs/tiny.yaml", [
        f"data.dataset={dataset}", f"model.base={base}", "stage1.steps=3", "stage1.lora_rank=4",
        "stage1.lora_alpha=8", "stage1.lr=0.01", "stage1.ema.enabled=true", "stage1.ema.decay=0.5",
        "scaling.num_workers=0", "run.checkpoint_every=100", *overrides])
    [result] = train(cfg, [1], name, str(runs), local_device="cpu")
    assert result.steps == 3
    return runs / name


@pytest.fixture(scope="module")
def lora_run(train_dataset, tmp_path_factory):
    """A Stable Diffusion 1.x-style directory (its PNDM scheduler included), and a stage-1 LoRA run on it."""
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_sd(root / "sd", "PNDMScheduler")
    return base, lora_train(train_dataset, base, root / "runs", "lora")


def _projection(key: str) -> str:
    """The attention projection a UNet weight key belongs to ('...attn1.to_out.0.weight' -> 'to_out.0')."""
    name = key.removesuffix(".weight")
    return "to_out.0" if name.endswith("to_out.0") else name.rsplit(".", 1)[-1]


def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    """The projections whose weights differ between two UNets."""
    w0, w1 = before.state_dict(), after.state_dict()
    return {_projection(k) for k in w0 if not torch.equal(w0[k], w1[k])}


def _unet_out(unet: nn.Module) -> torch.Tensor:
    """The UNet's output on a fixed latent input (seamless, as DiffPano runs every UNet)."""
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return make_seamless(unet.eval())(x, torch.tensor([10, 700]), encoder_hidden_states=emb).sample


def test_stage1_lora_is_a_diffusers_file_that_diffusers_and_load_lora_apply(lora_run):
    from diffusers import StableDiffusionPipeline

    from diffpano.pipelines.loading import load_model

    base, run = lora_run
    assert (run / "lora" / LORA_FILE).is_file()
    export = load_model(run / "stage1-model", "cpu")  # the LoRA merged; the base's PNDM scheduler kept
    assert type(export.scheduler).__name__ == "PNDMScheduler"
    merged = _unet_out(export.unet)
    plain = _unet_out(StableDiffusionPipeline.from_pretrained(base).unet)
    sd = StableDiffusionPipeline.from_pretrained(base)
    sd.load_lora_weights(str(run / "lora"))
    loaded = _unet_out(sd.unet)
    ours = load_model(base, "cpu")  # a plain SD directory: fresh (zero, so inactive) EA modules are added
    load_lora(ours, str(run / "lora"))
    assert not any("lora" in k for k in ours.unet.state_dict())  # fused
    fused = _unet_out(ours.unet)
    print(f"max |diffusers+lora - merged export| {(loaded - merged).abs().max():.3g}, "
          f"max |load_lora - merged export| {(fused - merged).abs().max():.3g}, "
          f"LoRA delta {(merged - plain).abs().max():.3g}")
    assert (merged - plain).abs().max() > 1e-3  # the LoRA learned something
    torch.testing.assert_close(loaded, merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, merged, rtol=1e-4, atol=1e-5)
    half = load_model(base, "cpu")
    load_lora(half, str(run / "lora"), scale=0.5)
    w0, w1, w_half = (m.state_dict() for m in (load_model(base, "cpu").unet, ours.unet, half.unet))
    changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert {_projection(k) for k in changed} == set(DEFAULT_LORA_TARGETS) == {"to_v", "to_out.0"}
    for k in changed:  # scale 0.5 adds half the LoRA's weight delta
        torch.testing.assert_close(w_half[k], w0[k] + (w1[k] - w0[k]) / 2, rtol=1e-5, atol=1e-6)


def test_load_lora_from_s3_and_its_errors(lora_run, s3_endpoint, tmp_path):
    from diffpano.io import storage
    from diffpano.pipelines.loading import load_model

    base, run = lora_run
    uri = "s3://diffpano-test/shared/lora"
    storage.copy_tree(str(run / "lora"), uri)
    pipe, local = load_model(base, "cpu"), load_model(base, "cpu")
    load_lora(pipe, uri)
    load_lora(local, str(run / "lora"))
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(local.unet), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"no {LORA_FILE}"):
        load_lora(pipe, str(tmp_path))
    moved = {"down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}  # other attention names
    with pytest.raises(ValueError, match="do not match"):
        load_lora(build_pipeline(tiny_unet_config(4) | moved), str(run / "lora"))
    wider = {"block_out_channels": (32, 48, 64)}  # the same names, other shapes
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(build_pipeline(tiny_unet_config(4) | wider), str(run / "lora"))
    (tmp_path / "bad").mkdir()
    save_file({"text_encoder.x.lora.down.weight": torch.zeros(1, 1)}, tmp_path / "bad" / LORA_FILE)
    with pytest.raises(ValueError, match="do not match"):
        load_lora(pipe, str(tmp_path / "bad"))


def test_generate_applies_a_lora_file_to_a_base_model(lora_run, tmp_path):
    """`diffpano generate --model BASE --lora RUN/lora`: the tour differs from the base's; a folder without the file
    is refused naming --lora."""
    from typer.testing import CliRunner

    from diffpano.cli import build_app
    from diffpano.io import storage
    from diffpano.io.manifest import read_manifest

    base, run = lora_run
    runner, app = CliRunner(), build_app()
    images = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(run / "lora")])):
        out = tmp_path / name
        args = ["generate", "a red room", "--views", "2", "--steps", "2", "--seed", "1", "--model", str(base),
                "--out", str(out), *extra]
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        uris = read_manifest(str(out)).to_pandas().sort_values("view_index").image_uri
        images[name] = [storage.read_bytes(storage.join(str(out), u)) for u in uris]
    assert images["base"] != images["lora"]
    result = runner.invoke(app, ["generate", "x", "--model", str(base), "--lora", str(tmp_path), "--out",
                                 str(tmp_path / "none")])
    assert result.exit_code == 2 and "--lora" in result.output and not (tmp_path / "none").exists()


def test_runs_with_the_old_query_key_targets_still_load(lora_run, train_dataset, tmp_path):
    """`stage1.lora_targets` chooses the projections; a LoRA on all four (the targets before the default changed)
    loads with diffusers' load_lora_weights and with load_lora, which read the targets from the file."""
    from diffusers import StableDiffusionPipeline

    from diffpano.pipelines.loading import load_model

    base, _ = lora_run
    run = lora_train(train_dataset, base, tmp_path, "old", "stage1.lora_targets=[to_q, to_k, to_v, to_out.0]")
    merged = _unet_out(load_model(run / "stage1-model", "cpu").unet)
    sd = StableDiffusionPipeline.from_pretrained(base)
    sd.load_lora_weights(str(run / "lora"))
    torch.testing.assert_close(_unet_out(sd.unet), merged, rtol=1e-4, atol=1e-5)
    ours = load_model(base, "cpu")
    load_lora(ours, str(run / "lora"))
    assert _changed(load_model(base, "cpu").unet, ours.unet) == {"to_q", "to_k", "to_v", "to_out.0"}


def test_lora_targets_are_checked_naming_the_key(train_dataset):
    from trainer.config import load_config

    for bad in ("[to_v, to_v]", "[]", "[ff]"):
        with pytest.raises(ValueError, match="stage1.lora_targets"):
            load_config("trainer/configs/tiny.yaml", [f"stage1.lora_targets={bad}"])
