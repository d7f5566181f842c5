"""The report's pictures: panoramas keep their 2:1 aspect in the tour grid (the model card's grids come from it)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffpano.metrics.report import tour_grid

# Saturated colours the figure's white background and black prompt text never take.
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


def panels(png: np.ndarray, colours: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the region of each colour in an RGB picture; raises if it is not a filled box."""
    boxes = []
    for colour in colours:
        mask = (np.abs(png[..., :3].astype(int) - colour) <= 6).all(-1)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert len(rows), f"colour {colour} is not in the picture"
        top, left, height, width = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert mask[top : top + height, left : left + width].mean() > 0.98, f"colour {colour} is not one box"
        boxes.append((int(top), int(left), int(height), int(width)))
    return boxes


@pytest.mark.parametrize("size", [(32, 64), (128, 256)])
def test_tour_grid_keeps_each_panorama_two_to_one(tmp_path, size):
    h, w = size
    counts = [4, 4, 2]  # the last row is short: its empty cells stay blank
    tours, k = [], 0
    for n in counts:
        images = np.stack([np.broadcast_to(np.array(COLOURS[k + i], np.uint8), (h, w, 3)) for i in range(n)])
        tours.append((images, [f"A room {k} with a long prompt about its walls and floors " * 3] * n))
        k += n
    path = tour_grid(tours, str(tmp_path / "grid.png"))
    png = np.asarray(Image.open(path).convert("RGB"))
    boxes = panels(png, COLOURS[:k])
    for _, _, height, width in boxes:
        assert abs(width - 2 * height) <= 2, (height, width)  # W = 2H to a pixel of rounding
    heights = {b[2] for b in boxes}
    assert max(heights) - min(heights) <= 1  # one cell size in the whole grid
    # Rows and columns: cells of a row share a top edge, cells of a column a left edge, nothing overlaps.
    tops = [b[0] for b in boxes]
    assert len({tops[0], *tops[:4]}) == 1 and tops[4] > tops[0] + boxes[0][2] and tops[8] > tops[4] + boxes[4][2]
    assert [b[1] for b in boxes[:4]] == [b[1] for b in boxes[4:8]]
    assert all(boxes[i + 1][1] > boxes[i][1] + boxes[i][3] for i in range(3))
    # The picture is as wide as 4 cells (plus gaps) and has room for three rows of cells and prompts.
    assert png.shape[1] < 4 * boxes[0][3] * 1.1 and png.shape[0] > 3 * boxes[0][2]


def test_tour_grid_caps_tours_and_views(tmp_path):
    tours = [(np.stack([np.broadcast_to(np.array(c, np.uint8), (16, 32, 3)) for c in COLOURS[i : i + 4]]), ["p"] * 4)
             for i in (0, 4, 8)]
    path = tour_grid(tours, str(tmp_path / "grid.png"), max_tours=2, max_views=3)
    png = np.asarray(Image.open(path).convert("RGB"))
    shown = [COLOURS[i] for i in (0, 1, 2, 4, 5, 6)]
    for _, _, height, width in panels(png, shown):
        assert abs(width - 2 * height) <= 2
    for left_out in (c for c in COLOURS if c not in shown):  # the fourth view and the third tour
        assert not (np.abs(png.astype(int) - left_out) <= 6).all(-1).any()
