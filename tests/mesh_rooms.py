"""A textured two-room mesh built with trimesh for the mesh-rendering tests and benchmark: rooms A and B joined by a
doorway, a window, a sofa, a bed and a table, and a floor texture of 8x8-pixel colour blocks; written as GLB (with
semantic node names), OBJ + MTL + PNG (the floor) and PLY with vertex colours (everything untextured).

Coordinates below are the project's world frame (metres, y down: floor y = 0, ceiling y = -HEIGHT); the GLB is
written in glTF's y-up frame, so `load_mesh(path, up="y")` gives them back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

HEIGHT = 2.6
ROOM_A = (0.0, 4.0, 0.0, 4.0)  # x0, x1, z0, z1
ROOM_B = (4.1, 8.1, 0.0, 4.0)
DOOR = (1.45, 2.55, 2.1)  # z0, z1, top (the partition wall x in [4.0, 4.1])
WINDOW = (1.0, 2.5, 0.9, 2.1, 0.01)  # x0, x1, bottom, top, z (a pane 1 cm in front of the wall z = 0)
BOXES = {  # name: (lo, hi) in the world frame
    "sofa": ((0.3, -0.8, 3.0), (2.3, 0.0, 3.8)),
    "bed": ((6.5, -0.6, 2.0), (8.0, 0.0, 3.9)),
    "table": ((5.0, -0.75, 0.5), (5.8, 0.0, 1.3)),
}
COLOURS = {"wall": (222, 200, 160), "ceiling": (236, 236, 232), "window": (180, 214, 245),
           "sofa": (70, 110, 190), "bed": (235, 235, 235), "table": (128, 86, 56)}
TEXTURE_BLOCKS, BLOCK_PX = 8, 8
FLOOR_UV_PER_M = 0.5  # the texture repeats every 2 m


def floor_texture() -> np.ndarray:
    """(64, 64, 3) uint8: 8x8 blocks of distinct colours."""
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, (TEXTURE_BLOCKS, TEXTURE_BLOCKS, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, BLOCK_PX, 0), BLOCK_PX, 1)


def floor_texel(x: float, z: float) -> np.ndarray:
    """Expected RGB of the floor at world (x, z): the texel at uv = (x, z) * FLOOR_UV_PER_M (origin bottom-left)."""
    tex = floor_texture()
    u, v = (x * FLOOR_UV_PER_M) % 1.0, (z * FLOOR_UV_PER_M) % 1.0
    return tex[int((1 - v) * tex.shape[0]), int(u * tex.shape[1])]


def quad(a, b, c, d) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and two triangles of the quad a-b-c-d."""
    return np.array([a, b, c, d], float), np.array([[0, 1, 2], [0, 2, 3]])


def merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One vertex and triangle array from many."""
    verts, faces, n = [], [], 0
    for v, f in parts:
        verts.append(v)
        faces.append(f + n)
        n += len(v)
    return np.concatenate(verts), np.concatenate(faces)


def wall_x(x: float, z0: float, z1: float, y0: float = -HEIGHT, y1: float = 0.0):
    """A wall quad in the plane x = const."""
    return quad((x, y0, z0), (x, y0, z1), (x, y1, z1), (x, y1, z0))


def wall_z(z: float, x0: float, x1: float, y0: float = -HEIGHT, y1: float = 0.0):
    """A wall quad in the plane z = const."""
    return quad((x0, y0, z), (x1, y0, z), (x1, y1, z), (x0, y1, z))


def walls() -> tuple[np.ndarray, np.ndarray]:
    """Outer walls, the partition (both faces) with its doorway, jambs and lintel."""
    x_end, z0d, z1d, top = ROOM_B[1], DOOR[0], DOOR[1], -DOOR[2]
    parts = [wall_x(0.0, 0, 4), wall_x(x_end, 0, 4), wall_z(0.0, 0, x_end), wall_z(4.0, 0, x_end)]
    for x in (4.0, 4.1):
        parts += [wall_x(x, 0, z0d), wall_x(x, z1d, 4), wall_x(x, z0d, z1d, -HEIGHT, top)]
    parts += [wall_z(z0d, 4.0, 4.1, top, 0.0), wall_z(z1d, 4.0, 4.1, top, 0.0),
              wall_z(0.0, 4.0, 4.1), wall_z(4.0, 4.0, 4.1)]
    parts += [quad((4.0, top, z0d), (4.1, top, z0d), (4.1, top, z1d), (4.0, top, z1d))]
    return merge(parts)


def coloured(name: str, verts: np.ndarray, faces: np.ndarray) -> trimesh.Trimesh:
    """A trimesh with one vertex colour."""
    colours = np.tile(np.array([*COLOURS[name], 255], np.uint8), (len(verts), 1))
    return trimesh.Trimesh(verts, faces, vertex_colors=colours, process=False)


def floor_mesh() -> trimesh.Trimesh:
    """The textured floor under both rooms."""
    x1 = ROOM_B[1]
    verts, faces = quad((0, 0, 0), (0, 0, 4), (x1, 0, 4), (x1, 0, 0))
    uv = verts[:, [0, 2]] * FLOOR_UV_PER_M
    material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(floor_texture()), diffuse=(255, 255, 255))
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)  # a white factor: the texture's own colours
    return trimesh.Trimesh(verts, faces, visual=visual, process=False)


def parts(subdivide: int = 0) -> dict[str, trimesh.Trimesh]:
    """The scene's named parts in the world frame (subdivide: that many rounds of 4x more triangles)."""
    x1 = ROOM_B[1]
    out = {"floor": floor_mesh(), "wall": coloured("wall", *walls()),
           "ceiling": coloured("ceiling", *quad((0, -HEIGHT, 0), (x1, -HEIGHT, 0), (x1, -HEIGHT, 4), (0, -HEIGHT, 4))),
           "window": coloured("window", *wall_z(WINDOW[4], WINDOW[0], WINDOW[1], -WINDOW[3], -WINDOW[2]))}
    for name, (lo, hi) in BOXES.items():
        box = trimesh.creation.box(bounds=np.array([lo, hi]))
        out[name] = coloured(name, np.asarray(box.vertices), np.asarray(box.faces))
    for _ in range(subdivide):
        out = {k: m.subdivide() for k, m in out.items()}
    return out


TO_Y_UP = np.diag([1.0, -1.0, -1.0, 1.0])  # world (y down) <-> glTF (y up): its own inverse


def write_glb(path: Path, subdivide: int = 0, named: bool = True) -> Path:
    """The whole scene as a GLB in glTF's y-up frame, its nodes named by category (or `part_K` when not named)."""
    scene = trimesh.Scene()
    for k, (name, mesh) in enumerate(parts(subdivide).items()):
        m = mesh.copy()
        m.apply_transform(TO_Y_UP)
        scene.add_geometry(m, geom_name=name if named else f"part_{k}", node_name=name if named else f"part_{k}")
    path.write_bytes(scene.export(file_type="glb"))
    return path


def write_semantic_sidecar(folder: Path, stem: str) -> tuple[Path, Path]:
    """HM3D-semantics style labels for the scene: STEM.semantic.glb (one flat vertex colour per object) and
    STEM.semantic.txt (id,HEX,"category",region)."""
    scene, lines = trimesh.Scene(), ["HM3D Semantic Annotations"]
    for k, (name, mesh) in enumerate(parts().items(), 1):
        colour = np.array([37 * k % 256, 91 * k % 256, 173 * k % 256, 255], np.uint8)
        m = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=np.tile(colour, (len(mesh.vertices), 1)),
                            process=False)
        m.apply_transform(TO_Y_UP)
        scene.add_geometry(m, geom_name=f"object_{k}", node_name=f"object_{k}")
        lines.append(f'{k},{colour[0]:02X}{colour[1]:02X}{colour[2]:02X},"{name}",0')
    glb, txt = folder / f"{stem}.semantic.glb", folder / f"{stem}.semantic.txt"
    glb.write_bytes(scene.export(file_type="glb"))
    txt.write_text("\n".join(lines) + "\n")
    return glb, txt


def write_obj(folder: Path) -> Path:
    """The textured floor as OBJ + MTL + PNG in the world frame (load with up='-y')."""
    from trimesh.exchange.obj import export_obj

    folder.mkdir(parents=True, exist_ok=True)
    text, files = export_obj(floor_mesh(), include_texture=True, return_texture=True, mtl_name="floor.mtl")
    (folder / "floor.obj").write_text(text)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder / "floor.obj"


def write_ply(path: Path) -> Path:
    """Everything but the textured floor, with vertex colours, in the world frame (load with up='-y')."""
    mesh = trimesh.util.concatenate([m for k, m in parts().items() if k != "floor"])
    path.write_bytes(mesh.export(file_type="ply"))
    return path


def write_replica(folder: Path) -> Path:
    """A Replica-style scene: FOLDER/mesh.ply (vertex colours, no labels) and FOLDER/habitat/mesh_semantic.ply
    (quads with an object_id each, as Replica's) + FOLDER/habitat/info_semantic.json; all in the world frame."""
    (folder / "habitat").mkdir(parents=True, exist_ok=True)
    mesh = write_ply(folder / "mesh.ply")
    verts, quads, objects = [], [], []
    for k, part in enumerate(parts().values()):
        base = sum(len(v) for v in verts)
        verts.append(np.asarray(part.vertices))
        quads += [[a + base, b + base, c + base, c + base] for a, b, c in np.asarray(part.faces)]  # degenerate quads
        objects += [10 + k] * len(part.faces)
    v = np.concatenate(verts)
    header = (f"ply\nformat ascii 1.0\nelement vertex {len(v)}\nproperty float x\nproperty float y\n"
              f"property float z\nelement face {len(quads)}\nproperty list uchar int vertex_indices\n"
              "property int object_id\nend_header\n")
    body = "\n".join(f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in v) + "\n"
    body += "\n".join(f"4 {a} {b} {c} {d} {o}" for (a, b, c, d), o in zip(quads, objects, strict=True)) + "\n"
    (folder / "habitat" / "mesh_semantic.ply").write_text(header + body)
    info = {"objects": [{"id": 10 + k, "class_name": name} for k, name in enumerate(parts())]}
    (folder / "habitat" / "info_semantic.json").write_text(json.dumps(info))
    return mesh
