"""The dataset manifest (docs/datasets.md): one row per panoramic keyframe, committed a clip at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from diffpano.io.depth import depth_png_bytes
from diffpano.io.manifest import commit_part, png_bytes, read_parts

DATASET_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("clip_id", pa.string()),
        ("frame_index", pa.int32()),
        ("caption", pa.string()),
        ("pose_c2w", pa.list_(pa.float32(), 16)),
        ("rgb_uri", pa.string()),
        ("depth_uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source_uri", pa.string()),  # optional: where the keyframe came from (a capture's file, video#t=seconds)
    ]
)


@dataclass
class Clip:
    """One consecutive trajectory of keyframes: rgb (F, H, W, 3) uint8, depth (F, H, W) metres or None."""

    scene_id: str
    clip_id: str
    captions: list[str]
    poses: np.ndarray
    rgb: np.ndarray
    depth: np.ndarray | None = None
    sources: list[str] | None = None  # per keyframe: the source_uri column


def rgb_path(scene_id: str, clip_id: str, frame: int) -> str:
    """RGB location relative to the dataset root (deterministic: a retried write replaces, never duplicates)."""
    return f"rgb/{scene_id}/{clip_id}/{frame:04d}.png"


def depth_path(scene_id: str, clip_id: str, frame: int) -> str:
    """Depth location relative to the dataset root."""
    return f"depth/{scene_id}/{clip_id}/{frame:04d}.png"


def clip_table(clips: list[Clip]) -> pa.Table:
    """Manifest rows of clips, one per keyframe."""
    rows = [
        dict(
            scene_id=c.scene_id, clip_id=c.clip_id, frame_index=i, caption=c.captions[i],
            pose_c2w=np.asarray(c.poses[i], dtype=np.float32).reshape(16).tolist(),
            rgb_uri=rgb_path(c.scene_id, c.clip_id, i),
            depth_uri=None if c.depth is None else depth_path(c.scene_id, c.clip_id, i),
            height=c.rgb.shape[1], width=c.rgb.shape[2], source_uri=c.sources[i] if c.sources else None,
        )
        for c in clips
        for i in range(len(c.rgb))
    ]
    return pa.Table.from_pylist(rows, schema=DATASET_SCHEMA)


def commit_clips(root: str, clips: list[Clip]) -> str:
    """Write the clips' images, then one manifest part naming them; returns the part's URI."""
    files = {}
    for c in clips:
        for i in range(len(c.rgb)):
            files[rgb_path(c.scene_id, c.clip_id, i)] = png_bytes(c.rgb[i])
            if c.depth is not None:
                files[depth_path(c.scene_id, c.clip_id, i)] = depth_png_bytes(c.depth[i])
    return commit_part(root, files, clip_table(clips), [c.clip_id for c in clips])


def read_dataset(root: str, columns: list[str] | None = None) -> pa.Table:
    """All keyframe rows of the dataset at root (an empty table when there are none)."""
    return read_parts(root, DATASET_SCHEMA, columns)
