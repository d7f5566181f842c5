"""Evaluation reports: metrics.json, a Markdown report, a grid of sample tours and ablation plots (matplotlib)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffpano.io import storage  # noqa: E402


def _clean(value):
    """JSON-safe value: infinities and NaN become strings, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def save_figure(fig, uri: str) -> str:
    """Write a matplotlib figure as PNG to a local path or s3:// URI."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return uri


CELL_WIDTH = 3.2  # inches per panorama: 352 pixels at save_figure's 110 dpi
TITLE_HEIGHT = 0.32  # inches above each row for two lines of prompt
GAP = 0.08  # inches between cells and between rows


def tour_grid(tours: list[tuple[np.ndarray, list[str]]], uri: str, max_tours: int = 4, max_views: int = 4) -> str:
    """A grid of sample tours: one row per tour, one panorama per view, the first view's prompt above each row.

    Each cell keeps the panoramas' aspect (W = 2H): the figure's size is computed from the grid, and every image
    fills an axes of its own shape, placed in inches, so neither matplotlib's layout nor the figure squashes it.
    """
    tours = tours[:max_tours]
    cols = max(1, min(max_views, max(len(images) for images, _ in tours)))
    shapes = [np.shape(images[0])[:2] for images, _ in tours if len(images)]
    h, w = shapes[0] if shapes else (1, 2)
    cell_h = CELL_WIDTH * h / w
    row_h = TITLE_HEIGHT + cell_h
    fig_w, fig_h = cols * CELL_WIDTH + (cols - 1) * GAP, len(tours) * row_h + (len(tours) - 1) * GAP
    fig = plt.figure(figsize=(fig_w, fig_h))
    for r, (images, prompts) in enumerate(tours):
        bottom = fig_h - r * (row_h + GAP) - row_h  # inches from the figure's bottom edge
        for c in range(min(cols, len(images))):
            ax = fig.add_axes((c * (CELL_WIDTH + GAP) / fig_w, bottom / fig_h, CELL_WIDTH / fig_w, cell_h / fig_h))
            ax.imshow(images[c], aspect="equal", interpolation="nearest")
            ax.axis("off")
        text = "\n".join(textwrap.wrap(prompts[0], 40 * cols)[:2])
        fig.text(0, (bottom + cell_h + GAP / 2) / fig_h, text, fontsize=7, ha="left", va="bottom")
    return save_figure(fig, uri)


def ablation_plot(rows: list[dict], x: str, series: str | None, metrics: list[str], uri: str, title: str) -> str:
    """Line (numeric x) or bar plots of metrics across ablation variants, one panel per metric."""
    metrics = [m for m in metrics if any(isinstance(r.get(m), int | float) for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 * max(1, len(metrics)), 3), squeeze=False)
    groups = sorted({r.get(series) for r in rows}, key=str) if series else [None]
    for ax, metric in zip(axes[0], metrics, strict=False):
        for g in groups:
            sub = [r for r in rows if series is None or r.get(series) == g]
            xs, ys = [r[x] for r in sub], [r.get(metric) for r in sub]
            if all(isinstance(v, int | float) for v in xs):
                ax.plot(xs, ys, marker="o", label=f"{series}={g}" if series else None)
            else:
                ax.bar([str(v) for v in xs], ys)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(x)
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, uri)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of rows (dicts) with the given columns; numbers to 4 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: str, metrics: dict, sections: list[tuple[str, str]]) -> dict[str, str]:
    """Write metrics.json and report.md (title, then sections of Markdown) under out; returns their URIs."""
    files = {"metrics": storage.join(out, "metrics.json"), "report": storage.join(out, "report.md")}
    storage.write_bytes(files["metrics"], json.dumps(_clean(metrics), indent=2, sort_keys=True).encode())
    body = ["# DiffPano evaluation", ""]
    for title, text in sections:
        body += [f"## {title}", "", text, ""]
    storage.write_bytes(files["report"], "\n".join(body).encode())
    return files


def figure_link(uri: str, out: str) -> str:
    """Markdown image link relative to the report folder."""
    return f"![{Path(uri).stem}]({uri[len(out.rstrip('/')) + 1:] if uri.startswith(out.rstrip('/')) else uri})"
