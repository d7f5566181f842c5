"""Where each epipolar sample reads its reference view: the sample table shared by every EA operator backend.

Operator tensors (all contiguous; `rows` = target pixels of all views, row = view * h * w + y * w + x; `J` = K * S
samples per row, sample j = k * S + s; `copies` = stacked copies of the views, 2 under classifier-free guidance):
- q (copies, rows, heads, dim): scaled queries; kv (copies, rows, 2, heads, dim): keys then values of every pixel;
- qg (copies, rows, heads, rank): the query's weights on the geometry code; nl (copies, rows, heads): null logits;
- code (rows, J, rank): each sample's geometry code (last channel 1, carrying the key and value biases);
- base (rows, J) int32: the source row of the sample's top-left bilinear corner, -1 where the sample is unusable;
- frac (rows, J, 2): its bilinear fractions (fx, fy);
- out (copies, rows, heads, dim + rank): softmax-weighted values, then the softmax-weighted geometry code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleTable:
    """Bilinear read positions of every (row, sample) in a (views, height, width) stack of feature maps."""

    base: torch.Tensor  # (rows, J) int32, -1 = unusable
    frac: torch.Tensor  # (rows, J, 2)
    height: int
    width: int

    def nbytes(self) -> int:
        """Bytes held by the table."""
        return sum(t.numel() * t.element_size() for t in (self.base, self.frac))


def sample_table(
    grid: torch.Tensor, mask: torch.Tensor, source_view: torch.Tensor, height: int, width: int
) -> SampleTable:
    """The table of grid_sample coordinates grid (rows, J, 2) read from views source_view (rows, J).

    It reproduces `circular_grid_sample` (align_corners=False, longitude wrapping, latitude clamped at the border).
    """
    gx, gy = grid.double().unbind(-1)
    u = torch.remainder(gx + 1, 2.0) * (width / 2) - 0.5  # column in [-0.5, w - 0.5); -0.5 lies between w-1 and 0
    v = (((gy + 1) * height - 1) / 2).clamp(0, height - 1)
    x0, y0 = u.floor(), v.floor().clamp(max=height - 1)
    frac = torch.stack((u - x0, v - y0), dim=-1).to(torch.float32)
    col = torch.remainder(x0.long(), width)
    base = (source_view.long() * height + y0.long()) * width + col
    base = torch.where(mask, base, torch.full_like(base, -1))
    return SampleTable(base.to(torch.int32).contiguous(), frac.contiguous(), height, width)


def corner_rows(table: SampleTable, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows (n, J, 4) and bilinear weights (n, J, 4) of the four corners, and the usable mask (n, J)."""
    base = table.base[rows].long()
    valid = base >= 0
    base = base.clamp_min(0)
    x0 = base % table.width
    y0 = (base // table.width) % table.height
    x1 = torch.where(x0 + 1 == table.width, base - x0, base + 1)
    dy = torch.where(y0 + 1 < table.height, table.width, 0)
    index = torch.stack((base, x1, base + dy, x1 + dy), dim=-1)
    fx, fy = table.frac[rows].unbind(-1)
    weights = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), dim=-1)
    return index, weights, valid
