"""Where each epipolar sample reads its reference view: the sample table shared by every EA operator backend.

Operator tensors (all contiguous; `rows` = target pixels of all views, row = view * h * w + y * w + x; `J` = K * S
samples per row, sample j = k * S + s; `copies` = stacked copies of the views, 2 under classifier-free guidance):
- q (copies, rows, heads, dim): scaled queries; kv (copies, rows, 2, heads, dim): keys then values of every pixel;
- code (rows, J, rank): each sample's geometry code (last channel 1, carrying the key and value biases);
- geo_k, geo_v (heads, dim, rank): how the code enters a sample's key and value (key += geo_k @ code);
- null_key (heads, dim): the null token's key (its value is 0);
- base (rows, J) int32: the source row of the sample's top-left bilinear corner (bits 0-28), with bit 29 set when
  that corner is in the last column (its right neighbour wraps to column 0) and bit 30 when it is in the bottom row
  (no row below: latitude clamps); -1 where the sample is unusable;
- frac (rows, J, 2): its bilinear fractions (fx, fy);
- out (copies, rows, heads, dim): the softmax-weighted values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROW_BITS = (1 << 29) - 1
WRAPS, BOTTOM = 1 << 29, 1 << 30


@dataclass
class SampleTable:
    """Bilinear read positions of every (row, sample) in a (views, height, width) stack of feature maps."""

    base: torch.Tensor  # (rows, J) int32, -1 = unusable
    frac: torch.Tensor  # (rows, J, 2)
    width: int  # of the feature maps (the flags in base stand for their height)

    def nbytes(self) -> int:
        """Bytes held by the table."""
        return sum(t.numel() * t.element_size() for t in (self.base, self.frac))


def sample_table(
    grid: torch.Tensor, mask: torch.Tensor, source_view: torch.Tensor, height: int, width: int,
    views: int | None = None,
) -> SampleTable:
    """The table of grid_sample coordinates grid (rows, J, 2) read from `views` views, source_view (rows, J).

    It reproduces `circular_grid_sample` (align_corners=False, longitude wrapping, latitude clamped at the border).
    """
    gx, gy = grid.double().unbind(-1)
    u = torch.remainder(gx + 1, 2.0) * (width / 2) - 0.5  # column in [-0.5, w - 0.5); -0.5 lies between w-1 and 0
    v = (((gy + 1) * height - 1) / 2).clamp(0, height - 1)
    x0, y0 = u.floor(), v.floor().clamp(max=height - 1)
    frac = torch.stack((u - x0, v - y0), dim=-1).to(torch.float32)
    col, row = torch.remainder(x0.long(), width), y0.long()
    if views is None:  # reading the count back waits for the device; callers that know it pass it
        views = int(source_view.max()) + 1 if source_view.numel() else 1
    if views * height * width > ROW_BITS:
        raise ValueError(f"feature maps: {views} views of {height}x{width} exceed the sample table's 2^29 pixels")
    base = (source_view.long() * height + row) * width + col
    base = base | torch.where(col == width - 1, WRAPS, 0) | torch.where(row == height - 1, BOTTOM, 0)
    base = torch.where(mask, base, torch.full_like(base, -1))
    return SampleTable(base.to(torch.int32).contiguous(), frac.contiguous(), width)


def corner_rows(table: SampleTable, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows (n, J, 4) and bilinear weights (n, J, 4) of the four corners, and the usable mask (n, J)."""
    code = table.base[rows].long()
    valid = code >= 0
    code = code.clamp_min(0)
    base = code & ROW_BITS
    x1 = torch.where(code & WRAPS != 0, base - (table.width - 1), base + 1)
    dy = torch.where(code & BOTTOM != 0, 0, table.width)
    index = torch.stack((base, x1, base + dy, x1 + dy), dim=-1)
    fx, fy = table.frac[rows].unbind(-1)
    weights = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), dim=-1)
    return index, weights, valid


def fourier_features(x: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[x, sin(2^f pi x), cos(2^f pi x)] for f < num_freqs, concatenated over the last axis."""
    scaled = x.unsqueeze(-1) * (math.pi * 2.0 ** torch.arange(num_freqs, device=x.device, dtype=x.dtype))
    return torch.cat((x, scaled.sin().flatten(-2), scaled.cos().flatten(-2)), dim=-1)
