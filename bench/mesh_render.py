"""Mesh rendering speed on one core: panoramas/s of the mesh renderer (Open3D Embree ray casting plus shading) at
256x512 and 512x1024, for the tests' two-room mesh, for it subdivided past 500 k triangles, and for a procedural
scene through its mesh; side by side with the procedural box ray caster and with trimesh's ray casters (numpy +
rtree, and embreex when installed; first hits only, no colours), and the whole keyframe (render, captions from
labels, PNGs).
Run: python bench/mesh_render.py [--frames 8] [--subdivide 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core

import numpy as np  # noqa: E402
from common import format_table, write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mesh_rooms import write_glb  # noqa: E402

from diffpano.data.captions import SceneGraphCaptioner, TemplateSummariser  # noqa: E402
from diffpano.data.meshes.captions import caption_mesh_frame  # noqa: E402
from diffpano.data.meshes.mesh import load_mesh  # noqa: E402
from diffpano.data.meshes.raycast import MeshRenderer  # noqa: E402
from diffpano.data.meshes.walkable import floor_map, walk_poses  # noqa: E402
from diffpano.data.procedural.render import SceneRenderer, erp_directions  # noqa: E402
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer  # noqa: E402
from diffpano.data.procedural.scenes import generate_scene  # noqa: E402
from diffpano.data.procedural.walks import clip_poses  # noqa: E402
from diffpano.io.depth import depth_png_bytes  # noqa: E402
from diffpano.io.manifest import png_bytes  # noqa: E402

SIZES = ((256, 512), (512, 1024))


def per_s(render, poses: np.ndarray) -> float:
    """Panoramas per second of render(pose) over the poses, after one warm-up."""
    render(poses[0])
    started = time.perf_counter()
    for pose in poses:
        render(pose)
    return len(poses) / (time.perf_counter() - started)


def mesh_case(path: Path, frames: int) -> tuple[MeshRenderer, np.ndarray, int, float]:
    """(one-thread renderer, walk poses, triangles, load + floor-map seconds) of a mesh file."""
    started = time.perf_counter()
    renderer = MeshRenderer(load_mesh(path, up="y"), threads=1)
    poses = walk_poses(floor_map(renderer, 1.5, 0.3), frames, 0.5, np.random.default_rng(0))
    return renderer, poses, len(renderer.mesh.triangles), time.perf_counter() - started


def trimesh_rate(path: Path, poses: np.ndarray, h: int, w: int, engine: str) -> float | str:
    """Panoramas/s of one of trimesh's ray casters on the mesh at h x w (or why it cannot run): `ray_triangle`
    (numpy + rtree) or `ray_pyembree` (embreex, Embree 4 through trimesh)."""
    import importlib

    import trimesh

    try:
        module = importlib.import_module(f"trimesh.ray.{engine}")
        importlib.import_module("rtree" if engine == "ray_triangle" else "embreex")
    except ImportError as err:
        return f"not installed ({err.name}: pip install {err.name})"
    mesh = trimesh.load(str(path), force="mesh", process=False)
    caster = module.RayMeshIntersector(mesh)
    dirs = erp_directions(h, w).reshape(-1, 3)

    def render(pose: np.ndarray) -> None:
        world = dirs @ pose[:3, :3].T
        origin = (pose[:3, 3] * [1, -1, -1])[None].repeat(len(world), 0)  # world -> glTF's y-up frame
        caster.intersects_first(origin, world * [1, -1, -1])

    return per_s(render, poses[:2])


def main() -> None:
    """Time every renderer at every size and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--subdivide", type=int, default=7, help="rounds of 4x triangles for the large mesh")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="diffpano-bench-mesh-"))
    rows, results = [], {}
    cases = {"two-room mesh": mesh_case(write_glb(work / "rooms.glb"), args.frames),
             "two-room mesh, subdivided": mesh_case(write_glb(work / "big.glb", args.subdivide), args.frames)}
    for name, (renderer, poses, tris, setup_s) in cases.items():
        for h, w in SIZES:
            rate = per_s(lambda p, r=renderer, h=h, w=w: r.render(p, h, w), poses)
            rows.append([name, f"{tris:,}", f"{h}x{w}", f"{rate:.1f}", f"{setup_s:.1f}"])
            results[f"{name} {h}x{w}"] = {"triangles": tris, "panoramas_per_s": rate, "setup_s": setup_s}
    scene = generate_scene(1000)
    poses = clip_poses(scene, args.frames, 0.5, np.random.default_rng(0))
    started = time.perf_counter()
    procedural = SceneMeshRenderer(scene, threads=1)
    setup_s = time.perf_counter() - started
    for name, renderer, tris in (("procedural scene, its mesh", procedural, f"{len(procedural.mesh.triangles):,}"),
                                 ("procedural scene, box ray caster", SceneRenderer(scene), "(boxes)")):
        for h, w in SIZES:
            rate = per_s(lambda p, r=renderer, h=h, w=w: r.render(p, h, w), poses)
            rows.append([name, tris, f"{h}x{w}", f"{rate:.1f}", f"{setup_s:.2f}" if "mesh" in name else "-"])
            results[f"{name} {h}x{w}"] = {"panoramas_per_s": rate}
    renderer, poses, tris, _ = cases["two-room mesh"]
    dirs = erp_directions(256, 512).reshape(-1, 3)
    rate = per_s(lambda p: renderer.cast(p[:3, 3].astype(np.float32)[None], (dirs @ p[:3, :3].T).astype(np.float32)),
                 poses)
    rows.append(["Open3D RaycastingScene (hits only)", f"{tris:,}", "256x512", f"{rate:.2f}", "-"])
    results["open3d hits 256x512"] = {"panoramas_per_s": rate}
    for engine, (h, w) in (("ray_triangle", (64, 128)), ("ray_pyembree", (256, 512))):
        rate = trimesh_rate(work / "rooms.glb", poses, h, w, engine)
        rows.append([f"trimesh {engine} (hits only)", f"{tris:,}", f"{h}x{w}",
                     f"{rate:.2f}" if isinstance(rate, float) else rate, "-"])
        results[f"trimesh {engine} {h}x{w}"] = {"panoramas_per_s": rate}
    summariser = TemplateSummariser(0)

    def keyframe(pose: np.ndarray) -> None:
        view = renderer.render(pose, 256, 512)
        caption_mesh_frame(renderer, pose, SceneGraphCaptioner(), summariser)
        png_bytes(view.rgb), depth_png_bytes(view.depth)

    rate = per_s(keyframe, poses)
    rows.append(["whole mesh keyframe (+captions, PNGs)", f"{tris:,}", "256x512", f"{rate:.1f}", "-"])
    results["mesh keyframe 256x512"] = {"panoramas_per_s": rate}
    print(f"{args.frames} keyframes per case, one thread, loadavg {os.getloadavg()[0]:.2f}")
    print(format_table(["renderer", "triangles", "size", "panoramas/s", "load + floor map s"], rows))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
