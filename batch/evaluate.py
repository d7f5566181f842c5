"""Evaluation on Ray: a dataset's test tours generated as a bulk job, then scored and reported
(diffpano.metrics.evaluation)."""

from __future__ import annotations

import numpy as np

from batch.bulk import run_bulk
from diffpano.data.manifest import read_dataset
from diffpano.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_VIEWS, REPLICAS
from diffpano.io import storage
from diffpano.io.manifest import decode_rgb, read_tours, resolve_uri
from diffpano.metrics.evaluation import (
    SUMMARY_KEYS,
    EvalTools,
    EvalTour,
    score_tours,
    select_eval_tours,
    write_eval_report,
)
from diffpano.specs import BulkSpec


def generate_tours(tours: list[EvalTour], model: str | None, out: str, steps: int, guidance: float,
                   replicas: int = REPLICAS, size: tuple[int, int] | None = None, variant: dict | None = None,
                   num_gpus: float = 0.0, scheduler: str | None = None) -> int:
    """Generate the tours that `out` does not hold yet as a bulk job (batch.bulk); returns how many were generated."""
    h, w = size or (None, None)
    specs = [BulkSpec(tour_id=t.tour_id, prompts=list(t.prompts), poses=np.asarray(t.poses).reshape(-1, 16).tolist(),
                      seed=t.seed, num_inference_steps=steps, guidance_scale=guidance, height=h, width=w,
                      scheduler=scheduler)
             for t in tours]
    summary = run_bulk(specs, out, model, replicas, num_gpus=num_gpus, progress=False, options=variant,
                       scheduler=scheduler)
    if summary.failures:
        tour_id, error = summary.failures[0]
        raise ValueError(f"model: {len(summary.failures)} test tours failed (first: {tour_id}: {error})")
    return summary.tours_done


def evaluate_model(
    model: str | None, dataset: str, out: str, tools: EvalTools, num_tours: int = 8, views: int = DEFAULT_VIEWS,
    steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, size: tuple[int, int] | None = None,
    replicas: int = REPLICAS, seed: int = 0, variant: dict | None = None, report: bool = True,
    scheduler: str | None = None,
) -> dict:
    """Generate the dataset's test tours with a model on Ray, score them against the ground truth, write the report."""
    truth = select_eval_tours(dataset, num_tours, views, seed)
    tours_out = storage.join(out, "tours")
    generate_tours(truth, model, tours_out, steps, guidance, replicas, size, variant, scheduler=scheduler)
    generated = read_tours(tours_out, [t.tour_id for t in truth])
    metrics = score_tours(generated, truth, tools)
    metrics["setup"] = {"model": model or "bundled", "dataset": dataset, "num_tours": len(truth), "views": views,
                        "steps": steps, "scheduler": scheduler or "the model's", "guidance": guidance, "seed": seed,
                        "variant": variant or {}}
    if report:
        write_eval_report(out, metrics, generated, _setup_line(metrics["setup"]))
    return metrics


def evaluate_tours(tours: str, out: str, tools: EvalTools, dataset: str | None = None, seed: int = 0,
                   max_real: int = 256) -> dict:
    """Score already generated tours; a dataset, when given, is the real set for FID and FAED."""
    generated = read_tours(tours)
    real = None
    if dataset:
        table = read_dataset(dataset, ["rgb_uri"]).to_pandas()
        pick = np.random.default_rng(seed).permutation(len(table))[:max_real]
        real = np.stack([decode_rgb(storage.read_bytes(resolve_uri(dataset, table.rgb_uri.iloc[i]))) for i in pick])
    metrics = score_tours(generated, None, tools, real=real)
    metrics["setup"] = {"tours": tours, "dataset": dataset}
    write_eval_report(out, metrics, generated, _setup_line(metrics["setup"]))
    return metrics


def _setup_line(setup: dict) -> str:
    """The setup as one Markdown line."""
    return ", ".join(f"**{k}** {v}" for k, v in setup.items())


def ablation_variants(study: str, samples: list[int], refs: list[int], model: str | None,
                      one_stage: str | None) -> tuple[list[tuple[str, str | None, dict, dict]], str, str | None]:
    """(name, model, pipeline arguments, table fields) per variant of a study, and the plot's x and series fields."""
    if study == "sk":
        return ([(f"S{s}-K{k}", model, {"num_samples": s, "num_ref_views": k}, {"S": s, "K": k})
                 for k in refs for s in samples], "S", "K")
    if study == "ea":
        return ([("with-EA", model, {}, {"epipolar": "with EA"}),
                 ("without-EA", model, {"use_epipolar": False}, {"epipolar": "without EA"})], "epipolar", None)
    if study == "stages":
        if not one_stage:
            raise ValueError("--one-stage-model: the stages study compares two models; give the one-stage model")
        return ([("two-stage", model, {}, {"training": "two-stage"}),
                 ("one-stage", one_stage, {}, {"training": "one-stage"})], "training", None)
    raise ValueError(f"--study: expected sk, ea or stages, got {study!r}")


def run_ablation(study: str, model: str | None, dataset: str, out: str, tools: EvalTools,
                 samples: list[int], refs: list[int], one_stage: str | None = None, **options) -> list[dict]:
    """Evaluate each variant of a study into out/<variant>/ and write the study's table and plot under out."""
    variants, x, series = ablation_variants(study, samples, refs, model, one_stage)
    rows, last = [], None
    for name, variant_model, args, fields in variants:
        metrics = evaluate_model(variant_model, dataset, storage.join(out, name), tools, variant=args, **options)
        rows.append({"variant": name, **fields, **{k: metrics.get(k) for k in SUMMARY_KEYS}})
        last = metrics
    generated = read_tours(storage.join(out, variants[0][0], "tours"))
    write_eval_report(out, {"study": study, "variants": rows, "missing": last.get("missing", [])}, generated,
                      f"ablation **{study}** on {dataset}", ablation=(rows, x, series))
    return rows
