"""The tour manifest (SPEC §5): schema, rows, and committing tours so that readers never see a partial one."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from diffpano import storage

TOUR_SCHEMA = pa.schema(
    [
        ("tour_id", pa.string()),
        ("view_index", pa.int32()),
        ("prompt", pa.string()),
        ("pose_c2w", pa.list_(pa.float32(), 16)),
        ("image_uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("num_inference_steps", pa.int32()),
        ("guidance_scale", pa.float32()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass
class Tour:
    """One generated tour: images (N, H, W, 3) uint8 with prompts and poses, and how it was made."""

    tour_id: str
    images: np.ndarray
    prompts: list[str]
    poses: np.ndarray
    seed: int
    model: str
    num_inference_steps: int
    guidance_scale: float


def image_path(tour_id: str, view_index: int) -> str:
    """Image location relative to the output root: deterministic, so a retried write replaces, never duplicates."""
    return f"images/{tour_id}/{view_index:03d}.png"


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an (H, W, 3) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tour_table(tours: list[Tour], created_at: datetime | None = None) -> pa.Table:
    """Manifest rows of tours, one per view."""
    now = created_at or datetime.now(timezone.utc)
    rows = [
        dict(
            tour_id=t.tour_id, view_index=i, prompt=t.prompts[i],
            pose_c2w=np.asarray(t.poses[i], dtype=np.float32).reshape(16).tolist(),
            image_uri=image_path(t.tour_id, i), height=t.images.shape[1], width=t.images.shape[2], seed=t.seed,
            model=t.model, num_inference_steps=t.num_inference_steps, guidance_scale=t.guidance_scale, created_at=now,
        )
        for t in tours
        for i in range(len(t.images))
    ]
    return pa.Table.from_pylist(rows, schema=TOUR_SCHEMA)


def manifest_part_name(tour_ids: list[str]) -> str:
    """Deterministic file name of the manifest part that commits these tours."""
    return f"part-{hashlib.sha256(chr(0).join(sorted(tour_ids)).encode()).hexdigest()[:20]}.parquet"


def commit_tours(root: str, tours: list[Tour]) -> str:
    """Write the tours' images, then one manifest part naming them, in one atomic put; returns the part's URI."""
    for t in tours:
        for i, image in enumerate(t.images):
            storage.write_bytes(storage.join(root, image_path(t.tour_id, i)), png_bytes(image))
    buf = pa.BufferOutputStream()
    pq.write_table(tour_table(tours), buf)
    uri = storage.join(root, "manifest", manifest_part_name([t.tour_id for t in tours]))
    storage.write_bytes(uri, buf.getvalue().to_pybytes())
    return uri


def read_manifest(root: str) -> pa.Table:
    """All manifest rows under root (an empty table when there are none)."""
    fs, path = storage.resolve(storage.join(root, "manifest"))
    if not storage.list_files(storage.join(root, "manifest"), ".parquet"):
        return TOUR_SCHEMA.empty_table()
    return pads.dataset(path, filesystem=fs, format="parquet", schema=TOUR_SCHEMA).to_table()
