"""Textured triangle meshes (glTF/GLB, OBJ+MTL, PLY with vertex colours) loaded into the project's world frame.

trimesh reads the files; this module flattens the scene graph into one triangle soup with, per triangle, its corner
UVs, its corner colours (vertex colours or the material's base colour), the texture it samples and its semantic
label (from node and geometry names). Source axes and units are mapped to docs/geometry.md's world: metres, gravity
along +y. `UP_AXES` holds the rotations; docs/datasets.md lists which dataset uses which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
# source frame -> project world (x right, y down, z forward; det +1)
UP_AXES = {
    "y": np.array([[1, 0, 0], [0, -1, 0], [0, 0, -1]], np.float64),  # glTF, HM3D, 3D-FRONT: y up (180° about x)
    "z": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float64),  # Matterport3D, ScanNet, Replica: z up
    "-y": np.eye(3),  # already the project's frame (y down)
}
MAX_EXTENT_M = 500.0  # a building larger than this is a unit mistake (centimetres read as metres)
MIN_EXTENT_M = 1.0  # smaller than this cannot hold a walk (millimetres read as metres, or an object)
# Semantic categories recognised in node / geometry names ("sofa_2", "Chair.001", "wall-north" ...).
STRUCTURE = ("wall", "floor", "ceiling", "window", "door")
CATEGORIES = STRUCTURE + (
    "bed", "sofa", "couch", "armchair", "chair", "table", "coffee table", "dining table", "desk", "nightstand",
    "wardrobe", "cabinet", "shelf", "bookshelf", "dresser", "lamp", "rug", "carpet", "tv", "television", "plant",
    "picture", "painting", "mirror", "curtain", "pillow", "cushion", "sink", "toilet", "bathtub", "shower", "oven",
    "stove", "fridge", "refrigerator", "microwave", "counter", "dishwasher", "washing machine", "piano", "stool",
    "bench", "fireplace", "radiator", "towel", "clock", "vase", "computer", "monitor", "stairs", "column", "beam",
)


@dataclass
class Mesh:
    """One scene as a triangle soup in the world frame; per-triangle appearance and labels."""

    vertices: np.ndarray  # (V, 3) float32, metres, world frame
    triangles: np.ndarray  # (T, 3) int32
    corner_uv: np.ndarray  # (T, 3, 2) float32, texture coordinates (origin bottom-left, as OBJ)
    corner_colour: np.ndarray  # (T, 3, 3) float32 in [0, 1]: multiplies the texture (1 where none)
    texture_index: np.ndarray  # (T,) int32 into textures; -1: untextured
    textures: list[np.ndarray]  # (h, w, 3) float32 in [0, 1]
    label_index: np.ndarray  # (T,) int32 into labels; -1: unlabelled
    labels: list[str]
    room_index: np.ndarray | None = None  # (T,) int32 room of each triangle, where the source knows rooms

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World-space axis-aligned bounds (min, max)."""
        return self.vertices.min(0), self.vertices.max(0)

    @property
    def has_labels(self) -> bool:
        """Whether any triangle carries a semantic label."""
        return bool((self.label_index >= 0).any())


def category(name: str) -> str | None:
    """The semantic category a node or geometry name stands for ('Sofa_2' -> 'sofa'), or None."""
    words = " ".join(re.sub(r"[^a-z]+", " ", re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()).split())
    for cat in sorted(CATEGORIES, key=len, reverse=True):  # 'coffee table' before 'table'
        if re.search(rf"\b{cat}s?\b", words):
            return {"couch": "sofa", "television": "tv", "refrigerator": "fridge"}.get(cat, cat)
    return None


def world_transform(up: str, unit_scale: float) -> np.ndarray:
    """4x4 matrix from the source frame (up axis, units) to the world frame; ValueError naming the option."""
    if up not in UP_AXES:
        raise ValueError(f"up: expected one of {', '.join(UP_AXES)}, got {up!r}")
    if not np.isfinite(unit_scale) or not 1e-4 <= unit_scale <= 1e4:
        raise ValueError(f"unit_scale: metres per mesh unit must be finite and in [1e-4, 1e4], got {unit_scale}")
    m = np.eye(4)
    m[:3, :3] = UP_AXES[up] * unit_scale
    return m


def _image(material) -> np.ndarray | None:
    """A material's base-colour texture as float RGB, or None."""
    img = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if img is None:
        return None
    return np.asarray(img.convert("RGB"), np.float32) / 255.0


def _base_colour(material) -> np.ndarray:
    """A material's base colour factor (RGB in [0, 1]); white when it has none."""
    factor = getattr(material, "baseColorFactor", None)
    if factor is None:
        factor = getattr(material, "diffuse", None)
    if factor is None:
        return np.ones(3, np.float32)
    f = np.asarray(factor, np.float32)[:3]
    return f / 255.0 if f.max() > 1.0 else f


def _appearance(geom, textures: list[np.ndarray], cache: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """(corner uv (T,3,2), corner colour (T,3,3), texture index) of one trimesh geometry."""
    faces = np.asarray(geom.faces)
    n = len(faces)
    uv = np.zeros((n, 3, 2), np.float32)
    colour = np.ones((n, 3, 3), np.float32)
    tex = -1
    visual = geom.visual
    if visual.kind == "texture":
        material = visual.material
        colour *= _base_colour(material)
        image = _image(material)
        if image is not None and visual.uv is not None and len(visual.uv) == len(geom.vertices):
            key = id(material)
            if key not in cache:
                cache[key] = len(textures)
                textures.append(image)
            tex, uv = cache[key], np.asarray(visual.uv, np.float32)[faces]
    elif visual.kind == "vertex":
        colour = np.asarray(visual.vertex_colors, np.float32)[faces][..., :3] / 255.0
    elif visual.kind == "face":
        colour = np.repeat(np.asarray(visual.face_colors, np.float32)[:, None, :3] / 255.0, 3, axis=1)
    return uv, colour, tex


def load_mesh(path: str | Path, up: str = "y", unit_scale: float = 1.0) -> Mesh:
    """Read a mesh file into the world frame; ValueError naming the problem for an empty or unreadable file."""
    import trimesh

    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise ValueError(f"mesh: {path.name}: unsupported format; expected one of {', '.join(MESH_SUFFIXES)}")
    transform = world_transform(up, unit_scale)
    check_references(path)
    try:
        scene = trimesh.load(str(path), force="scene", process=False)
    except Exception as err:  # trimesh raises many types for a corrupt file
        raise ValueError(f"mesh: {path.name}: unreadable ({type(err).__name__}: {err})") from None
    parts, offset, textures, cache, labels = [], 0, [], {}, []
    for node in scene.graph.nodes_geometry:
        matrix, geom_name = scene.graph[node]
        geom = scene.geometry[geom_name]
        if not hasattr(geom, "faces") or len(geom.faces) == 0:
            continue
        verts = np.asarray(geom.vertices, np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
        verts = verts @ transform[:3, :3].T
        uv, colour, tex = _appearance(geom, textures, cache)
        cat = category(str(node)) or category(str(geom_name))
        if cat is not None and cat not in labels:
            labels.append(cat)
        label = labels.index(cat) if cat is not None else -1
        parts.append((verts, np.asarray(geom.faces) + offset, uv, colour, tex, label))
        offset += len(verts)
    if not parts:
        raise ValueError(f"mesh: {path.name}: no triangles")
    counts = [len(p[1]) for p in parts]
    mesh = Mesh(
        vertices=np.concatenate([p[0] for p in parts]).astype(np.float32),
        triangles=np.concatenate([p[1] for p in parts]).astype(np.int32),
        corner_uv=np.concatenate([p[2] for p in parts]), corner_colour=np.concatenate([p[3] for p in parts]),
        texture_index=np.repeat(np.array([p[4] for p in parts], np.int32), counts),
        textures=textures, labels=labels,
        label_index=np.repeat(np.array([p[5] for p in parts], np.int32), counts),
    )
    check_extent(mesh, path.name)
    return mesh


UNDECODABLE = {"KHR_texture_basisu": "Basis Universal", "EXT_texture_webp": "WebP", "KHR_draco_mesh_compression":
               "Draco"}  # glTF extensions trimesh cannot decode: refused rather than rendered untextured or empty


def gltf_json(path: Path) -> dict:
    """The JSON document of a .gltf file or of a .glb's first chunk."""
    import json
    import struct

    data = path.read_bytes()
    if path.suffix.lower() == ".glb":
        if len(data) < 20 or data[:4] != b"glTF":
            raise ValueError(f"mesh: {path.name}: unreadable (not a GLB file)")
        (length,) = struct.unpack_from("<I", data, 12)
        data = data[20 : 20 + length]
    try:
        return json.loads(data)
    except ValueError as err:
        raise ValueError(f"mesh: {path.name}: unreadable glTF JSON ({err})") from None


def referenced_files(path: Path) -> list[tuple[str, str]]:
    """(file, what references it) of the material libraries and textures a .obj or .gltf names."""
    refs: list[tuple[str, str]] = []
    if path.suffix.lower() == ".obj":
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("mtllib "):
                mtl = line.split(None, 1)[1].strip()
                refs.append((mtl, path.name))
                if (path.parent / mtl).is_file():
                    for mline in (path.parent / mtl).read_text(errors="replace").splitlines():
                        if mline.strip().lower().startswith(("map_kd ", "map_ka ")):
                            refs.append((mline.split()[-1], mtl))
    elif path.suffix.lower() == ".gltf":
        doc = gltf_json(path)
        refs += [(b["uri"], path.name) for b in doc.get("buffers", []) + doc.get("images", [])
                 if "uri" in b and not b["uri"].startswith("data:")]
    return refs


def check_references(path: Path) -> None:
    """ValueError naming a material library or texture the file refers to that is missing (trimesh would skip it),
    or a glTF extension whose textures or geometry cannot be decoded."""
    if path.suffix.lower() in (".glb", ".gltf"):
        used = set(gltf_json(path).get("extensionsUsed", []))
        for ext in sorted(used & UNDECODABLE.keys()):
            raise ValueError(f"mesh: {path.name}: uses {ext} ({UNDECODABLE[ext]}), which cannot be decoded here; "
                             "convert it first (e.g. HM3D: the plain .glb release, not .basis.glb)")
    for name, by in referenced_files(path):
        if not (path.parent / name).is_file():
            raise ValueError(f"mesh: {path.name}: {name}, referenced by {by}, is missing")


def check_extent(mesh: Mesh, name: str) -> None:
    """ValueError when the mesh's size says its units are wrong (see MIN_EXTENT_M, MAX_EXTENT_M)."""
    if not np.isfinite(mesh.vertices).all():
        raise ValueError(f"mesh: {name}: vertices are not all finite")
    lo, hi = mesh.bounds
    extent = float((hi - lo)[[0, 2]].max())
    if not MIN_EXTENT_M <= extent <= MAX_EXTENT_M:
        raise ValueError(f"mesh: {name}: horizontal extent {extent:.3g} m is outside [{MIN_EXTENT_M}, "
                         f"{MAX_EXTENT_M}] m; set --unit-scale (metres per mesh unit) or --up")
