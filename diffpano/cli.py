"""The `diffpano` command: one entry point with sub-commands."""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path

import typer

from diffpano.pipelines import DEFAULT_GUIDANCE

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DiffPano: text to consistent 360° panorama tours.")

dataset_app = typer.Typer(no_args_is_help=True, help="Build and import training datasets (docs/datasets.md).")
app.add_typer(dataset_app, name="dataset")

manifest_app = typer.Typer(no_args_is_help=True, help="Maintain Parquet manifests (docs/datasets.md, docs/tours.md).")
app.add_typer(manifest_app, name="manifest")

DEFAULT_OUT = "outputs/tours"


def finite(value: float | None) -> float | None:
    """A float option's value; NaN and ±inf are refused (click's ranges let them through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """(height, width) of 'HxW', or (None, None) for the model's default."""
    if not size:
        return None, None
    try:
        h, w = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"--size: expected HxW such as 128x256, got {size!r}") from None
    return h, w


def tour_poses(trajectory: str, views: int, spacing: float):
    """Poses and optional per-view prompts of a named trajectory or a JSON file."""
    from diffpano.trajectories import load_trajectory, named_trajectory

    if trajectory in ("walk", "orbit"):
        params = {"spacing": spacing} if trajectory == "walk" else {}
        return named_trajectory(trajectory, views, params), None
    return load_trajectory(trajectory, views)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text for every view (or the default for views without their own)."),
    prompts_per_view: list[str] | None = typer.Option(None, "--prompts-per-view", help="One per view, repeated."),
    views: int = typer.Option(4, "--views", min=1, max=64, help="Number of views in the tour."),
    trajectory: str = typer.Option("walk", help="walk, orbit, or a JSON file of poses."),
    spacing: float = typer.Option(1.0, help="Metres between views of a walk.", callback=finite),
    out: str = typer.Option(DEFAULT_OUT, "--out", help="Output folder or s3:// prefix (docs/tours.md)."),
    seed: int | None = typer.Option(None, help="Seed that reproduces the tour (random when omitted)."),
    steps: int = typer.Option(30, "--steps", min=1, max=1000, help="Sampler steps."),
    guidance: float = typer.Option(DEFAULT_GUIDANCE, "--guidance", min=0.0, callback=finite,
                                   help="Classifier-free guidance scale."),
    size: str | None = typer.Option(None, "--size", help="HxW, W = 2H (default: the model's size)."),
    no_epipolar: bool = typer.Option(False, "--no-epipolar", help="Switch the EA modules off (views denoised alone)."),
    num_ref_views: int | None = typer.Option(None, "--num-ref-views", help="K reference views per view."),
    num_samples: int | None = typer.Option(None, "--num-samples", help="S samples per epipolar arc."),
    model: str | None = typer.Option(None, "--model", help="Model directory or s3:// URI (default: bundled)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: automatic)."),
) -> None:
    """Generate one multi-view tour and add it to the output (images + Parquet manifest)."""
    from diffpano.manifest import Tour, commit_tours
    from diffpano.modelio import resolve_model

    height, width = parse_size(size)
    try:
        poses, file_prompts = tour_poses(trajectory, views, spacing)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(f"--trajectory {trajectory}: {err}") from None
    prompts = list(prompts_per_view or file_prompts or [prompt] * len(poses))
    if len(prompts) != len(poses):
        raise typer.BadParameter(f"--prompts-per-view: got {len(prompts)} prompts for {len(poses)} views")
    started = time.perf_counter()
    pipe = resolve_model(model, device)
    typer.echo(f"model {pipe.model_name} on {pipe.device}; {len(poses)} views")
    try:
        result = pipe(
            prompts, poses, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
            num_ref_views=num_ref_views, num_samples=num_samples, use_epipolar=not no_epipolar,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    tour = Tour(
        tour_id=f"tour-{uuid.uuid4().hex[:12]}", images=result.images[0], prompts=result.prompts[0],
        poses=result.poses[0], seed=result.seeds[0], model=pipe.model_name, num_inference_steps=steps,
        guidance_scale=guidance,
    )
    part = commit_tours(out, [tour])
    h, w = tour.images.shape[1:3]
    typer.echo(
        f"tour {tour.tour_id}: {len(tour.images)} views {h}x{w}, seed {tour.seed}, "
        f"{time.perf_counter() - started:.1f}s -> {out} (manifest part {Path(part).name})"
    )


@app.command()
def video(
    output: str = typer.Argument(..., help="Output folder or s3:// prefix holding the tour."),
    tour: str | None = typer.Option(None, "--tour", help="Tour id (default: the latest tour)."),
    out: Path = typer.Option(Path("tour.gif"), "--out", help="Video file: .gif or .mp4."),
    frames_per_view: int = typer.Option(12, min=1, max=240, help="Frames rendered per view."),
    fov: float = typer.Option(90.0, min=10.0, max=170.0, help="Horizontal field of view, degrees.", callback=finite),
    fps: int = typer.Option(12, min=1, max=120),
) -> None:
    """Render a perspective walk-through of a generated tour as a video."""
    import numpy as np

    from diffpano import storage
    from diffpano.manifest import decode_rgb, read_manifest
    from diffpano.video import walkthrough_frames, write_video

    table = read_manifest(output).to_pandas()
    if table.empty:
        raise typer.BadParameter(f"OUT: no tours in {output}")
    tour_id = tour or table.sort_values("created_at")["tour_id"].iloc[-1]
    rows = table[table.tour_id == tour_id].sort_values("view_index")
    if rows.empty:
        raise typer.BadParameter(f"--tour: no tour {tour_id!r} in {output}")
    images = [decode_rgb(storage.read_bytes(storage.join(output, u))) for u in rows.image_uri]
    poses = np.stack([np.asarray(p, dtype=np.float64).reshape(4, 4) for p in rows.pose_c2w])
    frames = walkthrough_frames(images, poses, frames_per_view=frames_per_view, fov_deg=fov)
    path = write_video(frames, out, fps=fps)
    typer.echo(f"tour {tour_id}: {len(frames)} frames -> {path}")


@dataset_app.command("build")
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
    from diffpano.data.build import BuildSpec
    from trainer.dataset_builder import build_dataset

    height, width = parse_size(size)
    spec = BuildSpec(scenes=scenes, clips_per_scene=clips_per_scene, frames=frames, height=height, width=width,
                     spacing=spacing, seed=seed, depth=not no_depth, captioner=captioner, summariser=summariser)
    try:
        summary = build_dataset(spec, out, progress=not quiet, processes=processes)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(summary.line())


@dataset_app.command("import")
def dataset_import(
    images_dir: str = typer.Argument(..., help="Folder (or s3:// prefix) of equirectangular images, W = 2H."),
    poses_file: str = typer.Argument(..., help="JSON or CSV records: image, caption, pose_c2w[, depth, scene_id, "
                                     "clip_id, frame_index]."),
    out: str = typer.Option(..., "--out", help="Dataset folder or s3:// prefix (docs/datasets.md)."),
) -> None:
    """Import existing panoramas with poses and captions as a training dataset; clips already there are skipped."""
    from diffpano.data.importer import import_dataset

    try:
        summary = import_dataset(images_dir, poses_file, out)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(summary.line())


def _eval_tools(inception, clip, faed, adherence, lpips_weights):
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


@app.command("eval")
def evaluate(
    out: str = typer.Option("outputs/eval", "--out", help="Report folder or s3:// prefix."),
    model: str | None = typer.Option(None, "--model", help="Model directory or s3:// URI (default: bundled)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset (docs/datasets.md) with the test clips."),
    tours: str | None = typer.Option(None, "--tours", help="Score already generated tours (docs/tours.md) instead."),
    num_tours: int = typer.Option(8, "--num-tours", min=1, help="Test tours drawn from the dataset."),
    views: int = typer.Option(4, "--views", min=1, max=64, help="Views per test tour."),
    steps: int = typer.Option(20, "--steps", min=1, max=1000),
    guidance: float = typer.Option(DEFAULT_GUIDANCE, "--guidance", min=0.0, callback=finite),
    size: str | None = typer.Option(None, "--size", help="HxW to generate at (default: the model's size)."),
    replicas: int = typer.Option(2, "--replicas", min=1, help="Model replicas (Ray actors) generating tours."),
    seed: int = typer.Option(0, "--seed"),
    inception: str | None = EVAL_WEIGHTS["inception"],
    clip: str | None = EVAL_WEIGHTS["clip"],
    faed: str | None = EVAL_WEIGHTS["faed"],
    adherence: str | None = EVAL_WEIGHTS["adherence"],
    lpips_weights: str | None = EVAL_WEIGHTS["lpips_weights"],
) -> None:
    """Evaluate a model on a dataset's test clips (or score given tours): metrics.json, report.md, pictures."""
    from trainer.evaluate import evaluate_model, evaluate_tours

    if not tours and not dataset:
        raise typer.BadParameter("--dataset: give a dataset to evaluate a model on, or --tours to score outputs")
    tools = _eval_tools(inception, clip, faed, adherence, lpips_weights)
    try:
        if tours:
            metrics = evaluate_tours(tours, out, tools, dataset, seed)
        else:
            metrics = evaluate_model(model, dataset, out, tools, num_tours, views, steps, guidance, parse_size(size)
                                     if size else None, replicas, seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    _print_metrics(metrics, out)


@app.command()
def ablate(
    study: str = typer.Argument(..., help="sk (samples S x reference views K), ea (with/without EA), stages."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset (docs/datasets.md) with the test clips."),
    out: str = typer.Option("outputs/ablation", "--out", help="Report folder or s3:// prefix."),
    model: str | None = typer.Option(None, "--model", help="Model (the two-stage one for 'stages')."),
    one_stage_model: str | None = typer.Option(None, "--one-stage-model", help="One-stage model for 'stages'."),
    samples: str = typer.Option("2,4,8", "--samples", help="S values for 'sk'."),
    refs: str = typer.Option("1,2", "--refs", help="K values for 'sk'."),
    num_tours: int = typer.Option(4, "--num-tours", min=1),
    views: int = typer.Option(4, "--views", min=2, max=64),
    steps: int = typer.Option(20, "--steps", min=1, max=1000),
    replicas: int = typer.Option(2, "--replicas", min=1),
    seed: int = typer.Option(0, "--seed"),
    inception: str | None = EVAL_WEIGHTS["inception"],
    clip: str | None = EVAL_WEIGHTS["clip"],
    faed: str | None = EVAL_WEIGHTS["faed"],
    adherence: str | None = EVAL_WEIGHTS["adherence"],
    lpips_weights: str | None = EVAL_WEIGHTS["lpips_weights"],
) -> None:
    """Reproduce the shape of the paper's ablation tables on a procedural benchmark: a table and a plot."""
    from trainer.evaluate import run_ablation

    def ints(text: str, name: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"{name}: expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise typer.BadParameter(f"{name}: expected positive integers, got {text!r}")
        return values

    tools = _eval_tools(inception, clip, faed, adherence, lpips_weights)
    try:
        rows = run_ablation(study, model, dataset, out, tools, ints(samples, "--samples"), ints(refs, "--refs"),
                            one_stage_model, num_tours=num_tours, views=views, steps=steps, replicas=replicas,
                            seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for row in rows:
        typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                            if v is not None))
    typer.echo(f"report: {out}/report.md")


@app.command()
def train(
    stages: str = typer.Argument(..., help="vae, stage1, stage2 or all (the VAE stage when vae.steps > 0)."),
    config: str = typer.Option(..., "--config", help="YAML training config (see trainer/configs/)."),
    name: str = typer.Option(..., "--name", help="Run name; running the same name again resumes it."),
    storage_root: str = typer.Option("outputs/runs", "--storage", help="Folder or s3:// prefix for runs."),
    overrides: list[str] | None = typer.Option(None, "--set", help="Override a config key: key.path=value."),
    local: str | None = typer.Option(None, "--local", help="Train in this process on DEVICE (cpu, cuda) without "
                                     "Ray: one worker, caches encoded here, no resume."),
) -> None:
    """Train on Ray Train (stage 1: Pano-SD; stage 2: EA modules); the model lands in STORAGE/NAME/model."""
    import re as _re

    from trainer.config import load_config

    chosen = {"vae": [0], "stage1": [1], "stage2": [2], "all": [0, 1, 2]}.get(stages)
    if chosen is None:
        raise typer.BadParameter(f"STAGES: expected vae, stage1, stage2 or all, got {stages!r}")
    if not _re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise typer.BadParameter(f"--name: letters, digits, '.', '_' and '-' only, got {name!r}")
    if local is not None and not _re.fullmatch(r"cpu|cuda(:\d+)?", local):
        raise typer.BadParameter(f"--local: a device, cpu or cuda[:N], got {local!r}")
    try:
        cfg = load_config(config, overrides)
        if stages == "all" and not cfg.vae.steps:
            chosen = [1, 2]
        from trainer.run import run_paths
        from trainer.run import train as run_training

        results = run_training(cfg, chosen, name, storage_root, local)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for r in results:
        loss = "—" if r.loss is None else f"{r.loss:.4f}"
        label = "vae" if r.stage == 0 else f"stage{r.stage}"
        typer.echo(f"{label}: {r.steps} steps, final loss {loss}, {r.seconds:.1f}s -> {r.export}")
    # A VAE-only run exports vae-model; every other run ends in the run's model folder.
    typer.echo(f"model: {results[-1].export if chosen == [0] else run_paths(storage_root, name)['model']}")


@app.command()
def bulk(
    specs: str | None = typer.Option(None, "--specs", help="Tour specs (docs/bulk-specs.md): JSONL or Parquet, local or s3://."),
    synthetic: int | None = typer.Option(None, "--synthetic", min=1, help="Make N specs from procedural scenes."),
    views: int = typer.Option(4, "--views", min=1, max=16, help="Views per synthetic tour."),
    steps: int | None = typer.Option(None, "--steps", min=1, max=200, help="Sampler steps of synthetic tours."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic specs."),
    out: str = typer.Option("outputs/bulk", "--out", help="Output folder or s3:// prefix (docs/tours.md)."),
    model: str | None = typer.Option(None, "--model", help="Model directory or s3:// URI (default: bundled)."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Model replicas (Ray actors)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Tours per replica call and manifest part."),
    gpus: float = typer.Option(0.0, "--gpus-per-replica", min=0.0, callback=finite),
    cpus: float = typer.Option(1.0, "--cpus-per-replica", min=0.1, callback=finite),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip invalid specs instead of refusing."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="Run on a server (http://HOST:PORT) as a job; "
                                        "--out is then a prefix under the server's output root."),
) -> None:
    """Generate many tours on a pool of Ray actors; a re-run completes what is missing, exactly once."""
    from serve.bulk import read_spec_rows, run_bulk, run_online, synthetic_specs, validate_specs

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
    if endpoint:
        started = time.perf_counter()
        try:
            status = run_online(endpoint, good, out, os.environ.get("DIFFPANO_API_KEY"))
        except (ValueError, OSError) as err:
            raise typer.BadParameter(str(err)) from None
        typer.echo(f"job {status['job_id']} {status['state']}: {status['tours_done']} tours done, "
                   f"{status['tours_failed']} failed of {status['tours_total']}, "
                   f"{time.perf_counter() - started:.1f}s -> {status['manifest_uri']}")
        return
    summary = run_bulk(good, out, model, replicas, batch_size, gpus, cpus, invalid=invalid)
    typer.echo(summary.line())
    if summary.failures_uri:
        typer.echo(f"failures and invalid specs: {summary.failures_uri}")
    typer.echo(f"view it: diffpano serve --output-root {summary.out}, then /viewer?tour=<tour_id>")


@app.command("pack-model")
def pack_model_command(
    src: str = typer.Argument(..., help="Model directory or s3:// URI (a trained run's STORAGE/NAME/model)."),
    dst: Path = typer.Argument(..., help="Local folder to write (replaced)."),
    text_encoder_package: str | None = typer.Option(None, help="Reference this package instead of the weights."),
    fp16: list[str] | None = typer.Option(None, "--fp16", help="Components stored in float16 (e.g. unet)."),
) -> None:
    """Copy a model for shipping: the text encoder as a package reference, some components in float16."""
    from diffpano.modelio import pack_model

    try:
        out = pack_model(src, str(dst), text_encoder_package, tuple(fp16 or ()))
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from None
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    typer.echo(f"packed {src} -> {out} ({size / 2**20:.1f} MiB)")


@app.command("serve")
def serve_command(
    config: str | None = typer.Option(None, "--config", help="Serve config YAML (default: the packaged one)."),
    host: str | None = typer.Option(None, "--host", help="Address to listen on (config default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", min=1, max=65535),
    model: str | None = typer.Option(None, "--model", help="Model directory or s3:// URI (default: bundled)."),
    output_root: str | None = typer.Option(None, "--output-root", help="Where output=store writes (docs/tours.md)."),
) -> None:
    """Serve the HTTP API (docs/http-api.md) and the 360° viewer on Ray Serve until interrupted."""
    from ray import serve

    from serve.run import start

    try:
        url = start(config, host, port, {"model": model, "output_root": output_root})
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"DiffPano API at {url}/v1/tours and {url}/v1/panoramas; viewer at {url}/viewer; docs at {url}/docs")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("shutting down")
        serve.shutdown()


@manifest_app.command("compact")
def manifest_compact(
    uri: str = typer.Argument(..., help="An output (folder or s3:// prefix) holding manifest/."),
    into: str | None = typer.Option(None, "--into", help="Write the compacted manifest to this new output instead "
                                    "(required for s3://: S3 has no atomic swap); image URIs become absolute."),
) -> None:
    """Merge the manifest's parts into one; a concurrent reader never sees a duplicate or a missing row."""
    from diffpano.compaction import compact

    try:
        summary = compact(uri, into)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(f"{summary.manifest}: {summary.parts_before} parts -> {summary.parts_after}, {summary.rows} rows")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    kind: str = typer.Argument(..., help="train or bulk; the arguments after it are that command's."),
    address: str | None = typer.Option(None, "--address", help="Dashboard URL http://HEAD:8265 "
                                       "(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, then 127.0.0.1:8265)."),
    working_dir: str | None = typer.Option(None, "--working-dir", help="Code sent with the job (default: this "
                                           "checkout; none for an installed package: the cluster's image runs it)."),
    no_working_dir: bool = typer.Option(False, "--no-working-dir", help="Send no code: run the image's diffpano."),
    submission_id: str | None = typer.Option(None, "--submission-id", help="Job id (default: diffpano-KIND-<hex>)."),
    aws_credentials: bool = typer.Option(True, "--aws-credentials/--no-aws-credentials", help="Pass this shell's "
                                         "AWS keys (off: the cluster's IAM role / IRSA); endpoint and region always."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's log until it ends."),
) -> None:
    """Run `diffpano train|bulk ...` on a Ray cluster as a Ray job (AWS_* variables passed through, not stored)."""
    from cluster.submit import follow, repository_root
    from cluster.submit import submit as submit_job

    if working_dir and no_working_dir:
        raise typer.BadParameter("--working-dir and --no-working-dir: give one of them")
    code = None if no_working_dir else (working_dir or repository_root())
    try:
        job = submit_job(kind, list(ctx.args), address=address, working_dir=code, submission_id=submission_id,
                         credentials=aws_credentials)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    except (OSError, RuntimeError) as e:  # unreachable dashboard, refused or duplicate job, 401
        typer.echo(f"submission failed: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"submitted {job.job_id} to {job.address}: {job.entrypoint}")
    if not wait:
        typer.echo(f"follow: ray job logs -f {job.job_id} --address {job.address}")
        return
    try:
        status = follow(job)
    except KeyboardInterrupt:
        typer.echo(f"\nthe job keeps running; stop it with: ray job stop {job.job_id} --address {job.address}")
        raise typer.Exit(130) from None
    except (OSError, RuntimeError) as e:
        typer.echo(f"lost the job's log ({e}); it may still be running: ray job status {job.job_id} "
                   f"--address {job.address}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"job {job.job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


def _print_metrics(metrics: dict, out: str) -> None:
    """Summary lines of an evaluation."""
    from diffpano.evaluation import SUMMARY_KEYS

    for key in SUMMARY_KEYS:
        if isinstance(metrics.get(key), float):
            typer.echo(f"{key:28s} {metrics[key]:.4g}")
    for line in metrics.get("missing", []):
        typer.echo(f"not measured: {line}")
    typer.echo(f"report: {out}/report.md, {out}/metrics.json")


def main() -> None:
    """Entry point of the `diffpano` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
