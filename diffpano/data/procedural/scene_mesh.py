"""Procedural scenes as triangle meshes, rendered by the mesh ray caster: every room's floor, ceiling and walls
(doorways cut out, windows and doors as panels in their holes), the doorway passages through the wall thickness,
and each piece of furniture's boxes. Triangles carry the box renderer's material, face axis, label code and room,
so `ProceduralShader` shades them exactly as `diffpano.data.procedural.render.SceneRenderer` does, which stays as the
oracle.
`export_glb` writes the geometry with flat material colours for other tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffpano.data.meshes.mesh import Mesh
from diffpano.data.meshes.raycast import MeshRenderer
from diffpano.data.procedural.render import (
    CEILING,
    DOOR,
    FIRST_ITEM_LABEL,
    FLOOR,
    WALL,
    WINDOW,
    SceneRenderer,
    View,
    shade,
)
from diffpano.data.procedural.scenes import Scene
from diffpano.io.manifest import to_uint8

STRUCTURE_LABELS = ["wall", "floor", "ceiling", "window", "door"]  # the box renderer's label codes 0..4
PANELS = {1: WINDOW, 2: DOOR}  # opening kind code -> label (0, a doorway, is a hole)


@dataclass
class Faces:
    """Triangles as they are emitted: corners and, per triangle, material, axis, label and room."""

    corners: list[np.ndarray] = field(default_factory=list)  # (2, 3, 3) per quad
    attrs: list[tuple[int, int, int, int]] = field(default_factory=list)  # per quad: material, axis, label, room

    def quad(self, axis: int, coord: float, u: tuple[float, float], v: tuple[float, float],
             attrs: tuple[int, int, int, int]) -> None:
        """The rectangle u x v on the plane world[axis] = coord (u, v: the other two axes in x, y, z order)."""
        others = [k for k in range(3) if k != axis]
        pts = np.zeros((4, 3))
        pts[:, axis] = coord
        pts[:, others[0]] = [u[0], u[1], u[1], u[0]]
        pts[:, others[1]] = [v[0], v[0], v[1], v[1]]
        self.corners.append(pts[[[0, 1, 2], [0, 2, 3]]])
        self.attrs.append((attrs[0], axis, attrs[2], attrs[3]))

    def box(self, lo: np.ndarray, hi: np.ndarray, material: int, label: int, room: int) -> None:
        """The six faces of an axis-aligned box."""
        for axis in range(3):
            a, b = [k for k in range(3) if k != axis]
            for coord in (lo[axis], hi[axis]):
                self.quad(axis, float(coord), (lo[a], hi[a]), (lo[b], hi[b]), (material, axis, label, room))


def wall_pieces(u: tuple[float, float], v: tuple[float, float],
                holes: list[tuple[float, float, float, float]]) -> list[tuple[float, float, float, float]]:
    """Rectangles (u0, u1, v0, v1) that cover u x v except the holes: a grid on every hole edge, minus hole cells."""
    us = sorted({u[0], u[1]} | {float(np.clip(x, *u)) for h in holes for x in h[:2]})
    vs = sorted({v[0], v[1]} | {float(np.clip(y, *v)) for h in holes for y in h[2:]})
    pieces = []
    for u0, u1 in zip(us, us[1:], strict=False):
        for v0, v1 in zip(vs, vs[1:], strict=False):
            cu, cv = (u0 + u1) / 2, (v0 + v1) / 2
            if u1 - u0 > 1e-9 and v1 - v0 > 1e-9 and not any(h[0] < cu < h[1] and h[2] < cv < h[3] for h in holes):
                pieces.append((u0, u1, v0, v1))
    return pieces


def room_faces(faces: Faces, renderer: SceneRenderer, r: int) -> None:
    """Floor, ceiling, walls with their openings, and furniture of compiled room r (rooms, then passages)."""
    ra = renderer.rooms[r]
    lo, hi = ra.lo.astype(float), ra.hi.astype(float)
    faces.quad(1, hi[1], (lo[0], hi[0]), (lo[2], hi[2]), (ra.floor_mat, 1, FLOOR, r))
    faces.quad(1, lo[1], (lo[0], hi[0]), (lo[2], hi[2]), (renderer.ceiling_mat, 1, CEILING, r))
    for axis in (0, 2):
        along = 2 if axis == 0 else 0  # the wall's horizontal axis
        for coord in (lo[axis], hi[axis]):
            ops = [(o, k) for o, k in zip(ra.openings, ra.opening_kind, strict=True)
                   if int(o[0]) == axis and abs(o[1] - coord) < 1e-3]
            holes = [(float(o[2]), float(o[3]), -float(o[4]), -float(o[5])) for o, _ in ops]  # along, y from -top
            u, v = (lo[along], hi[along]), (lo[1], hi[1])
            for u0, u1, v0, v1 in wall_pieces(u, v, holes):
                faces.quad(axis, coord, *_order(along, (u0, u1), (v0, v1)), (ra.wall_mat, axis, WALL, r))
            for (_, kind), (u0, u1, v0, v1) in zip(ops, holes, strict=True):
                if int(kind) in PANELS:
                    material = renderer.window_mat if int(kind) == 1 else renderer.door_mat
                    faces.quad(axis, coord, *_order(along, (u0, u1), (v0, v1)), (material, axis, PANELS[int(kind)], r))
    for k, (plo, phi, mats) in enumerate(ra.parts):
        for b in range(len(plo)):
            faces.box(plo[b], phi[b], int(mats[b]), FIRST_ITEM_LABEL + int(ra.item_ids[k]), r)


def _order(along: int, horizontal: tuple[float, float], vertical: tuple[float, float]):
    """(u, v) for Faces.quad: the other two axes in x, y, z order (y is vertical)."""
    return (horizontal, vertical) if along == 0 else (vertical, horizontal)


@dataclass
class ProceduralShader:
    """Shades mesh hits as the box renderer does: per-triangle material, face axis and room light."""

    material: np.ndarray  # (T,) int32 into rgb / pattern
    axis: np.ndarray  # (T,) int64
    room: np.ndarray  # (T,) int32
    lights: np.ndarray  # (rooms, 3)
    rgb: np.ndarray
    pattern: np.ndarray

    def __call__(self, tri: np.ndarray, bary: np.ndarray, points: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """uint8 RGB of the hits."""
        return shade(points, dirs, self.axis[tri], self.material[tri], self.lights[self.room[tri]], self.rgb,
                     self.pattern)


def scene_mesh(renderer: SceneRenderer) -> tuple[Mesh, ProceduralShader]:
    """The compiled scene as a mesh (labels: the box renderer's codes, rooms: its compiled rooms) and its shader."""
    faces = Faces()
    for r in range(len(renderer.rooms)):
        room_faces(faces, renderer, r)
    corners = np.concatenate(faces.corners).astype(np.float32)  # (T, 3, 3)
    attrs = np.repeat(np.array(faces.attrs, np.int64), 2, axis=0)
    n = len(corners)
    flat = renderer.rgb[attrs[:, 0]][:, None].repeat(3, 1)  # for export_glb; the shader computes the real colour
    mesh = Mesh(vertices=corners.reshape(-1, 3), triangles=np.arange(3 * n, dtype=np.int32).reshape(n, 3),
                corner_uv=np.zeros((n, 3, 2), np.float32), corner_colour=flat,
                texture_index=np.full(n, -1, np.int32), textures=[],
                label_index=attrs[:, 2].astype(np.int32), room_index=attrs[:, 3].astype(np.int32),
                labels=STRUCTURE_LABELS + [item.noun for item in renderer.items])
    shader = ProceduralShader(attrs[:, 0].astype(np.int32), attrs[:, 1], attrs[:, 3].astype(np.int32),
                              np.stack([r.light for r in renderer.rooms]), renderer.rgb, renderer.pattern)
    return mesh, shader


class SceneMeshRenderer(MeshRenderer):
    """A procedural scene rendered through its mesh, with the scene graph captions read (scene, items, rooms)."""

    def __init__(self, scene: Scene, threads: int = 0) -> None:
        compiled = SceneRenderer(scene)
        mesh, shader = scene_mesh(compiled)
        super().__init__(mesh, threads, shader)
        self.scene, self.items, self.item_room = scene, compiled.items, compiled.item_room

    def render_directions(self, pose: np.ndarray, dirs: np.ndarray) -> View:
        """View along camera-frame directions; ValueError when the camera is outside the rooms."""
        origin = np.asarray(pose, np.float64)[:3, 3]
        if self.scene.locate(float(origin[0]), float(origin[2]))[0] < 0 or not -self.scene.height < origin[1] < 0:
            raise ValueError(f"pose: camera centre {origin.tolist()} is outside the scene's rooms")
        return super().render_directions(pose, dirs)


def export_glb(renderer: SceneMeshRenderer) -> bytes:
    """A procedural scene's mesh as GLB (glTF y-up metres), one node per label with flat material colours (no
    patterns or lighting: those are the shader's); `diffpano dataset render` reads it back with --up y."""
    import trimesh

    mesh = renderer.mesh
    out = trimesh.Scene()
    flip = np.diag([1.0, -1.0, -1.0])
    for index, name in enumerate(mesh.labels):
        sel = mesh.label_index == index
        if not sel.any():
            continue
        corners = mesh.vertices[mesh.triangles[sel]].reshape(-1, 3) @ flip
        colours = to_uint8(mesh.corner_colour[sel].reshape(-1, 3))
        part = trimesh.Trimesh(corners, np.arange(len(corners)).reshape(-1, 3), vertex_colors=colours, process=False)
        out.add_geometry(part, geom_name=f"{name}_{index}", node_name=f"{name}_{index}")
    return out.export(file_type="glb")
