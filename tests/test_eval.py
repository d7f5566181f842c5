"""`diffpano eval` and `diffpano ablate` end to end on a tiny model and a small procedural dataset (local Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import plain
from lpips_reference import write_seeded_backbone
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.data.manifest import commit_clips
from diffpano.data.procedural.build import ProceduralSpec, render_clips
from diffpano.io.manifest import read_manifest, read_tours
from diffpano.metrics.evaluation import select_eval_tours
from diffpano.metrics.lpips import lpips
from diffpano.metrics.seam import discontinuity_scores

app = build_app()


pytestmark = pytest.mark.ray  # bulk jobs, dataset builds and training run on Ray here


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three procedural clips of three keyframes at 32x64, committed without Ray."""
    root = str(tmp_path_factory.mktemp("evalds") / "ds")
    spec = ProceduralSpec(scenes=3, clips_per_scene=1, frames=3, height=32, width=64, seed=3)
    for s in range(3):
        commit_clips(root, render_clips(spec, s, [0]))
    return root


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, plain(result.output)


def test_eval_writes_metrics_report_and_pictures(ray_local, dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    alexnet = write_seeded_backbone("alex", tmp_path / "alexnet.pth")
    code, text = run("eval", "--model", str(tiny_model_dir), "--dataset", dataset, "--out", str(out),
                     "--num-tours", "2", "--views", "3", "--steps", "2", "--replicas", "2", "--size", "32x64",
                     "--lpips-weights", alexnet)  # 32 rows: AlexNet's least side for LPIPS is 31
    assert code == 0, text
    for name in ("metrics.json", "report.md", "samples.png"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tours"] == 2 and metrics["views"] == 6
    # The tours generated are the dataset's test windows (same prompts and poses), and the metrics are theirs:
    # PSNR against the ground truth (area-resized to the model's size) and the seam ratio recomputed here.
    truth = select_eval_tours(dataset, 2, 3, seed=0)
    generated = read_tours(str(out / "tours"), [t.tour_id for t in truth])
    for g, t in zip(generated, truth, strict=True):
        assert g.prompts == t.prompts and np.allclose(g.poses, t.poses, atol=1e-6)
    fake = np.concatenate([g.images for g in generated]).astype(np.float64) / 255
    n, h, w, _ = fake.shape
    real = np.concatenate([t.rgb for t in truth]).astype(np.float64)
    f = real.shape[1] // h
    real = real.reshape(n, h, f, w, f, 3).mean(axis=(2, 4)).round() / 255
    psnr = 10 * np.log10(1 / ((fake - real) ** 2).mean(axis=(1, 2, 3)))
    assert metrics["paired_psnr_capped"] == pytest.approx(float(np.minimum(psnr, 100).mean()), rel=1e-6)
    nchw = [torch.from_numpy(x).permute(0, 3, 1, 2) for x in (fake, real)]
    expected_lpips = lpips(*nchw, alexnet)
    assert metrics["paired_lpips"] == pytest.approx(float(expected_lpips.mean()), rel=1e-4)
    assert not any("LPIPS" in m for m in metrics["missing"])
    assert 0 < metrics["paired_psnr_capped"] < 30  # an untrained model is far from the renders
    jumps = np.abs(np.roll(fake, -1, axis=2) - fake).mean(axis=(1, 3))  # (views, W): column k to k + 1, wrapping
    seam = jumps[:, -1] / (jumps[:, :-1].mean(axis=1) + 1e-6)
    assert metrics["seam_colour_ratio"] == pytest.approx(float(seam.mean()), rel=1e-5)
    assert metrics["seam_ds"] == pytest.approx(discontinuity_scores(fake)["seam_ds"], rel=1e-5)
    # Pose recovery ran on the generated tours and, as the control, on the ground truth at the same size.
    for key in ("pose_registered", "pose_registered_truth"):
        assert 0 <= metrics[key] <= 1
    assert "| seam_ds |" in (out / "report.md").read_text()
    assert -1 < metrics["paired_ssim"] < 1 and 0 <= metrics["epipolar_score"] <= 1
    assert metrics["epipolar_error_unrelated"] > 0 and 0 < metrics["reprojection_psnr_ratio"] < 10
    assert metrics["faed"] > 0 and metrics["adherence_room_accuracy"] * 6 == pytest.approx(
        round(metrics["adherence_room_accuracy"] * 6))  # a share of the 6 views
    assert any("Inception" in m for m in metrics["missing"]) and "not measured" in text
    assert "| epipolar_score |" in (out / "report.md").read_text()
    assert read_manifest(str(out / "tours")).num_rows == 6
    assert set(read_manifest(str(out / "tours")).column("scheduler").to_pylist()) == {"ddim"}
    # Scoring the generated tours again from their output: the same unpaired numbers.
    again = tmp_path / "again"
    code, text = run("eval", "--tours", str(out / "tours"), "--out", str(again), "--no-pose-recovery")
    assert code == 0, text
    rescored = json.loads((again / "metrics.json").read_text())
    assert "pose_registered" not in rescored and any("--no-pose-recovery" in m for m in rescored["missing"])
    assert rescored["seam_colour_ratio"] == pytest.approx(metrics["seam_colour_ratio"])
    # LPIPS weights that are not a backbone are refused before anything is scored.
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state_dict")
    code, text = run("eval", "--tours", str(out / "tours"), "--out", str(tmp_path / "bad"),
                     "--lpips-weights", str(junk))
    assert code == 2 and "junk.pth is not a torch state_dict file" in text and not (tmp_path / "bad").exists()


def test_ablation_of_the_ea_modules_writes_a_table_and_a_plot(ray_local, dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "ablate"
    code, text = run("ablate", "ea", "--model", str(tiny_model_dir), "--dataset", dataset, "--out", str(out),
                     "--num-tours", "1", "--views", "2", "--steps", "2")
    assert code == 0, text
    assert "variant=with-EA" in text and "variant=without-EA" in text
    report = (out / "report.md").read_text()
    assert "| with-EA |" in report and "ablation.png" in report and (out / "ablation.png").stat().st_size > 0
    rows = json.loads((out / "metrics.json").read_text())["ablation"]
    assert [r["variant"] for r in rows] == ["with-EA", "without-EA"]
    # Each variant's tours are what the model makes with EA on and off (an oracle, not just "they differ"), and the
    # switch changes them.
    from diffpano.pipelines.loading import load_model

    pipe = load_model(tiny_model_dir, "cpu")
    pipe.set_progress_bar_config(disable=True)
    made = {}
    for variant, use_epipolar in (("with-EA", True), ("without-EA", False)):
        [tour] = read_tours(str(out / variant / "tours"))
        again = pipe(tour.prompts, tour.poses, seed=tour.seed, num_inference_steps=tour.num_inference_steps,
                     guidance_scale=tour.guidance_scale, use_epipolar=use_epipolar).images[0]
        assert np.abs(again.astype(int) - tour.images.astype(int)).max() <= 1, variant
        made[variant] = tour.images
    assert np.abs(made["with-EA"].astype(int) - made["without-EA"].astype(int)).mean() > 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--out", "x"], "--dataset"),
        (["ablate", "stages", "--dataset", "DS", "--out", "x"], "--one-stage-model"),
        (["ablate", "sk", "--dataset", "DS", "--samples", "0,2"], "--samples"),
        (["eval", "--dataset", "DS", "--views", "50"], "views"),
    ],
)
def test_bad_input_names_the_option(dataset, tmp_path, args, message):
    args = [a.replace("DS", dataset) for a in args]
    code, text = run(*args, *(["--out", str(tmp_path / "o")] if "--out" not in args else []))
    assert code == 2 and message in text


def test_bundled_faed_autoencoder_tells_panoramas_from_noise():
    """The shipped FAED autoencoder: two samples of procedural panoramas are far closer than panoramas and noise."""
    import numpy as np
    import torch

    from diffpano.metrics.adherence import make_training_set
    from diffpano.metrics.evaluation import load_tools
    from diffpano.metrics.faed import faed

    model = load_tools(adherence=None).faed
    a, _, _ = make_training_set(12, 2, (64, 128), seed=500)
    b, _, _ = make_training_set(12, 2, (64, 128), seed=900)
    noise = np.random.default_rng(0).integers(0, 256, a.shape).astype(np.uint8)
    as_t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # noqa: E731
    same, other = faed(model, as_t(a), as_t(b)), faed(model, as_t(a), as_t(noise))
    assert other > 3 * same, (same, other)  # measured 0.71 vs 4.5
