"""Equirectangular and cube-face rendering of meshes by ray casting (Open3D's Embree RaycastingScene).

A shader turns each hit into a colour. `TextureShader` (the default) gives the surface's own colour: the texture at
the hit's UV, bilinear and repeating, times the corner colours. Scanned meshes carry their lighting in their
textures, so nothing is shaded. Procedural scenes bring their own shader (`diffpano.data.procedural.scene_mesh`).
Depth is the
range along the ray in metres (docs/geometry.md); a ray that leaves the mesh gets depth 0 (unknown) and black.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from diffpano.data.meshes.mesh import Mesh
from diffpano.data.procedural.render import DirectionRenderer, View
from diffpano.io.manifest import to_uint8


def corner_weights(bary: np.ndarray) -> np.ndarray:
    """Weights (N, 3) of a triangle's corners at barycentric (u, v): p = (1-u-v) p0 + u p1 + v p2."""
    return np.stack([1 - bary[:, 0] - bary[:, 1], bary[:, 0], bary[:, 1]], axis=1)


def texel_coordinates(image: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuous texel coordinates (x, y) in image (h, w, 3) of uv (N, 2): origin bottom-left, repeating (glTF's
    default); texel (i, j) covers [i, i + 1) x [j, j + 1)."""
    h, w = image.shape[:2]
    return np.mod(uv[:, 0], 1.0) * w, np.mod(1.0 - uv[:, 1], 1.0) * h


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear RGB (N, 3) of image (h, w, 3) at uv (N, 2) (texel_coordinates)."""
    h, w = image.shape[:2]
    x, y = texel_coordinates(image, uv)
    x, y = x - 0.5, y - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, x1, y0, y1 = x0 % w, (x0 + 1) % w, y0 % h, (y0 + 1) % h
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


# (triangles (N,), barycentric (N, 2), hit points (N, 3), ray directions (N, 3)) -> uint8 RGB (N, 3)
Shader = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class TextureShader:
    """A mesh's own colours: texture at the hit's UV times the interpolated corner colours."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def __call__(self, tri: np.ndarray, bary: np.ndarray, points: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """uint8 RGB at barycentric (u, v) of triangles tri: p = (1-u-v) p0 + u p1 + v p2."""
        m = self.mesh
        w = corner_weights(bary)[..., None]  # (N, 3, 1)
        rgb = (m.corner_colour[tri] * w).sum(1)
        tex = m.texture_index[tri]
        for k in np.unique(tex[tex >= 0]):
            sel = tex == k
            uv = (m.corner_uv[tri[sel]] * w[sel]).sum(1)
            rgb[sel] *= sample_texture(m.textures[int(k)], uv)
        return to_uint8(rgb)


class MeshRenderer(DirectionRenderer):
    """Casts rays against one mesh and colours the hits with a shader; `threads` bounds Embree's (0: all cores)."""

    def __init__(self, mesh: Mesh, threads: int = 0, shader: Shader | None = None) -> None:
        import open3d as o3d

        self.mesh, self.threads = mesh, threads
        self.shader = shader or TextureShader(mesh)
        tmesh = o3d.t.geometry.TriangleMesh()
        tmesh.vertex.positions = o3d.core.Tensor(mesh.vertices)
        tmesh.triangle.indices = o3d.core.Tensor(mesh.triangles.astype(np.uint32))
        self.raycaster = o3d.t.geometry.RaycastingScene()
        self.raycaster.add_triangles(tmesh)
        self._tensor = o3d.core.Tensor

    def cast(self, origins: np.ndarray, dirs: np.ndarray) -> dict[str, np.ndarray]:
        """First hits of rays (N, 3) + (N, 3): t_hit (inf: none), primitive_ids, primitive_uvs (barycentric)."""
        rays = np.concatenate([np.broadcast_to(origins, dirs.shape), dirs], axis=-1).astype(np.float32)
        hits = self.raycaster.cast_rays(self._tensor(rays), nthreads=self.threads)
        return {k: hits[k].numpy() for k in ("t_hit", "primitive_ids", "primitive_uvs")}

    def closest(self, points: np.ndarray) -> dict[str, np.ndarray]:
        """Closest surface points (N, 3) to points (N, 3), their primitive_ids and primitive_uvs (barycentric)."""
        found = self.raycaster.compute_closest_points(self._tensor(points.astype(np.float32)), nthreads=self.threads)
        return {k: found[k].numpy() for k in ("points", "primitive_ids", "primitive_uvs")}

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Unsigned distance (N,) from points (N, 3) to the nearest surface, metres."""
        return self.raycaster.compute_distance(self._tensor(points.astype(np.float32)), nthreads=self.threads).numpy()

    def render_directions(self, pose: np.ndarray, dirs: np.ndarray) -> View:
        """View along camera-frame unit directions (..., 3): labels are mesh label indices and rooms the mesh's
        room indices (0 when it has none); both are -1 where a ray leaves the mesh."""
        pose = np.asarray(pose, np.float64)
        origin = pose[:3, 3].astype(np.float32)
        world = (dirs.reshape(-1, 3) @ pose[:3, :3].T).astype(np.float32)
        hits = self.cast(origin[None], world)
        t, tri = hits["t_hit"], hits["primitive_ids"].astype(np.int64)
        hit = np.isfinite(t)
        rgb = np.zeros((len(t), 3), np.uint8)
        label = np.full(len(t), -1, np.int32)
        room = np.full(len(t), -1, np.int32)
        if hit.any():
            th, d = tri[hit], world[hit]
            rgb[hit] = self.shader(th, hits["primitive_uvs"][hit], origin + d * t[hit, None], d)
            label[hit] = self.mesh.label_index[th]
            room[hit] = self.mesh.room_index[th] if self.mesh.room_index is not None else 0
        shape = dirs.shape[:-1]
        depth = np.where(hit, t, 0.0).astype(np.float32)
        return View(rgb.reshape(*shape, 3), depth.reshape(shape), label.reshape(shape), room.reshape(shape))
