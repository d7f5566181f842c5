"""The library's sub-commands (no Ray): generate a tour, render its video, export it for 3D tools, import a dataset,
pack a model, compact a manifest."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import typer

from diffpano.cli import Commands, compile_option, finite, finite_in, parse_size, scheduler_option
from diffpano.defaults import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_VIEWS,
    GEOMETRY_STRENGTH,
    MAX_SEED,
    MAX_STEPS,
    MAX_VIEWS,
)

DEFAULT_OUT = "outputs/tours"


def tour_poses(trajectory: str, views: int | None, spacing: float):
    """Poses and optional per-view prompts of a named trajectory or a JSON file (whose poses set the views)."""
    from diffpano.geometry.trajectories import load_trajectory, named_trajectory

    if trajectory in ("walk", "orbit"):
        params = {"spacing": spacing} if trajectory == "walk" else {}
        return named_trajectory(trajectory, views or DEFAULT_VIEWS, params), None
    if not Path(trajectory).is_file():
        raise ValueError(f"expected walk, orbit or a JSON file of poses; there is no file {trajectory!r}")
    return load_trajectory(trajectory, views)


def generate(
    prompt: str = typer.Argument(..., help="Text for every view (or the default for views without their own)."),
    prompts_per_view: list[str] | None = typer.Option(None, "--prompts-per-view", help="One per view, repeated."),
    views: int | None = typer.Option(None, "--views", min=1, max=MAX_VIEWS,
                                     help=f"Views (default: {DEFAULT_VIEWS}, or a trajectory file's pose count)."),
    trajectory: str = typer.Option("walk", help="walk, orbit, or a JSON file of poses."),
    spacing: float = typer.Option(1.0, help="Metres between views of a walk.", callback=finite),
    out: str = typer.Option(DEFAULT_OUT, "--out", help="Output folder or s3:// prefix (docs/tours.md)."),
    seed: int | None = typer.Option(None, min=0, max=MAX_SEED,
                                    help="Seed that reproduces the tour with the same sampler (random when omitted)."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, max=MAX_STEPS, help="Sampler steps."),
    guidance: float = typer.Option(DEFAULT_GUIDANCE, "--guidance", callback=finite_in(0.0),
                                   help="Classifier-free guidance scale."),
    size: str | None = typer.Option(None, "--size", help="HxW, W = 2H (default: the model's size)."),
    scheduler: str | None = scheduler_option(),
    no_epipolar: bool = typer.Option(False, "--no-epipolar", help="Switch the EA modules off (views denoised alone)."),
    num_ref_views: int | None = typer.Option(None, "--num-ref-views", help="K reference views per view."),
    num_samples: int | None = typer.Option(None, "--num-samples", help="S samples per epipolar arc."),
    model: str | None = typer.Option(None, "--model", help="Model directory or s3:// URI (default: bundled)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: automatic)."),
    lora: str | None = typer.Option(None, "--lora", help="A LoRA directory (diffusers' pytorch_lora_weights."
                                    "safetensors, e.g. a run's STORAGE/NAME/lora) applied to the model."),
    compile: str | None = compile_option(),
    image: list[str] | None = typer.Option(None, "--image", help="INDEX=PANORAMA: your own 2:1 panorama (PNG, "
                                           "JPEG; local or s3://) as view INDEX, kept exactly; repeatable."),
    mesh: Path | None = typer.Option(None, "--mesh", help="A mesh file (GLB, glTF, OBJ, PLY) the tour is made on: "
                                     "rendered at its poses (a walk over its floor unless --trajectory says "
                                     "otherwise), each view generated from its render, its depth kept."),
    layout: bool = typer.Option(False, "--layout", help="Make the tour on a procedural house laid out as the "
                                "prompt says (room type, wall colour, floor; the rest drawn from --seed), as --mesh "
                                "does on a mesh."),
    strength: float | None = typer.Option(None, "--strength", callback=finite_in(0.0, 1.0),
                                          help="With --mesh or --layout: how far each view departs from its render "
                                          f"(1: pure generation on its poses, 0: the render; {GEOMETRY_STRENGTH})."),
    up: str | None = typer.Option(None, "--up", help="With --mesh: its up axis (y: glTF, the default; z: "
                                  "Matterport3D, ScanNet; -y)."),
    unit_scale: float | None = typer.Option(None, "--unit-scale", callback=finite_in(1e-4, 1e4),
                                            help="With --mesh: metres per mesh unit (1; 0.01 for centimetres)."),
) -> None:
    """Generate one multi-view tour and add it to the output (images + Parquet manifest); --image starts it from
    your own panoramas, --mesh makes it on a geometry you give."""
    from diffpano.io.manifest import Tour, commit_tours
    from diffpano.pipelines.compiling import compile_pipeline, is_compiled
    from diffpano.pipelines.given import known_views
    from diffpano.pipelines.loading import check_model, pick_device, resolve_model

    height, width = parse_size(size)
    try:
        pick_device(device)
        check_model(model, (height, width), own_scheduler=scheduler is None)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err)) from None
    try:
        poses, file_prompts = tour_poses(trajectory, views, spacing)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(f"--trajectory {trajectory}: {err}") from None
    if mesh is not None and layout:
        raise typer.BadParameter("--layout: give --mesh or --layout, not both")
    if (mesh is None and (up, unit_scale) != (None, None)) or (not (mesh or layout) and strength is not None):
        raise typer.BadParameter("--strength/--up/--unit-scale: only with --mesh (--strength also with --layout)")
    if layout and trajectory != "walk":
        raise typer.BadParameter("--layout: the tour walks through the house it lays out; --trajectory needs --mesh")
    prompts = list(prompts_per_view or file_prompts or [prompt] * len(poses))
    if len(prompts) != len(poses):
        raise typer.BadParameter(f"--prompts-per-view: got {len(prompts)} prompts for {len(poses)} views")
    given = image_options(image or [])
    started = time.perf_counter()
    pipe = resolve_model(model, device, scheduler=scheduler)
    if lora:
        from diffpano.models.lora import load_lora

        try:
            load_lora(pipe, lora)
        except (ValueError, OSError) as err:
            raise typer.BadParameter(f"--lora {lora}: {err}") from None
    compile_pipeline(pipe, compile or "off")
    typer.echo(f"model {pipe.model_name} on {pipe.device}; {len(poses)} views")
    try:
        known, notes = known_views(given, len(poses), *pipe.check_size(height, width), field="--image")
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for note in notes:
        typer.echo(f"note: {note}")
    proxy = None
    strength = GEOMETRY_STRENGTH if strength is None else strength
    if mesh is not None:
        proxy = mesh_views(mesh, pipe.check_size(height, width), len(poses), None if trajectory == "walk" else poses,
                           spacing, seed, up or "y", unit_scale or 1.0)
        typer.echo(f"mesh {mesh.name}: rendered at {len(proxy.poses)} poses; strength {strength}")
    elif layout:
        proxy, said = layout_views(prompt, pipe.check_size(height, width), len(poses), spacing, seed)
        typer.echo(f"layout: a house of {said}; rendered at {len(proxy.poses)} poses; strength {strength}")
    if proxy is not None:
        poses = proxy.poses
    try:
        result = pipe(
            prompts, poses, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
            scheduler=scheduler, num_ref_views=num_ref_views, num_samples=num_samples, use_epipolar=not no_epipolar,
            known_views=known or None, image=None if proxy is None else proxy.rgb,
            strength=1.0 if proxy is None else strength,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    tour = Tour(
        tour_id=f"tour-{uuid.uuid4().hex[:12]}", images=result.images[0], prompts=result.prompts[0],
        poses=result.poses[0], seed=result.seeds[0], model=pipe.model_name, num_inference_steps=steps,
        guidance_scale=guidance, scheduler=result.scheduler, depths=None if proxy is None else proxy.depth,
    )
    part = commit_tours(out, [tour])
    h, w = tour.images.shape[1:3]
    compiled = f", UNet compiled ({compile})" if is_compiled(pipe.unet) else ""
    typer.echo(
        f"tour {tour.tour_id}: {len(tour.images)} views {h}x{w}, seed {tour.seed}{compiled}, "
        f"{time.perf_counter() - started:.1f}s -> {out} (manifest part {Path(part).name})"
    )


def layout_views(prompt: str, size: tuple[int, int], views: int, spacing: float, seed: int | None):
    """A procedural house laid out as the prompt says, rendered along a walk (diffpano.data.proxy), and what of
    the prompt it follows."""
    from diffpano.data.proxy import layout_of, layout_proxy

    kind, wall, floor = layout_of(prompt)
    said = ", ".join(f"{name} {value}" for name, value in (("room", kind), ("walls", wall), ("floor", floor))
                     if value) or "the seed's rooms (the prompt names no room type, wall colour or floor)"
    return layout_proxy(seed or 0, *size, views, spacing, kind, wall, floor), said


def mesh_views(mesh: Path, size: tuple[int, int], views: int, poses, spacing: float, seed: int | None, up: str,
               unit_scale: float):
    """The mesh rendered at the tour's poses (diffpano.data.meshes.proxy), or BadParameter naming --mesh."""
    from diffpano.data.proxy import mesh_proxy

    if not mesh.is_file():
        raise typer.BadParameter(f"--mesh: there is no file {str(mesh)!r}")
    try:
        return mesh_proxy(str(mesh), *size, views, poses, spacing, seed or 0, up, unit_scale)
    except ValueError as err:
        raise typer.BadParameter(f"--mesh {mesh.name}: {err}") from None


def image_options(values: list[str]) -> dict:
    """--image INDEX=PANORAMA values as decoded panoramas by view index (BadParameter naming what is wrong)."""
    from diffpano.pipelines.given import decode_panorama, given_bytes

    given = {}
    for value in values:
        index, sep, uri = value.partition("=")
        if not sep or not index.strip().isdigit() or not uri:
            raise typer.BadParameter(f"--image: expected INDEX=PANORAMA (a view index, then a file), got {value!r}")
        if int(index) in given:
            raise typer.BadParameter(f"--image: view {int(index)} is given twice")
        try:
            given[int(index)] = decode_panorama(given_bytes(uri, f"--image {value}"), f"--image {value}")
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    return given


def video(
    output: str = typer.Argument(..., help="Output folder or s3:// prefix holding the tour."),
    tour: str | None = typer.Option(None, "--tour", help="Tour id (default: the latest tour)."),
    out: Path = typer.Option(Path("tour.gif"), "--out", help="Video file: .gif or .mp4."),
    frames_per_view: int = typer.Option(12, min=1, max=240, help="Frames rendered per view."),
    fov: float = typer.Option(90.0, help="Horizontal field of view, degrees.", callback=finite_in(10.0, 170.0)),
    fps: int = typer.Option(12, min=1, max=120),
) -> None:
    """Render a perspective walk-through of a generated tour as a video."""
    from diffpano.io.manifest import latest_tour_id, read_tours
    from diffpano.io.video import walkthrough_frames, write_video

    tour_id = tour or latest_tour_id(output)
    if tour_id is None:
        raise typer.BadParameter(f"OUT: no tours in {output}")
    try:
        [found] = read_tours(output, [tour_id])
    except ValueError as err:
        raise typer.BadParameter(f"--tour: {err}") from None
    frames = walkthrough_frames(list(found.images), found.poses, frames_per_view=frames_per_view, fov_deg=fov)
    path = write_video(frames, out, fps=fps)
    typer.echo(f"tour {tour_id}: {len(frames)} frames -> {path}")


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


def pack_model(
    src: str = typer.Argument(..., help="Model directory or s3:// URI (a trained run's STORAGE/NAME/model)."),
    dst: Path = typer.Argument(..., help="Local folder to write (replaced)."),
    text_encoder_package: str | None = typer.Option(None, help="Reference this package instead of the weights."),
    fp16: list[str] | None = typer.Option(None, "--fp16", help="Components stored in float16 (e.g. unet)."),
) -> None:
    """Copy a model for shipping: the text encoder as a package reference, some components in float16."""
    from diffpano.pipelines.loading import pack_model as pack

    try:
        out = pack(src, str(dst), text_encoder_package, tuple(fp16 or ()))
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from None
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    typer.echo(f"packed {src} -> {out} ({size / 2**20:.1f} MiB)")


def manifest_compact(
    uri: str = typer.Argument(..., help="An output (folder or s3:// prefix) holding manifest/."),
    into: str | None = typer.Option(None, "--into", help="Write the compacted manifest to this new output instead "
                                    "(required for s3://: S3 has no atomic swap); image URIs become absolute."),
) -> None:
    """Merge the manifest's parts into one; a concurrent reader never sees a duplicate or a missing row."""
    from diffpano.io.compaction import compact

    try:
        summary = compact(uri, into)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(f"{summary.manifest}: {summary.parts_before} parts -> {summary.parts_after}, {summary.rows} rows")


def export(
    uri: str = typer.Argument(..., help="An output (folder or s3:// prefix) holding the tour."),
    tour: str = typer.Option(..., "--tour", help="The id of the tour to export."),
    fmt: str = typer.Option("nerfstudio", "--format", help="nerfstudio (transforms.json, equirectangular "
                               "cameras) or colmap (cube faces, a PINHOLE camera, sparse/0 text model)."),
    out: str = typer.Option(..., "--out", help="A new folder or s3:// prefix to write the export to."),
    face_size: int | None = typer.Option(None, "--face-size", min=1, help="colmap: side of a cube face in pixels "
                                         "(default: half the panorama's height, its angular resolution)."),
) -> None:
    """Export a tour for 3D tools: nerfstudio or COLMAP (Gaussian-splatting trainers); docs/export.md."""
    from diffpano.io import storage
    from diffpano.io.export import FORMATS, export_colmap, export_nerfstudio
    from diffpano.io.manifest import read_tours

    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if storage.list_files(out):
        raise typer.BadParameter(f"--out: {out} already holds files; give a new folder or prefix")
    try:
        [found] = read_tours(uri, [tour])
    except ValueError as err:
        raise typer.BadParameter(f"--tour: {err}") from None
    files = export_nerfstudio(found, out) if fmt == "nerfstudio" else export_colmap(found, out, face_size)
    typer.echo(f"exported tour {tour} ({len(found.images)} views) for {fmt}: {len(files)} files in {out}")


def register(commands: Commands) -> None:
    """Add the library's sub-commands."""
    commands.app.command()(generate)
    commands.app.command()(video)
    commands.app.command("pack-model")(pack_model)
    commands.app.command()(export)
    commands.group("dataset").command("import")(dataset_import)
    commands.group("manifest").command("compact")(manifest_compact)
