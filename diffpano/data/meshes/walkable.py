"""Walks a person could take through a mesh: the walkable floor, its clearance and connected regions, and
keyframe poses at eye height along shortest paths between random places (through doorways when rooms connect).

The floor level is the lowest large horizontal surface (one storey per mesh). A grid cell is walkable when a ray
dropped from eye height lands on that floor (not on furniture), there is headroom above the eye, and the cell keeps
`clearance` metres from everything: horizontally from blocked cells, and in 3D at eye height.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from diffpano.data.meshes.mesh import Mesh
from diffpano.data.meshes.raycast import MeshRenderer
from diffpano.data.procedural.walks import resample

FLOOR_BIN_M = 0.05  # heights of horizontal surfaces are binned this finely to find the floor
FLOOR_TOLERANCE_M = 0.1  # a dropped ray lands on the floor when within this of it
HEADROOM_M = 0.25  # free space above the eye
MIN_FLOOR_SHARE = 0.25  # a floor level holds at least this share of the largest level's area


@dataclass
class FloorMap:
    """The walkable grid of one storey: cell centres at origin + (i, j) * cell in (x, z)."""

    origin: np.ndarray  # (x, z) of cell (0, 0)
    cell: float
    floor_y: float  # the floor plane's world y (gravity +y: the floor is below the camera, y larger)
    eye_height: float
    clearance: np.ndarray  # (nx, nz) metres of horizontal clearance; 0 where blocked
    walkable: np.ndarray  # (nx, nz) bool: cells of the largest connected walkable region
    regions: int  # connected walkable regions found (the walks use the largest)

    def point(self, ij: np.ndarray) -> np.ndarray:
        """(x, z) of cell indices (..., 2)."""
        return self.origin + np.asarray(ij) * self.cell


def floor_level(mesh: Mesh) -> float:
    """World y of the mesh's floor; ValueError when the mesh has no large horizontal surface."""
    v = mesh.vertices[mesh.triangles].astype(np.float64)
    normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    area = np.linalg.norm(normal, axis=1) / 2
    flat = np.abs(normal[:, 1]) > 0.95 * np.maximum(2 * area, 1e-12)
    if area[flat].sum() < 1.0:
        raise ValueError("floor: the mesh has under 1 m² of horizontal surface; no floor to walk on")
    heights = v[flat, :, 1].mean(1)
    bins = np.round(heights / FLOOR_BIN_M).astype(np.int64)
    levels, where = np.unique(bins, return_inverse=True)
    level_area = np.bincount(where, weights=area[flat])
    large = levels[level_area >= MIN_FLOOR_SHARE * level_area.max()]
    return float(large.max() * FLOOR_BIN_M)  # the lowest large level (y grows downwards)


def floor_map(renderer: MeshRenderer, eye_height: float, clearance: float, cell: float = 0.1) -> FloorMap:
    """The walkable cells of the mesh's floor at eye height with the given clearance (metres)."""
    from scipy import ndimage

    mesh = renderer.mesh
    floor_y = floor_level(mesh)
    lo, hi = mesh.bounds
    xs = np.arange(lo[0] + cell / 2, hi[0], cell)
    zs = np.arange(lo[2] + cell / 2, hi[2], cell)
    gx, gz = np.meshgrid(xs, zs, indexing="ij")
    eye = np.stack([gx, np.full_like(gx, floor_y - eye_height), gz], -1).reshape(-1, 3).astype(np.float32)
    down = renderer.cast(eye, np.tile(np.float32([0, 1, 0]), (len(eye), 1)))["t_hit"]
    up = renderer.cast(eye, np.tile(np.float32([0, -1, 0]), (len(eye), 1)))["t_hit"]
    free = (np.abs(down - eye_height) < FLOOR_TOLERANCE_M) & (up > HEADROOM_M)
    free = free.reshape(gx.shape)
    # horizontal clearance from blocked cells, and 3D clearance at eye height; the margin keeps points between two
    # neighbouring walkable cells (what a resampled path passes through) at `clearance` too
    margin = clearance + 0.75 * cell
    horizontal = ndimage.distance_transform_edt(free) * cell - cell / 2
    at_eye = np.zeros(gx.shape, np.float32)
    at_eye[free] = renderer.distance(eye.reshape(*gx.shape, 3)[free])
    ok = free & (horizontal >= margin) & (at_eye >= margin)
    regions, count = ndimage.label(ok, structure=np.ones((3, 3)))
    if count == 0:
        raise ValueError(f"floor: no place on the floor keeps {clearance} m clearance at {eye_height} m eye height")
    largest = np.argmax(np.bincount(regions.ravel())[1:]) + 1
    return FloorMap(np.array([xs[0], zs[0]]), cell, floor_y, eye_height,
                    np.where(free, np.minimum(horizontal, at_eye), 0.0), regions == largest, count)


def _grid_graph(fm: FloorMap):
    """(sparse graph over walkable cells, cell index array (N, 2)): 8-neighbour edges, cheaper away from walls."""
    from scipy.sparse import coo_matrix

    cells = np.argwhere(fm.walkable)
    index = np.full(fm.walkable.shape, -1, np.int64)
    index[tuple(cells.T)] = np.arange(len(cells))
    rows, cols, weights = [], [], []
    for di, dj in ((1, 0), (0, 1), (1, 1), (1, -1)):
        nb = cells + (di, dj)
        inside = (nb[:, 0] < fm.walkable.shape[0]) & (nb[:, 1] >= 0) & (nb[:, 1] < fm.walkable.shape[1])
        a, b = np.flatnonzero(inside), index[nb[inside, 0], nb[inside, 1]]
        keep = b >= 0
        a, b = a[keep], b[keep]
        near_wall = 1.0 / np.maximum(fm.clearance[tuple(cells[a].T)], fm.cell)  # paths keep to the middle
        rows += [a]
        cols += [b]
        weights += [math.hypot(di, dj) * fm.cell * (1.0 + 0.3 * near_wall)]
    n = len(cells)
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return graph.tocsr(), cells


def route(fm: FloorMap, length: float, rng: np.random.Generator) -> np.ndarray:
    """Waypoints (M, 2) in (x, z) of a walk at least `length` metres long along shortest paths between random cells."""
    from scipy.sparse.csgraph import dijkstra

    graph, cells = _grid_graph(fm)
    current = int(rng.integers(len(cells)))
    path = [current]
    travelled = 0.0
    for _ in range(100):
        if travelled >= length:
            break
        dist, pred = dijkstra(graph, directed=False, indices=current, return_predecessors=True)
        reachable = np.flatnonzero(np.isfinite(dist) & (dist > 0))
        if len(reachable) == 0:
            break
        far = reachable[dist[reachable] >= 0.5 * dist[reachable].max()]  # go somewhere, not next door
        goal = int(rng.choice(far))
        leg = [goal]
        while leg[-1] != current:
            leg.append(int(pred[leg[-1]]))
        path += leg[::-1][1:]
        travelled += float(dist[goal])
        current = goal
    return fm.point(cells[path])


def walk_poses(fm: FloorMap, frames: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Camera-to-world poses (F, 4, 4) at eye height, `spacing` metres apart along a route over the floor."""
    points = route(fm, spacing * max(frames - 1, 1) + 1.0, rng)
    if len(points) < 2:  # a region of one cell: turn on the spot
        points = np.stack([points[0], points[0] + [1e-3, 0.0]])
    offset = float(rng.uniform(0, min(0.5, spacing)))
    xz, heading = resample(points, spacing, frames, offset)
    look = float(rng.normal(0, 0.3))
    yaws = np.arctan2(heading[:, 0], heading[:, 1]) + look + rng.normal(0, 0.05, frames)
    poses = np.tile(np.eye(4), (frames, 1, 1))
    c, s = np.cos(yaws), np.sin(yaws)
    poses[:, 0, 0], poses[:, 0, 2], poses[:, 2, 0], poses[:, 2, 2] = c, s, -s, c
    poses[:, 0, 3], poses[:, 1, 3], poses[:, 2, 3] = xz[:, 0], fm.floor_y - fm.eye_height, xz[:, 1]
    return poses
