"""Evaluation: which clips are scored, reading generated tours back, every metric of them, and the report."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffpano.data.manifest import read_dataset
from diffpano.io import storage
from diffpano.io.depth import decode_depth
from diffpano.io.manifest import Tour, decode_rgb, pose_matrices, resolve_uri
from diffpano.metrics.images import channels_first as _nchw
from diffpano.metrics.images import resize_uint8 as _resize_to


@dataclass
class EvalTour:
    """One test window of a dataset: the prompts and poses to generate from, and the ground truth."""

    tour_id: str
    prompts: list[str]
    poses: np.ndarray  # (N, 4, 4)
    seed: int
    rgb: np.ndarray | None = None  # (N, H, W, 3) uint8 ground truth
    depth: np.ndarray | None = None  # (N, H, W) metres


def select_eval_tours(dataset: str, num_tours: int, views: int, seed: int = 0, load: bool = True) -> list[EvalTour]:
    """The first `views` keyframes of `num_tours` clips drawn by seed (clips shorter than `views` are skipped)."""
    if num_tours < 1 or views < 1:
        raise ValueError(f"num_tours/views: must be >= 1, got {num_tours}/{views}")
    table = read_dataset(dataset).to_pandas()
    if table.empty:
        raise ValueError(f"dataset: no keyframes in {dataset}")
    clips = sorted(cid for cid, n in table.groupby("clip_id").size().items() if n >= views)
    if not clips:
        raise ValueError(f"views: no clip in {dataset} has {views} keyframes")
    rng = np.random.default_rng(seed)
    chosen = [clips[i] for i in sorted(rng.choice(len(clips), size=min(num_tours, len(clips)), replace=False))]
    out = []
    for cid in chosen:
        rows = table[table.clip_id == cid].sort_values("frame_index").iloc[:views]
        tour = EvalTour(
            tour_id=f"eval-{hashlib.sha256(f'{cid}:{views}:{seed}'.encode()).hexdigest()[:12]}",
            prompts=rows.caption.tolist(), poses=pose_matrices(rows.pose_c2w), seed=int(rng.integers(2**31)),
        )
        if load:
            tour.rgb = np.stack([decode_rgb(storage.read_bytes(resolve_uri(dataset, u))) for u in rows.rgb_uri])
            if rows.depth_uri.notna().all():
                tour.depth = np.stack([decode_depth(storage.read_bytes(resolve_uri(dataset, u)))
                                       for u in rows.depth_uri])
        out.append(tour)
    return out


@dataclass
class EvalTools:
    """The learned parts of the metrics; None where weights are not available (the metric is then reported missing)."""

    extractor: object | None = None  # metrics.features.FeatureExtractor (FID, IS)
    clip: object | None = None  # metrics.features.TextImageScorer (CLIP score)
    faed: object | None = None  # metrics.faed.PanoAutoencoder
    adherence: object | None = None  # metrics.adherence.AdherenceClassifier
    lpips: object | None = None  # metrics.lpips.Lpips
    crops: int = 20
    horizontal: int = 8
    poses: bool = True  # pose recovery by rig SfM (metrics.poses): seconds per tour


BUNDLED_FAED = Path(__file__).resolve().parents[1] / "assets" / "metrics" / "faed"


def load_tools(inception: str | None = None, clip: str | None = None, faed: str | None = "bundled",
               adherence: str | None = "bundled", lpips_weights: str | None = None, device: str = "cpu",
               poses: bool = True) -> EvalTools:
    """Load the metric networks from local files; 'bundled' picks the FAED autoencoder or classifier shipped here."""
    from diffpano.metrics import adherence as adh
    from diffpano.metrics.faed import load_autoencoder
    from diffpano.metrics.features import ClipScorer, TorchScriptInception
    from diffpano.metrics.lpips import load_lpips

    return EvalTools(
        extractor=TorchScriptInception(inception, device) if inception else None,
        clip=ClipScorer(clip, device) if clip else None,
        faed=load_autoencoder(str(BUNDLED_FAED) if faed == "bundled" else faed) if faed else None,
        adherence=(adh.load_classifier(device=device) if adherence == "bundled" else adh.load_classifier(adherence))
        if adherence else None,
        lpips=load_lpips(lpips_weights) if lpips_weights else None,
        poses=poses,
    )


def _mean_of(rows: list[dict]) -> dict:
    """Mean of each numeric key over rows (None values left out; a key with no numbers is None)."""
    keys = {k for r in rows for k in r}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in rows if isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool)]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def score_tours(generated: list[Tour], truth: list[EvalTour] | None, tools: EvalTools,
                real: np.ndarray | None = None) -> dict:
    """All metrics of generated tours: distribution, paired (with truth), consistency, seam, adherence, FAED.

    truth[i] is the ground truth of generated[i] (same prompts and poses) when given; `real` is an alternative
    reference set of panoramas (N, H, W, 3) for FID/FAED when there is no paired truth.
    """
    from diffpano.metrics.adherence import adherence
    from diffpano.metrics.consistency import epipolar_consistency, normalised_reprojection
    from diffpano.metrics.distribution import distribution_metrics, omnifid
    from diffpano.metrics.faed import faed
    from diffpano.metrics.features import MissingWeights
    from diffpano.metrics.lpips import ImagesTooSmall, lpips
    from diffpano.metrics.paired import paired_metrics
    from diffpano.metrics.poses import pose_recovery
    from diffpano.metrics.seam import discontinuity_scores, seam_scores

    if not generated:
        raise ValueError("tours: nothing to evaluate")
    size = tuple(generated[0].images.shape[1:3])
    fake = torch.cat([_nchw(t.images) for t in generated])
    prompts = [p for t in generated for p in t.prompts]
    if truth is not None:
        real = np.concatenate([t.rgb for t in truth])
    real_t = None if real is None else _resize_to(real, size)
    metrics: dict = {"tours": len(generated), "views": int(fake.shape[0]), "size": list(size)}
    metrics.update(distribution_metrics(real_t, fake, prompts, tools.extractor, tools.clip, crops=tools.crops,
                                        horizontal=tools.horizontal))
    missing = metrics.pop("missing")
    if tools.extractor is not None and real_t is not None:
        metrics.update(omnifid(real_t, fake, tools.extractor))
    if truth is not None:
        metrics.update({f"paired_{k}": v for k, v in paired_metrics(fake, real_t).items()})
        try:
            metrics["paired_lpips"] = float(lpips(fake, real_t, tools.lpips).mean())
        except (MissingWeights, ImagesTooSmall) as err:
            missing.append(str(err))
    per_tour = []
    for i, t in enumerate(generated):
        other = generated[(i + 1) % len(generated)] if len(generated) > 1 else None
        unrelated = other.images if other is not None and len(other.images) == len(t.images) else None
        row = epipolar_consistency(t.images, t.poses, unrelated=unrelated) if len(t.images) > 1 else {}
        if truth is not None and truth[i].depth is not None and len(t.images) > 1:
            depth = F.interpolate(torch.from_numpy(truth[i].depth)[:, None], size=size, mode="nearest")[:, 0].numpy()
            row.update(normalised_reprojection(t.images, _resize_to(truth[i].rgb, size), depth, truth[i].poses))
        if tools.poses and len(t.images) >= 3:
            row.update(pose_recovery(t.images, t.poses, threads=os.cpu_count() or 1))
            if truth is not None:  # the control: the ground truth at the same size scores what SfM can do here
                control = pose_recovery(_resize_to(truth[i].rgb, size), truth[i].poses, threads=os.cpu_count() or 1)
                row.update({f"{k}_truth": v for k, v in control.items()})
        per_tour.append(row)
    metrics.update(_mean_of(per_tour))
    if not tools.poses:
        missing.append("pose recovery was turned off (--no-pose-recovery)")
    metrics.update(seam_scores(fake))
    metrics.update(discontinuity_scores(fake))
    if tools.adherence is not None:
        metrics.update({f"adherence_{k}": v for k, v in adherence(tools.adherence, fake, prompts).items()})
    else:
        missing.append("prompt adherence needs the adherence classifier: pass --adherence DIR or keep the bundled one")
    if tools.faed is not None and real_t is not None:
        faed_size = (64, 128)
        metrics["faed"] = faed(tools.faed, _resize_to(real_t.permute(0, 2, 3, 1).numpy(), faed_size),
                               _resize_to(fake.permute(0, 2, 3, 1).numpy(), faed_size))
    elif tools.faed is None:
        missing.append("FAED needs a panorama autoencoder: pass --faed DIR or keep the bundled one (train one with "
                       "`python scripts/train_faed.py --dataset DATASET`)")
    metrics["missing"] = missing
    return metrics


SUMMARY_KEYS = (
    "fid_full", "fid_crops", "fid_horizontal", "fid_rolled", "omnifid", "omnifid_up", "omnifid_down",
    "omnifid_sides", "is_full", "is_crops", "clip_full", "clip_horizontal",
    "faed", "paired_psnr_capped", "paired_ssim", "paired_lpips", "epipolar_score", "epipolar_error",
    "epipolar_error_unrelated", "reprojection_psnr", "reprojection_psnr_ratio", "reprojection_ssim_ratio",
    "seam_colour_ratio", "seam_gradient_ratio", "seam_ds", "seam_ds_interior", "pose_registered",
    "pose_rotation_error_deg", "pose_translation_error", "pose_rotation_error_deg_truth",
    "adherence_room_accuracy", "adherence_wall_accuracy",
)


def write_eval_report(out: str, metrics: dict, generated: list[Tour], title: str,
                      ablation: tuple[list[dict], str, str | None] | None = None) -> dict[str, str]:
    """metrics.json, report.md, a grid of sample tours and (for ablations) a plot and a table, under out."""
    from diffpano.metrics.report import ablation_plot, figure_link, markdown_table, tour_grid, write_report

    grid = tour_grid([(t.images, t.prompts) for t in generated], storage.join(out, "samples.png"))
    rows = [{"metric": k, "value": metrics.get(k)} for k in SUMMARY_KEYS if k in metrics]
    sections = [
        ("Setup", title),
        ("Metrics", markdown_table(rows, ["metric", "value"])),
        ("Samples", figure_link(grid, out)),
    ]
    files = {"samples": grid}
    if ablation is not None:
        variants, x, series = ablation
        keys = [k for k in SUMMARY_KEYS if any(k in v for v in variants)]
        files["plot"] = ablation_plot(variants, x, series, keys[:6], storage.join(out, "ablation.png"), title)
        sections.append(("Ablation", markdown_table(variants, [c for c in ("variant", x, series) if c] + keys)))
        sections.append(("Ablation plot", figure_link(files["plot"], out)))
    if metrics.get("missing"):
        sections.append(("Not measured", "\n".join(f"* {m}" for m in metrics["missing"])))
    files.update(write_report(out, metrics | ({"ablation": ablation[0]} if ablation else {}), sections))
    return files
