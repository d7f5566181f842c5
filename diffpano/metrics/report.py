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

from diffpano import storage  # noqa: E402


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


def tour_grid(tours: list[tuple[np.ndarray, list[str]]], uri: str, max_tours: int = 4, max_views: int = 4) -> str:
    """A grid of sample tours: one row per tour, one panorama per view, the first view's prompt above each row."""
    tours = tours[:max_tours]
    cols = max(1, min(max_views, max(len(images) for images, _ in tours)))
    fig, axes = plt.subplots(len(tours), cols, figsize=(3.2 * cols, 2.0 * len(tours)), squeeze=False)
    for r, (images, prompts) in enumerate(tours):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c], aspect="auto", interpolation="nearest")
        text = "\n".join(textwrap.wrap(prompts[0], 40 * cols)[:2])
        axes[r][0].set_title(text, loc="left", fontsize=7)
    fig.tight_layout()
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
