"""Semantic labels kept beside a mesh, HM3D-semantics style: `NAME.semantic.glb`, the same surfaces painted one flat
colour per object (vertex colours or texture), and `NAME.semantic.txt`, lines `id,HEX,"category",region` after a
header. Each triangle of the textured mesh takes the category of the colour at the closest point of the semantic
mesh to its centre (unlabelled when none is within SNAP_M, or the colour is not in the table).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from diffpano.data.mesh import Mesh, category, load_mesh
from diffpano.data.raycast import MeshRenderer

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
    corner = np.argmax(np.stack([1 - bary[:, 0] - bary[:, 1], bary[:, 0], bary[:, 1]], axis=1), axis=1)
    rgb = semantic.corner_colour[tri, corner]
    tex = semantic.texture_index[tri]
    for k in np.unique(tex[tex >= 0]):
        sel = tex == k
        w = np.stack([1 - bary[sel, 0] - bary[sel, 1], bary[sel, 0], bary[sel, 1]], axis=1)[..., None]
        uv = (semantic.corner_uv[tri[sel]] * w).sum(1)
        image = semantic.textures[int(k)]
        h, width = image.shape[:2]
        x = np.clip((np.mod(uv[:, 0], 1.0) * width).astype(np.int64), 0, width - 1)
        y = np.clip((np.mod(1.0 - uv[:, 1], 1.0) * h).astype(np.int64), 0, h - 1)
        rgb[sel] *= image[y, x]
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.int64)


def attach_labels(mesh: Mesh, path: str | Path, up: str, unit_scale: float) -> Mesh:
    """The mesh with its triangles labelled from the semantic sidecar beside `path` (unchanged when there is none)."""
    found = sidecar(path)
    if found is None:
        return mesh
    semantic = load_mesh(found[0], up, unit_scale)
    table = read_table(found[1])
    from scipy.spatial import cKDTree

    names = sorted(set(table.values()))
    index = np.array([names.index(name) for name in table.values()] + [-1], np.int32)  # [-1]: no colour matched
    centres = mesh.vertices[mesh.triangles].mean(1)
    closest = MeshRenderer(semantic).closest(centres)
    near = np.linalg.norm(closest["points"] - centres, axis=1) <= SNAP_M
    rgb = flat_colours(semantic, closest["primitive_ids"].astype(np.int64), closest["primitive_uvs"])
    _, best = cKDTree(np.array(list(table), np.float64)).query(rgb, p=np.inf,
                                                               distance_upper_bound=COLOUR_TOLERANCE + 0.5)
    mesh.labels = names
    mesh.label_index = np.where(near, index[best], -1).astype(np.int32)  # best == len(table) when none matched
    return mesh
