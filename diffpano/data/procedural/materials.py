"""Materials named in words: wall palette, floors, furniture finishes, and their procedural textures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WALL_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.70, 0.22, 0.20),
    "orange": (0.88, 0.52, 0.22),
    "yellow": (0.90, 0.80, 0.35),
    "green": (0.38, 0.62, 0.36),
    "blue": (0.30, 0.45, 0.75),
    "purple": (0.50, 0.33, 0.65),
    "pink": (0.92, 0.62, 0.70),
    "white": (0.90, 0.90, 0.88),
    "gray": (0.55, 0.56, 0.58),
    "black": (0.16, 0.16, 0.17),
    "beige": (0.86, 0.78, 0.62),
    "brown": (0.50, 0.34, 0.22),
}

FURNITURE_COLOURS: dict[str, tuple[float, float, float]] = {
    name: WALL_COLOURS[name] for name in ("white", "black", "gray", "brown", "beige", "blue", "green", "red")
} | {"wooden": (0.62, 0.44, 0.27)}

# kind -> (caption phrase, base colour); floors carry procedural patterns.
FLOORS: dict[str, tuple[str, tuple[float, float, float]]] = {
    "wood": ("a wooden floor", (0.60, 0.42, 0.26)),
    "dark wood": ("a dark wooden floor", (0.36, 0.24, 0.15)),
    "carpet": ("a gray carpet", (0.52, 0.52, 0.54)),
    "beige carpet": ("a beige carpet", (0.78, 0.70, 0.56)),
    "tile": ("a white tiled floor", (0.86, 0.86, 0.84)),
    "gray tile": ("a gray tiled floor", (0.58, 0.59, 0.60)),
    "stone": ("a stone floor", (0.62, 0.60, 0.56)),
}
FLOOR_PATTERN = {
    "wood": "planks", "dark wood": "planks", "carpet": "carpet", "beige carpet": "carpet",
    "tile": "tiles", "gray tile": "tiles", "stone": "stone",
}

# Fixed surfaces: ceiling, window pane, door leaf, ceiling light (emissive), metal, ceramic.
FIXED = {
    "ceiling": (0.93, 0.93, 0.91),
    "window": (0.72, 0.84, 0.96),
    "door": (0.45, 0.30, 0.18),
    "light": (1.0, 0.97, 0.88),
    "ceramic": (0.95, 0.95, 0.95),
    "screen": (0.06, 0.06, 0.07),
    "plant": (0.22, 0.50, 0.22),
}


@dataclass(frozen=True)
class Material:
    """A surface: the word users read, its colour, and its pattern."""

    name: str
    rgb: tuple[float, float, float]
    pattern: str = "plain"  # one of PATTERNS


class MaterialTable:
    """Materials of one scene indexed by integer id, as arrays the renderer can gather from."""

    def __init__(self) -> None:
        self.materials: list[Material] = []
        self._ids: dict[Material, int] = {}

    def add(self, material: Material) -> int:
        """Id of a material, adding it once."""
        if material not in self._ids:
            self._ids[material] = len(self.materials)
            self.materials.append(material)
        return self._ids[material]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(colours (M, 3) float32, pattern codes (M,) int8)."""
        rgb = np.array([m.rgb for m in self.materials], dtype=np.float32).reshape(-1, 3)
        codes = np.array([PATTERNS.index(m.pattern) for m in self.materials], dtype=np.int8)
        return rgb, codes


PATTERNS = ("plain", "planks", "carpet", "tiles", "stone", "grain", "window", "emissive", "plaster")


def hash2(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Pseudo-random value in [0, 1) per integer cell (i, j): a cheap, vectorised, deterministic hash."""
    return np.modf(np.abs(np.sin(i * 12.9898 + j * 78.233) * 43758.5453))[0].astype(np.float32)


NOISE_LATTICE = np.random.default_rng(20).random((256, 256), dtype=np.float32)  # value noise, tiled every 256 cells


def value_noise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth noise in [0, 1) at real points: a fixed random lattice, smoothstep-interpolated (cheap gathers)."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    i, j = np.floor(x), np.floor(y)
    fx, fy = x - i, y - j
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    i0, j0 = i.astype(np.int64) & 255, j.astype(np.int64) & 255
    i1, j1 = (i0 + 1) & 255, (j0 + 1) & 255
    lattice = NOISE_LATTICE
    top = lattice[i0, j0] + (lattice[i1, j0] - lattice[i0, j0]) * fx
    bottom = lattice[i0, j1] + (lattice[i1, j1] - lattice[i0, j1]) * fx
    return top + (bottom - top) * fy


def pattern_factor(code: int, p: np.ndarray, normal_axis: np.ndarray) -> np.ndarray:
    """Brightness factor (R,) of a procedural pattern at world points p (R, 3); depends on position only."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    # Coordinates in the surface's plane: floors use (x, z); vertical faces use the horizontal axis and height.
    a = np.where(normal_axis == 0, z, x)
    b = np.where(normal_axis == 1, z, y)
    name = PATTERNS[code]
    if name == "planks":
        row = np.floor(b / 0.18)
        joint = np.floor((a + hash2(row, row + 7.0) * 2.0) / 1.4)
        tone = 0.82 + 0.3 * hash2(row, joint)
        grain = 1.0 + 0.05 * np.sin(a * 23.0 + 5.0 * hash2(joint, row))
        seam = (np.abs(b / 0.18 - np.round(b / 0.18)) < 0.04) * 0.35
        return tone * grain * (1.0 - seam)
    if name == "carpet":
        return 0.92 + 0.12 * hash2(np.floor(a / 0.06), np.floor(b / 0.06))
    if name == "tiles":
        fa, fb = a / 0.45 - np.floor(a / 0.45), b / 0.45 - np.floor(b / 0.45)
        grout = (np.minimum(np.minimum(fa, 1 - fa), np.minimum(fb, 1 - fb)) < 0.035) * 0.3
        return (0.94 + 0.08 * hash2(np.floor(a / 0.45), np.floor(b / 0.45))) * (1.0 - grout)
    if name == "stone":
        row = np.floor(b / 0.32)
        col = np.floor((a + 0.27 * (row % 2)) / 0.55)
        fa = (a + 0.27 * (row % 2)) / 0.55 - col
        fb = b / 0.32 - row
        mortar = (np.minimum(np.minimum(fa, 1 - fa), np.minimum(fb, 1 - fb)) < 0.04) * 0.35
        return (0.78 + 0.4 * hash2(row, col)) * (1.0 - mortar)
    if name == "plaster":
        # Painted plaster: two octaves of smooth noise, a few percent, the texture feature detectors find on real
        # walls (docs/captures.md: structure from motion of rendered walks)
        return 0.94 + 0.07 * value_noise(a / 0.06, b / 0.06) + 0.05 * value_noise(a / 0.21 + 31.0, b / 0.21)
    if name == "grain":
        return 0.9 + 0.12 * np.sin(a * 31.0 + 3.0 * np.sin(b * 7.0))
    if name == "window":
        # Mullions every 0.6 m and a sky gradient with height: a function of the pane point, not the view.
        bar = (np.abs(a / 0.6 - np.round(a / 0.6)) < 0.04) | (np.abs(b / 0.6 - np.round(b / 0.6)) < 0.04)
        return np.where(bar, 0.35, 1.0 - 0.15 * (b + 2.1))
    return np.ones(len(p), dtype=np.float32)

