"""Offline sub-commands on Ray: dataset build, bulk, eval, ablate."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator

import typer

from diffpano.cli import (
    Commands,
    command_name,
    compile_option,
    finite_in,
    parse_size,
    scheduler_option,
    spec_options,
)
from diffpano.data.captures.build import CaptureSpec
from diffpano.data.meshes.build import MeshSpec
from diffpano.data.procedural.build import ProceduralSpec
from diffpano.data.sources import SourceSpec
from diffpano.defaults import (
    COMPACT_EVERY,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_VIEWS,
    MAX_SPEC_STEPS,
    MAX_SPEC_VIEWS,
    MAX_STEPS,
    MAX_VIEWS,
    PUBLISH_S,
    REPLICAS,
    STALL_S,
    STORAGE_WAIT_S,
    TOURS_PER_BATCH,
)

OUT_HELP = "Dataset folder or s3:// prefix (docs/datasets.md)."


@spec_options(ProceduralSpec)
def dataset_build(
    spec: ProceduralSpec,
    out: str = typer.Option("outputs/dataset", "--out", help=OUT_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    processes: int | None = typer.Option(None, "--processes", min=1, max=1024,
                                         help="Render with N local processes instead of Ray tasks."),
) -> None:
    """Render a procedural panoramic video-text dataset on Ray; a re-run completes what is missing."""
    build_scenes(spec, [], out, quiet, processes)


@spec_options(MeshSpec)
def dataset_render(
    spec: MeshSpec,
    meshes: list[str] = typer.Argument(..., help="Mesh files or globs: .glb/.gltf, .obj (+ .mtl), .ply."),
    out: str = typer.Option(..., "--out", help=OUT_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Render walks through textured indoor meshes into a panoramic video-text dataset, a Ray task per mesh; failed
    meshes are listed in OUT/failures/, and a re-run completes what is missing."""
    build_scenes(spec, meshes, out, quiet)


@spec_options(CaptureSpec)
def dataset_capture(
    spec: CaptureSpec,
    captures: list[str] = typer.Argument(..., help="Equirectangular videos or folders of panoramas, or globs."),
    out: str = typer.Option(..., "--out", help=OUT_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Turn 360-degree captures into posed, captioned clips: keyframes by sharpness and motion, COLMAP rig SfM,
    upright metric poses; a Ray task per capture, failed captures listed in OUT/failures/, a re-run completes what is
    missing (docs/captures.md)."""
    build_scenes(spec, captures, out, quiet)


def build_scenes(spec: SourceSpec, patterns: list[str], out: str, quiet: bool, processes: int | None = None) -> None:
    """Build the dataset of a source's spec over the files the patterns name, print its summary and where its
    failures are; a ValueError is a bad parameter (exit code 2)."""
    from batch.dataset import build_dataset

    inputs = expand_inputs(patterns, spec.accepts, spec.input_name) if spec.input_name else []
    try:
        summary = build_dataset(spec, out, inputs, progress=not quiet, processes=processes)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(summary.line())
    if summary.failures_uri:
        typer.echo(f"failed scenes: {summary.failures_uri}")


def expand_inputs(patterns: list[str], keep, field: str) -> list[str]:
    """Paths named or matched by globs (a glob keeps those `keep` accepts); BadParameter for a missing one."""
    import glob

    paths = sorted({p for pattern in patterns for p in (
        [g for g in glob.glob(pattern, recursive=True) if keep(g)] if glob.has_magic(pattern) else [pattern])})
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise typer.BadParameter(f"{field}: no such file or folder: {missing[0]}")
    return paths


def bulk(
    specs: str | None = typer.Option(None, "--specs", help="Tour specs (docs/bulk-specs.md): JSONL or Parquet, "
                                     "local or s3://."),
    synthetic: int | None = typer.Option(None, "--synthetic", min=1, help="Make N specs from procedural scenes."),
    views: int = typer.Option(DEFAULT_VIEWS, "--views", min=1, max=MAX_SPEC_VIEWS, help="Views per synthetic tour."),
    steps: int | None = typer.Option(None, "--steps", min=1, max=MAX_SPEC_STEPS,
                                     help="Sampler steps of synthetic tours."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the synthetic specs."),
    out: str = typer.Option("outputs/bulk", "--out", help="Output folder or s3:// prefix (docs/tours.md)."),
    model: str | None = typer.Option(None, "--model", help="Model directory or s3:// URI (default: bundled)."),
    replicas: int = typer.Option(REPLICAS, "--replicas", min=1, help="Model replicas (Ray actors)."),
    batch_size: int = typer.Option(TOURS_PER_BATCH, "--batch-size", min=1,
                                   help="Tours per replica call and manifest part."),
    gpus: float = typer.Option(0.0, "--gpus-per-replica", callback=finite_in(0.0)),
    cpus: float = typer.Option(1.0, "--cpus-per-replica", callback=finite_in(0.1)),
    scheduler: str | None = scheduler_option("the model's own; a spec's `scheduler` wins"),
    compile: str | None = compile_option(),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip invalid specs instead of refusing."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="Run on a server (http://HOST:PORT) as a job; "
                                        "--out is then a prefix under the server's output root."),
    stall_timeout: float = typer.Option(STALL_S, "--stall-timeout", callback=finite_in(1.0),
                                        help="Seconds with no replica answering (the cluster has no room) before "
                                        "the job stops, resumable (exit code 3)."),
    storage_wait: float = typer.Option(STORAGE_WAIT_S, "--storage-wait", callback=finite_in(0.0),
                                       help="Seconds an s3:// read or write retries through a storage outage before "
                                       "the job stops, resumable (exit code 3)."),
    lora: str | None = typer.Option(None, "--lora", help="A LoRA by name under --lora-root for the specs that name "
                                    "none (a spec's `lora` wins)."),
    lora_root: str | None = typer.Option(None, "--lora-root", help="Folder or s3:// prefix of LoRAs by name "
                                         "(ROOT/NAME/pytorch_lora_weights.safetensors, as training writes RUN/lora)."),
    compact_every: int = typer.Option(COMPACT_EVERY, "--compact-every", min=0,
                                      help="Merge the job's manifest parts every N it writes (0: never): a local "
                                      "manifest is compacted; on s3:// batches stage their parts and they are "
                                      f"published merged (also after {PUBLISH_S:g} s, and at the end)."),
) -> None:
    """Generate many tours on a pool of Ray actors; a re-run completes what is missing, exactly once. Replicas lost
    with their node hand their batches to the others."""
    from diffpano.io.storage import StorageUnavailable, set_storage_wait
    from diffpano.specs import SpecRows, iter_spec_rows, synthetic_specs

    if (specs is None) == (synthetic is None):
        raise typer.BadParameter("give exactly one of --specs FILE and --synthetic N")
    set_storage_wait(storage_wait)
    try:
        good = SpecRows(lambda: with_defaults(iter_spec_rows(specs) if specs else
                                              synthetic_specs(synthetic, views, seed, steps),
                                              scheduler=scheduler, lora=lora))
    except StorageUnavailable as err:
        stopped(f"--specs: {err}")
    except (ValueError, OSError) as err:
        raise typer.BadParameter(f"--specs: {err}") from None
    invalid = good.invalid
    if invalid and not skip_invalid:
        for e in invalid[:20]:
            typer.echo(f"invalid spec: {e}", err=True)
        raise typer.BadParameter(f"--specs: {len(invalid)} invalid spec(s) (first: {invalid[0]}); nothing was "
                                 "written (--skip-invalid runs the valid ones)")
    if endpoint:
        return bulk_online(endpoint, list(good), out)
    from batch.bulk import run_bulk

    try:
        summary = run_bulk(good, out, model, replicas, batch_size, gpus, cpus, invalid=invalid,
                           compile=compile or "off", scheduler=scheduler, stall_s=stall_timeout,
                           compact_every=compact_every, lora_root=lora_root)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(summary.line())
    if summary.failures_uri:
        typer.echo(f"failures and invalid specs: {summary.failures_uri}")
    if summary.stopped:
        stopped(summary.stopped)
    typer.echo(f"view it: {command_name()} serve --output-root {summary.out}, then /viewer?tour=<tour_id>")


def with_defaults(rows: Iterable, **defaults: str | None) -> Iterator:
    """Rows with the options' values (--scheduler, --lora) for the fields they leave empty."""
    given = {k: v for k, v in defaults.items() if v}
    for row in rows:
        yield row | {k: v for k, v in given.items() if not row.get(k)} if given and isinstance(row, dict) else row


def stopped(reason: str) -> None:
    """End a bulk job that can go on later: say why, exit code 3."""
    typer.echo(f"bulk stopped: {reason}; run the same command again to go on", err=True)
    raise typer.Exit(3)


def bulk_online(endpoint: str, specs: list, out: str) -> None:
    """Run the specs as a job on a server and print its end."""
    from batch.client import run_online

    started = time.perf_counter()
    try:
        status = run_online(endpoint, specs, out, os.environ.get("DIFFPANO_API_KEY"))
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"job {status['job_id']} {status['state']}: {status['tours_done']} tours done, "
               f"{status['tours_failed']} failed of {status['tours_total']}, "
               f"{time.perf_counter() - started:.1f}s -> {status['manifest_uri']}")


def eval_tools(inception, clip, faed, adherence, lpips_weights, poses: bool = True):
    """The metric networks from local files, or a clear error naming the option."""
    from diffpano.metrics.evaluation import load_tools

    try:
        return load_tools(inception, clip, faed or "bundled", adherence or "bundled", lpips_weights, poses=poses)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(f"metric weights: {err}") from None


EVAL_WEIGHTS = dict(
    inception=typer.Option(None, "--inception", help="TorchScript Inception for FID/IS (inception-2015-12-05.pt)."),
    clip=typer.Option(None, "--clip", help="Local CLIP directory for CLIP score."),
    faed=typer.Option(None, "--faed", help="Panorama autoencoder directory for FAED (default: the bundled one)."),
    adherence=typer.Option(None, "--adherence", help="Adherence classifier directory (default: the bundled one)."),
    lpips_weights=typer.Option(None, "--lpips-weights", help="LPIPS backbone weights (alexnet-owt-7be5be79.pth)."),
    poses=typer.Option(True, "--pose-recovery/--no-pose-recovery",
                       help="Recover each tour's camera poses by rig SfM and score them (seconds per tour)."),
)


def evaluate(
    out: str = typer.Option("outputs/eval", "--out", help="Report folder or s3:// prefix."),
    model: str | None = typer.Option(None, "--model", help="Model directory or s3:// URI (default: bundled)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset (docs/datasets.md) with the test clips."),
    tours: str | None = typer.Option(None, "--tours", help="Score already generated tours (docs/tours.md) instead."),
    num_tours: int = typer.Option(8, "--num-tours", min=1, help="Test tours drawn from the dataset."),
    views: int = typer.Option(DEFAULT_VIEWS, "--views", min=1, max=MAX_VIEWS, help="Views per test tour."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, max=MAX_STEPS),
    guidance: float = typer.Option(DEFAULT_GUIDANCE, "--guidance", callback=finite_in(0.0)),
    size: str | None = typer.Option(None, "--size", help="HxW to generate at (default: the model's size)."),
    scheduler: str | None = scheduler_option(),
    replicas: int = typer.Option(REPLICAS, "--replicas", min=1, help="Model replicas (Ray actors) generating tours."),
    seed: int = typer.Option(0, "--seed", min=0),
    inception: str | None = EVAL_WEIGHTS["inception"],
    clip: str | None = EVAL_WEIGHTS["clip"],
    faed: str | None = EVAL_WEIGHTS["faed"],
    adherence: str | None = EVAL_WEIGHTS["adherence"],
    lpips_weights: str | None = EVAL_WEIGHTS["lpips_weights"],
    poses: bool = EVAL_WEIGHTS["poses"],
) -> None:
    """Evaluate a model on a dataset's test clips (or score given tours): metrics.json, report.md, pictures."""
    from batch.evaluate import evaluate_model, evaluate_tours

    if not tours and not dataset:
        raise typer.BadParameter("--dataset: give a dataset to evaluate a model on, or --tours to score outputs")
    tools = eval_tools(inception, clip, faed, adherence, lpips_weights, poses)
    try:
        if tours:
            metrics = evaluate_tours(tours, out, tools, dataset, seed)
        else:
            metrics = evaluate_model(model, dataset, out, tools, num_tours, views, steps, guidance, parse_size(size)
                                     if size else None, replicas, seed, scheduler=scheduler)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    print_metrics(metrics, out)


def ints(text: str, name: str) -> list[int]:
    """Positive integers of a comma-separated option."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{name}: expected positive integers, got {text!r}")
    return values


def ablate(
    study: str = typer.Argument(..., help="sk (samples S x reference views K), ea (with/without EA), stages."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset (docs/datasets.md) with the test clips."),
    out: str = typer.Option("outputs/ablation", "--out", help="Report folder or s3:// prefix."),
    model: str | None = typer.Option(None, "--model", help="Model (the two-stage one for 'stages')."),
    one_stage_model: str | None = typer.Option(None, "--one-stage-model", help="One-stage model for 'stages'."),
    samples: str = typer.Option("2,4,8", "--samples", help="S values for 'sk'."),
    refs: str = typer.Option("1,2", "--refs", help="K values for 'sk'."),
    num_tours: int = typer.Option(4, "--num-tours", min=1),
    views: int = typer.Option(DEFAULT_VIEWS, "--views", min=2, max=MAX_VIEWS),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, max=MAX_STEPS),
    scheduler: str | None = scheduler_option(),
    replicas: int = typer.Option(REPLICAS, "--replicas", min=1),
    seed: int = typer.Option(0, "--seed", min=0),
    inception: str | None = EVAL_WEIGHTS["inception"],
    clip: str | None = EVAL_WEIGHTS["clip"],
    faed: str | None = EVAL_WEIGHTS["faed"],
    adherence: str | None = EVAL_WEIGHTS["adherence"],
    lpips_weights: str | None = EVAL_WEIGHTS["lpips_weights"],
    poses: bool = EVAL_WEIGHTS["poses"],
) -> None:
    """Reproduce the shape of the paper's ablation tables on a procedural benchmark: a table and a plot."""
    from batch.evaluate import run_ablation

    tools = eval_tools(inception, clip, faed, adherence, lpips_weights, poses)
    try:
        rows = run_ablation(study, model, dataset, out, tools, ints(samples, "--samples"), ints(refs, "--refs"),
                            one_stage_model, num_tours=num_tours, views=views, steps=steps, replicas=replicas,
                            seed=seed, scheduler=scheduler)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for row in rows:
        typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                            if v is not None))
    typer.echo(f"report: {out}/report.md")


def print_metrics(metrics: dict, out: str) -> None:
    """Summary lines of an evaluation."""
    from diffpano.metrics.evaluation import SUMMARY_KEYS

    for key in SUMMARY_KEYS:
        if isinstance(metrics.get(key), float):
            typer.echo(f"{key:28s} {metrics[key]:.4g}")
    for line in metrics.get("missing", []):
        typer.echo(f"not measured: {line}")
    typer.echo(f"report: {out}/report.md, {out}/metrics.json")


def register(commands: Commands) -> None:
    """Add the offline sub-commands."""
    commands.group("dataset").command("build")(dataset_build)
    commands.group("dataset").command("render")(dataset_render)
    commands.group("dataset").command("capture")(dataset_capture)
    commands.app.command()(bulk)
    commands.app.command("eval")(evaluate)
    commands.app.command()(ablate)
