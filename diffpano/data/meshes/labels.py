"""Semantic labels kept beside a mesh, transferred to its triangles: each takes the category at the closest point of
the semantic mesh to its centre (unlabelled when none is within SNAP_M). Two layouts are read:
- HM3D-semantics: `NAME.semantic.glb`, the same surfaces painted one flat colour per object (vertex colours or
  texture), and `NAME.semantic.txt`, lines `id,HEX,"category",region` after a header;
- Replica: `habitat/mesh_semantic.ply` beside `mesh.ply`, its polygons carrying an `object_id`, and
  `habitat/info_semantic.json`, whose `objects` give each id a `class_name`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from diffpano.data.meshes.mesh import Mesh, category, load_mesh, world_transform
from diffpano.data.meshes.raycast import MeshRenderer, corner_weights, texel_coordinates

SNAP_M = 0.05  # a semantic surface farther than this from a triangle's centre does not label it
COLOUR_TOLERANCE = 8  # 0-255 per channel: texture compression moves flat colours a little


def sidecar(path: str | Path) -> tuple[Path, Path] | None:
    """(semantic mesh, table) beside a mesh file (`X.glb` or `X.basis.glb` -> `X.semantic.glb`, `X.semantic.txt`)."""
    path = Path(path)
    stem = path.name.split(".")[0]
    glb, txt = path.parent / f"{stem}.semantic.glb", path.parent / f"{stem}.semantic.txt"
    return (glb, txt) if glb.is_file() and txt.is_file() and glb != path else None


def read_table(path: Path) -> dict[tuple[int, int, int], str]:
    """Colour (r, g, b) -> category of a semantic table; ValueError naming the line that does not parse."""
    table = {}
    for number, row in enumerate(csv.reader(path.read_text().splitlines()), 1):
        if number == 1 and len(row) < 3:  # the header line ("HM3D Semantic Annotations")
            continue
        try:
            hex_colour, name = row[1].strip().lstrip("#"), row[2].strip().lower()
            table[tuple(int(hex_colour[i : i + 2], 16) for i in (0, 2, 4))] = category(name) or name
        except (IndexError, ValueError):
            raise ValueError(f"labels: {path.name} line {number}: expected id,HEX,\"category\",region, "
                             f"got {','.join(row)!r}") from None
    return table


def flat_colours(semantic: Mesh, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """uint8 colours (N, 3) of the semantic mesh at its nearest corner or texel (no blending across objects)."""
    w = corner_weights(bary)
    corner = np.argmax(w, axis=1)
    rgb = semantic.corner_colour[tri, corner]
    tex = semantic.texture_index[tri]
    for k in np.unique(tex[tex >= 0]):
        sel = tex == k
        uv = (semantic.corner_uv[tri[sel]] * w[sel, :, None]).sum(1)
        image = semantic.textures[int(k)]
        x, y = texel_coordinates(image, uv)
        rgb[sel] *= image[np.minimum(y.astype(np.int64), image.shape[0] - 1),
                          np.minimum(x.astype(np.int64), image.shape[1] - 1)]
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.int64)


def replica_sidecar(path: str | Path) -> tuple[Path, Path] | None:
    """(semantic PLY, info JSON) of a Replica scene (`habitat/` beside its mesh), or None."""
    folder = Path(path).parent / "habitat"
    ply, info = folder / "mesh_semantic.ply", folder / "info_semantic.json"
    return (ply, info) if ply.is_file() and info.is_file() and ply != Path(path) else None


def replica_labels(ply: Path, info: Path, up: str, unit_scale: float) -> tuple[Mesh, np.ndarray, list[str]]:
    """(semantic triangles in the world frame, their label index into names, names) of a Replica sidecar."""
    import trimesh

    try:
        objects = {int(o["id"]): str(o["class_name"]).lower() for o in json.loads(info.read_text())["objects"]}
        raw = trimesh.load(str(ply), process=False)
        face = raw.metadata["_ply_raw"]["face"]["data"]
        polygons, object_ids = face["vertex_indices"], np.asarray(face["object_id"]).reshape(-1)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"labels: {ply.parent.name}/{ply.name} or {info.name}: not Replica's semantic layout "
                         f"({type(err).__name__}: {err})") from None
    polygons = np.asarray(polygons).reshape(len(object_ids), -1)
    fan = [polygons[:, [0, k, k + 1]] for k in range(1, polygons.shape[1] - 1)]  # triangles of each polygon
    triangles = np.concatenate(fan).astype(np.int32)
    categories = [category(objects.get(int(i), "")) or objects.get(int(i), "") for i in object_ids]
    names = sorted({c for c in categories if c})
    per_polygon = np.array([names.index(c) if c else -1 for c in categories], np.int32)
    transform = world_transform(up, unit_scale)
    verts = (np.asarray(raw.vertices, np.float64) @ transform[:3, :3].T).astype(np.float32)
    n = len(triangles)
    semantic = Mesh(verts, triangles, np.zeros((n, 3, 2), np.float32), np.ones((n, 3, 3), np.float32),
                    np.full(n, -1, np.int32), [], np.tile(per_polygon, len(fan)), names)
    return semantic, semantic.label_index, names


def hm3d_labels(glb: Path, txt: Path, up: str, unit_scale: float) -> tuple[Mesh, np.ndarray, list[str]]:
    """(semantic mesh, label index per semantic triangle into names, names) of an HM3D-style sidecar."""
    from scipy.spatial import cKDTree

    semantic = load_mesh(glb, up, unit_scale)
    table = read_table(txt)
    names = sorted(set(table.values()))
    index = np.array([names.index(name) for name in table.values()] + [-1], np.int32)  # [-1]: no colour matched
    centre = np.full((len(semantic.triangles), 2), 1 / 3, np.float32)
    rgb = flat_colours(semantic, np.arange(len(semantic.triangles)), centre)
    _, best = cKDTree(np.array(list(table), np.float64)).query(rgb, p=np.inf,
                                                               distance_upper_bound=COLOUR_TOLERANCE + 0.5)
    return semantic, index[best], names  # best == len(table) when no colour matched


def attach_labels(mesh: Mesh, path: str | Path, up: str, unit_scale: float) -> Mesh:
    """The mesh with its triangles labelled from a semantic sidecar beside `path` (unchanged when there is none)."""
    if (found := sidecar(path)) is not None:
        semantic, labels, names = hm3d_labels(*found, up, unit_scale)
    elif (found := replica_sidecar(path)) is not None:
        semantic, labels, names = replica_labels(*found, up, unit_scale)
    else:
        return mesh
    centres = mesh.vertices[mesh.triangles].mean(1)
    closest = MeshRenderer(semantic).closest(centres)
    near = np.linalg.norm(closest["points"] - centres, axis=1) <= SNAP_M
    mesh.labels = names
    mesh.label_index = np.where(near, labels[closest["primitive_ids"].astype(np.int64)], -1).astype(np.int32)
    return mesh
