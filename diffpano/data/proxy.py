"""Geometry proxies of generated tours (docs/guide/generate.md): a mesh you give, or a procedural house laid out as
a prompt says. A proxy is the tour's poses (a walk over its floor unless given) and the renders and depth there,
which the pipeline starts its views from (img2img) and the tour keeps as its depth."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffpano.data.meshes.mesh import load_mesh
from diffpano.data.meshes.raycast import MeshRenderer
from diffpano.data.meshes.walkable import floor_map, walk_poses
from diffpano.data.procedural.prompts import floor_named, parse_prompt
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer
from diffpano.data.procedural.scenes import generate_scene
from diffpano.data.procedural.walks import clip_poses
from diffpano.io import storage
from diffpano.specs import TourSpec

CAMERA_HEIGHT, CLEARANCE = 1.5, 0.3  # as `dataset render` walks (MeshSpec's defaults)


@dataclass
class Proxy:
    """A tour's geometry: camera-to-world poses (N, 4, 4), renders (N, H, W, 3) uint8, depth (N, H, W) metres."""

    poses: np.ndarray
    rgb: np.ndarray
    depth: np.ndarray


def mesh_proxy(path: str, height: int, width: int, views: int, poses: np.ndarray | None = None,
               spacing: float = 1.0, seed: int = 0, up: str = "y", unit_scale: float = 1.0) -> Proxy:
    """The mesh rendered at the tour's poses: `poses` in the mesh's world (after up and unit_scale), or a walk of
    `views` keyframes `spacing` metres apart over its floor, drawn by seed; ValueError naming what is wrong."""
    renderer = MeshRenderer(load_mesh(path, up, unit_scale))
    if poses is None:
        floor = floor_map(renderer, CAMERA_HEIGHT, CLEARANCE)
        poses = walk_poses(floor, views, spacing, np.random.default_rng(seed))
    return rendered(renderer, poses, height, width)


def layout_proxy(seed: int, height: int, width: int, views: int, spacing: float = 1.0, kind: str | None = None,
                 wall: str | None = None, floor: str | None = None) -> Proxy:
    """A procedural house of the seed whose rooms are the room type, wall colour and floor given (the others drawn
    from the seed), rendered along a walk of `views` keyframes `spacing` metres apart through it."""
    scene = generate_scene(seed, kind, wall, floor)
    poses = clip_poses(scene, views, spacing, np.random.default_rng(seed))
    return rendered(SceneMeshRenderer(scene), poses, height, width)


def rendered(renderer, poses: np.ndarray, height: int, width: int) -> Proxy:
    """The proxy of a renderer's views at the poses."""
    views = [renderer.render(np.asarray(p, np.float64), height, width) for p in poses]
    return Proxy(np.asarray(poses, np.float64), np.stack([v.rgb for v in views]),
                 np.stack([v.depth for v in views]).astype(np.float32))


def layout_of(prompt: str) -> tuple[str | None, str | None, str | None]:
    """The room type, wall colour and floor a prompt names (None where it names none)."""
    kind, wall = parse_prompt(prompt)
    return kind, wall, floor_named(prompt)


def spec_proxy(spec: TourSpec, seed: int, height: int, width: int) -> Proxy:
    """The geometry a tour spec names: its laid-out house (from its first prompt), or its mesh (an s3:// one is
    copied to a temporary file: single-file formats such as GLB and PLY), walked by the seed unless the spec gives
    poses or a trajectory; ValueError naming mesh_uri when the mesh cannot be used."""
    if spec.layout:
        return layout_proxy(seed, height, width, spec.view_count(), 1.0, *layout_of(spec.prompt_list()[0]))
    poses = spec.pose_array() if spec.poses is not None or spec.trajectory is not None else None
    if not storage.is_remote(spec.mesh_uri) and not Path(spec.mesh_uri).is_file():
        raise ValueError(f"mesh_uri: there is no file {spec.mesh_uri!r}")
    with tempfile.NamedTemporaryFile(suffix=Path(spec.mesh_uri).suffix) as tmp:
        path = spec.mesh_uri
        try:
            if storage.is_remote(path):
                Path(tmp.name).write_bytes(storage.read_bytes(path))
                path = tmp.name
            return mesh_proxy(path, height, width, spec.view_count(), poses, 1.0, seed)
        except FileNotFoundError:
            raise ValueError(f"mesh_uri: there is no file {spec.mesh_uri!r}") from None
        except ValueError as err:
            raise ValueError(f"mesh_uri: {err}") from None
