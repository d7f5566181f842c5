"""Manifests of Parquet parts: committing units (tours, clips) so readers never see a partial one; the tour schema."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from diffpano.io import storage
from diffpano.io.depth import decode_depth, depth_png_bytes

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
        ("scheduler", pa.string()),  # null in parts written before the column
        ("depth_uri", pa.string()),  # the view's depth (tours made on a geometry); null otherwise and in older parts
    ]
)


@dataclass
class Tour:
    """One generated tour: images (N, H, W, 3) uint8 with prompts and poses, and how it was made (scheduler: the
    sampler's name, or its diffusers class for a model's own that has none); image_uris where a tour read back from
    an output is stored (absolute)."""

    tour_id: str
    images: np.ndarray
    prompts: list[str]
    poses: np.ndarray
    seed: int
    model: str
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None = None
    image_uris: list[str] | None = None
    depths: np.ndarray | None = None  # (N, H, W) metres, 0 unknown: the geometry a tour was made on


def image_path(tour_id: str, view_index: int) -> str:
    """Image location relative to the output root: deterministic, so a retried write replaces, never duplicates."""
    return f"images/{tour_id}/{view_index:03d}.png"


def depth_path(tour_id: str, view_index: int) -> str:
    """Depth location relative to the output root (beside the images, as deterministic)."""
    return f"depth/{tour_id}/{view_index:03d}.png"


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an (H, W, 3) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8, rounded to the nearest level, halves up (clipped outside [0, 1])."""
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def decode_rgb(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 of an image file's bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def tour_table(tours: list[Tour], created_at: datetime | None = None) -> pa.Table:
    """Manifest rows of tours, one per view."""
    now = created_at or datetime.now(timezone.utc)
    rows = [
        dict(
            tour_id=t.tour_id, view_index=i, prompt=t.prompts[i],
            pose_c2w=np.asarray(t.poses[i], dtype=np.float32).reshape(16).tolist(),
            image_uri=image_path(t.tour_id, i), height=t.images.shape[1], width=t.images.shape[2], seed=t.seed,
            model=t.model, num_inference_steps=t.num_inference_steps, guidance_scale=t.guidance_scale, created_at=now,
            scheduler=t.scheduler, depth_uri=None if t.depths is None else depth_path(t.tour_id, i),
        )
        for t in tours
        for i in range(len(t.images))
    ]
    return pa.Table.from_pylist(rows, schema=TOUR_SCHEMA)


def manifest_part_name(ids: list[str]) -> str:
    """Deterministic file name of the manifest part that commits the units (tours, clips) with these ids."""
    return f"part-{hashlib.sha256(chr(0).join(sorted(ids)).encode()).hexdigest()[:20]}.parquet"


def resolve_uri(root: str, uri: str) -> str:
    """A manifest URI made absolute: relative ones lie below the root (docs/tours.md, docs/datasets.md)."""
    return uri if uri.startswith(("s3://", "file://", "/")) else storage.join(root, uri)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def commit_part(root: str, files: dict[str, bytes], table: pa.Table, ids: list[str], pending: bool = False) -> str:
    """Write files (path relative to root -> bytes), then the manifest part naming them in one atomic put: into
    manifest/, or into _pending/ when pending (a running job publishes those merged, diffpano.io.compaction)."""
    storage.write_files(root, files)
    data = parquet_bytes(table)
    name = manifest_part_name(ids)
    uri = storage.join(root, PENDING if pending else "manifest", name)
    if pending or storage.is_remote(root):
        storage.write_bytes(uri, data, staging=storage.join(root, "_staging"))
        return uri
    with storage.local_lock(manifest_lock(root), exclusive=False):  # not while a compaction swaps manifest/
        if storage.exists(storage.join(root, COMPACTED, name)):
            return uri  # a retried batch whose first commit was already compacted: its rows are there
        storage.write_bytes(uri, data, staging=storage.join(root, "_staging"))
    return uri


COMPACTED = "_compacted"  # names of parts a compaction merged away (local outputs)
PENDING = "_pending"  # parts a running job has staged but not yet published in manifest/ (never read by readers)


def manifest_lock(root: str) -> str:
    """The lock file of a local output's manifest: parts are published shared, compactions hold it exclusively."""
    return storage.join(storage.absolute(root), "_manifest.lock")


@storage.waits_out_outages
def read_parts(root: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """All manifest rows under root with this schema (an empty table when there are none)."""
    fs, path = storage.resolve(storage.join(root, "manifest"))
    if not storage.list_files(storage.join(root, "manifest"), ".parquet"):
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pads.dataset(path, filesystem=fs, format="parquet", schema=schema).to_table(columns=columns)


def commit_tours(root: str, tours: list[Tour], pending: bool = False) -> str:
    """Write the tours' images, then one manifest part naming them (staged under _pending/ when pending); returns
    the part's URI."""
    files = {image_path(t.tour_id, i): png_bytes(image) for t in tours for i, image in enumerate(t.images)}
    files |= {depth_path(t.tour_id, i): depth_png_bytes(d) for t in tours if t.depths is not None
              for i, d in enumerate(t.depths)}
    return commit_part(root, files, tour_table(tours), [t.tour_id for t in tours], pending)


def read_manifest(root: str) -> pa.Table:
    """All tour manifest rows under root (an empty table when there are none)."""
    return read_parts(root, TOUR_SCHEMA)


def tour_ids(root: str) -> set[str]:
    """The ids of the tours under root, reading the tour_id column alone."""
    return set(read_parts(root, TOUR_SCHEMA, ["tour_id"]).column("tour_id").to_pylist())


def latest_tour_id(root: str) -> str | None:
    """The id of the tour written last under root (None when there is none)."""
    table = read_parts(root, TOUR_SCHEMA, ["tour_id", "created_at"]).to_pandas()
    return None if table.empty else str(table.sort_values("created_at").tour_id.iloc[-1])


def pose_matrices(column) -> np.ndarray:
    """(N, 4, 4) float64 of a manifest's pose_c2w column (16 numbers a row)."""
    return np.stack([np.asarray(p, np.float64).reshape(4, 4) for p in column])


def read_tours(root: str, ids: Sequence[str] | None = None) -> list[Tour]:
    """Tours under root with their images, in `ids` order (ValueError names a missing one; None: all, by id); each
    image_uri is resolved against root when relative and kept when absolute (docs/tours.md), local or s3://."""
    table = read_manifest(root).to_pandas()
    tours = []
    for tid in sorted(set(table.tour_id)) if ids is None else ids:
        rows = table[table.tour_id == tid].sort_values("view_index")
        if rows.empty:
            raise ValueError(f"tour_id: no tour {tid!r} in {root}")
        first = rows.iloc[0]
        uris = [resolve_uri(root, u) for u in rows.image_uri]
        depths = None
        if rows.depth_uri.notna().all():
            depths = np.stack([decode_depth(storage.read_bytes(resolve_uri(root, u))) for u in rows.depth_uri])
        tours.append(Tour(
            tour_id=tid, images=np.stack([decode_rgb(storage.read_bytes(u)) for u in uris]),
            prompts=rows.prompt.tolist(), poses=pose_matrices(rows.pose_c2w),
            seed=int(first.seed), model=first.model, num_inference_steps=int(first.num_inference_steps),
            guidance_scale=float(first.guidance_scale),
            scheduler=first.scheduler if isinstance(first.scheduler, str) else None, image_uris=uris, depths=depths,
        ))
    return tours
