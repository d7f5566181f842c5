"""Offline sub-commands on Ray: dataset build, bulk, eval, ablate."""

from __future__ import annotations

import os
import time

import typer

from diffpano.cli import Commands, command_name, compile_option, finite, finite_in, parse_size, scheduler_option
from diffpano.defaults import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_VIEWS,
    MAX_SPEC_STEPS,
    MAX_SPEC_VIEWS,
    MAX_STEPS,
    MAX_VIEWS,
    REPLICAS,
    TOURS_PER_BATCH,
)


def dataset_build(
    scenes: int = typer.Option(8, "--scenes", help="Number of procedural scenes."),
    clips_per_scene: int = typer.Option(2, "--clips-per-scene", help="Walks (clips) per scene."),
    frames: int = typer.Option(8, "--frames", help="Keyframes per clip."),
    size: str = typer.Option("256x512", "--size", help="HxW of the panoramas, W = 2H."),
    spacing: float = typer.Option(0.5, "--spacing", help="Metres between keyframes.", callback=finite),
    seed: int = typer.Option(0, "--seed", help="Seed of the whole dataset (scenes, walks, captions)."),
    out: str = typer.Option("outputs/dataset", "--out", help="Dataset folder or s3:// prefix (docs/datasets.md)."),
    no_depth: bool = typer.Option(False, "--no-depth", help="Do not write depth panoramas."),
    captioner: str | None = typer.Option(None, "--captioner", help="Local BLIP2 directory for face captions."),
    summariser: str | None = typer.Option(None, "--summariser", help="Local LLM directory to merge captions."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    processes: int | None = typer.Option(None, "--processes", min=1, max=1024,
                                         help="Render with N local processes instead of Ray tasks."),
) -> None:
    """Render a procedural panoramic video-text dataset on Ray; a re-run completes what is missing."""
    from batch.dataset import build_dataset
    from diffpano.data.build import BuildSpec

    height, width = parse_size(size)
    spec = BuildSpec(scenes=scenes, clips_per_scene=clips_per_scene, frames=frames, height=height, width=width,
                     spacing=spacing, seed=seed, depth=not no_depth, captioner=captioner, summariser=summariser)
    try:
        summary = build_dataset(spec, out, progress=not quiet, processes=processes)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(summary.line())


def expand_inputs(patterns: list[str], keep, field: str) -> list[str]:
    """Paths named or matched by globs (a glob keeps those `keep` accepts); BadParameter for a missing one."""
    import glob

    paths = sorted({p for pattern in patterns for p in (
        [g for g in glob.glob(pattern, recursive=True) if keep(g)] if glob.has_magic(pattern) else [pattern])})
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise typer.BadParameter(f"{field}: no such file or folder: {missing[0]}")
    return paths


def run_scene_job(job, make_spec, paths: list[str], out: str, quiet: bool, noun: str) -> None:
    """Validate the spec, run a per-scene dataset job, print its summary and where its failures are; a ValueError
    is a bad parameter (exit code 2)."""
    try:
        summary = job(make_spec().validate(), paths, out, progress=not quiet)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(summary.line())
    if summary.failures_uri:
        typer.echo(f"failed {noun}: {summary.failures_uri}")


def dataset_render(
    meshes: list[str] = typer.Argument(..., help="Mesh files or globs: .glb/.gltf, .obj (+ .mtl), .ply."),
    out: str = typer.Option(..., "--out", help="Dataset folder or s3:// prefix (docs/datasets.md)."),
    clips_per_scene: int = typer.Option(2, "--clips-per-scene", help="Walks (clips) per mesh."),
    frames: int = typer.Option(8, "--frames", help="Keyframes per clip."),
    size: str = typer.Option("256x512", "--size", help="HxW of the panoramas, W = 2H."),
    spacing: float = typer.Option(0.5, "--spacing", help="Metres between keyframes.", callback=finite),
    camera_height: float = typer.Option(1.5, "--camera-height", help="Eye height above the floor, metres.",
                                        callback=finite),
    clearance: float = typer.Option(0.3, "--clearance", help="Metres kept from walls and furniture.", callback=finite),
    up: str = typer.Option("y", "--up", help="The meshes' up axis: y (glTF, HM3D, 3D-FRONT), z (Matterport3D, "
                           "ScanNet, Replica) or -y (already this project's frame)."),
    unit_scale: float = typer.Option(1.0, "--unit-scale", help="Metres per mesh unit (0.01 for centimetres).",
                                     callback=finite),
    seed: int = typer.Option(0, "--seed", help="Seed of the walks and captions."),
    no_depth: bool = typer.Option(False, "--no-depth", help="Do not write depth panoramas."),
    captioner: str | None = typer.Option(None, "--captioner", help="Local BLIP2 directory for face captions "
                                         "(needed, with --summariser, for meshes without semantic labels)."),
    summariser: str | None = typer.Option(None, "--summariser", help="Local LLM directory to merge captions."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Render walks through textured indoor meshes into a panoramic video-text dataset, a Ray task per mesh; failed
    meshes are listed in OUT/failures/, and a re-run completes what is missing."""

    from batch.dataset import render_meshes
    from diffpano.data.mesh import MESH_SUFFIXES
    from diffpano.data.mesh_build import MeshSpec

    def scene_file(name: str) -> bool:  # a glob keeps meshes, not their textures, MTLs or semantic sidecars
        base = os.path.basename(name).lower()
        return base.endswith(MESH_SUFFIXES) and ".semantic." not in base and not base.endswith("_semantic.ply")

    paths = expand_inputs(meshes, scene_file, "MESHES")
    height, width = parse_size(size)
    run_scene_job(render_meshes, lambda: MeshSpec(
        clips_per_scene=clips_per_scene, frames=frames, height=height, width=width, spacing=spacing,
        camera_height=camera_height, clearance=clearance, seed=seed, up=up, unit_scale=unit_scale,
        depth=not no_depth, captioner=captioner, summariser=summariser), paths, out, quiet, "scenes")


def dataset_capture(
    captures: list[str] = typer.Argument(..., help="Equirectangular videos or folders of panoramas, or globs."),
    out: str = typer.Option(..., "--out", help="Dataset folder or s3:// prefix (docs/datasets.md)."),
    frames: int = typer.Option(8, "--frames", help="Keyframes per clip."),
    size: str = typer.Option("256x512", "--size", help="HxW of the written panoramas, W = 2H."),
    sfm_size: str = typer.Option("512x1024", "--sfm-size", help="HxW the panoramas are reconstructed at."),
    keyframe_spacing: float = typer.Option(0.5, "--keyframe-spacing", help="Metres between keyframes.",
                                           callback=finite),
    camera_height: float = typer.Option(1.6, "--camera-height", help="Lens height above the floor, metres: sets "
                                        "the metric scale.", callback=finite),
    scale: float | None = typer.Option(None, "--scale", help="Metres per reconstruction unit, instead of "
                                       "--camera-height.", callback=finite),
    fps: float = typer.Option(2.0, "--fps", help="Video frames read per second.", callback=finite),
    max_frames: int = typer.Option(600, "--max-frames", help="Most frames read from one capture (held in memory)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the reconstruction."),
    captioner: str | None = typer.Option(None, "--captioner", help="Local BLIP2 directory for face captions."),
    summariser: str | None = typer.Option(None, "--summariser", help="Local LLM directory to merge captions."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Turn 360-degree captures into posed, captioned clips: keyframes by sharpness and motion, COLMAP rig SfM,
    upright metric poses; a Ray task per capture, failed captures listed in OUT/failures/, a re-run completes what is
    missing (docs/captures.md)."""

    from batch.dataset import capture_dataset
    from diffpano.data.capture_build import CaptureSpec
    from diffpano.data.capture_frames import is_capture

    paths = expand_inputs(captures, is_capture, "CAPTURES")
    height, width = parse_size(size)
    sfm_height, sfm_width = parse_size(sfm_size, "--sfm-size")
    if sfm_width != 2 * sfm_height:
        raise typer.BadParameter(f"sfm_size: equirectangular panoramas need W = 2H, got {sfm_height}x{sfm_width}")
    run_scene_job(capture_dataset, lambda: CaptureSpec(
        frames=frames, height=height, width=width, sfm_height=sfm_height, keyframe_spacing=keyframe_spacing,
        camera_height=camera_height, scale=scale, fps=fps, max_frames=max_frames, seed=seed, captioner=captioner,
        summariser=summariser), paths, out, quiet, "captures")


def bulk(
    specs: str | None = typer.Option(None, "--specs", help="Tour specs (docs/bulk-specs.md): JSONL or Parquet, "
                                     "local or s3://."),
    synthetic: int | None = typer.Option(None, "--synthetic", min=1, help="Make N specs from procedural scenes."),
    views: int = typer.Option(DEFAULT_VIEWS, "--views", min=1, max=MAX_SPEC_VIEWS, help="Views per synthetic tour."),
    steps: int | None = typer.Option(None, "--steps", min=1, max=MAX_SPEC_STEPS,
                                     help="Sampler steps of synthetic tours."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic specs."),
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
) -> None:
    """Generate many tours on a pool of Ray actors; a re-run completes what is missing, exactly once."""
    from diffpano.specs import read_spec_rows, synthetic_specs, validate_specs

    if (specs is None) == (synthetic is None):
        raise typer.BadParameter("give exactly one of --specs FILE and --synthetic N")
    try:
        rows = read_spec_rows(specs) if specs else synthetic_specs(synthetic, views, seed, steps)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(f"--specs: {err}") from None
    good, invalid = validate_specs(rows)
    if invalid and not skip_invalid:
        for e in invalid[:20]:
            typer.echo(f"invalid spec: {e}", err=True)
        raise typer.BadParameter(f"--specs: {len(invalid)} invalid spec(s) (first: {invalid[0]}); nothing was "
                                 "written (--skip-invalid runs the valid ones)")
    if scheduler:
        good = [s if s.scheduler else s.model_copy(update={"scheduler": scheduler}) for s in good]
    if endpoint:
        return bulk_online(endpoint, good, out)
    from batch.bulk import run_bulk

    try:
        summary = run_bulk(good, out, model, replicas, batch_size, gpus, cpus, invalid=invalid,
                           compile=compile or "off", scheduler=scheduler)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(summary.line())
    if summary.failures_uri:
        typer.echo(f"failures and invalid specs: {summary.failures_uri}")
    typer.echo(f"view it: {command_name()} serve --output-root {summary.out}, then /viewer?tour=<tour_id>")


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


def eval_tools(inception, clip, faed, adherence, lpips_weights):
    """The metric networks from local files, or a clear error naming the option."""
    from diffpano.evaluation import load_tools

    try:
        return load_tools(inception, clip, faed or "bundled", adherence or "bundled", lpips_weights)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(f"metric weights: {err}") from None


EVAL_WEIGHTS = dict(
    inception=typer.Option(None, "--inception", help="TorchScript Inception for FID/IS (inception-2015-12-05.pt)."),
    clip=typer.Option(None, "--clip", help="Local CLIP directory for CLIP score."),
    faed=typer.Option(None, "--faed", help="Panorama autoencoder directory for FAED (default: the bundled one)."),
    adherence=typer.Option(None, "--adherence", help="Adherence classifier directory (default: the bundled one)."),
    lpips_weights=typer.Option(None, "--lpips-weights", help="torchvision backbone weights for LPIPS."),
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
    seed: int = typer.Option(0, "--seed"),
    inception: str | None = EVAL_WEIGHTS["inception"],
    clip: str | None = EVAL_WEIGHTS["clip"],
    faed: str | None = EVAL_WEIGHTS["faed"],
    adherence: str | None = EVAL_WEIGHTS["adherence"],
    lpips_weights: str | None = EVAL_WEIGHTS["lpips_weights"],
) -> None:
    """Evaluate a model on a dataset's test clips (or score given tours): metrics.json, report.md, pictures."""
    from batch.evaluate import evaluate_model, evaluate_tours

    if not tours and not dataset:
        raise typer.BadParameter("--dataset: give a dataset to evaluate a model on, or --tours to score outputs")
    tools = eval_tools(inception, clip, faed, adherence, lpips_weights)
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
    seed: int = typer.Option(0, "--seed"),
    inception: str | None = EVAL_WEIGHTS["inception"],
    clip: str | None = EVAL_WEIGHTS["clip"],
    faed: str | None = EVAL_WEIGHTS["faed"],
    adherence: str | None = EVAL_WEIGHTS["adherence"],
    lpips_weights: str | None = EVAL_WEIGHTS["lpips_weights"],
) -> None:
    """Reproduce the shape of the paper's ablation tables on a procedural benchmark: a table and a plot."""
    from batch.evaluate import run_ablation

    tools = eval_tools(inception, clip, faed, adherence, lpips_weights)
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
    from diffpano.evaluation import SUMMARY_KEYS

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
