"""Compaction of a manifest's many small Parquet parts into one, without a concurrent reader ever seeing a duplicate
or a missing row.

Plain readers (pyarrow.dataset, pandas, DuckDB, ray.data) list `manifest/` and read what they listed, so replacing
N parts by one file must change the listing in a single step. A local output gets exactly that: the compacted part
is written into a fresh folder, which is then swapped with `manifest/` by one atomic exchange of two directories,
under the manifest's lock (writers publishing parts wait for the few seconds it takes). S3 has no such step (every
PUT or DELETE changes one key, so some listing would hold both the parts and their copy, or neither). So a bulk job
writing to S3 stages its batches' parts under `_pending/`, where readers never look, and publishes them merged as
it runs (publish_pending): each merged part is one PUT, and a finished S3 output is compacted into a new output
with `into`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from diffpano.io import storage
from diffpano.io.manifest import COMPACTED, PENDING, commit_part, manifest_lock, parquet_bytes, resolve_uri

WORK = "_compact"  # per-compaction folders next to manifest/; never read by manifest readers
COMPACTED_PREFIX = "part-compacted-"


@dataclass
class CompactSummary:
    """What a compaction did."""

    manifest: str
    parts_before: int
    parts_after: int
    rows: int


def compacted_name(parts: list[str]) -> str:
    """Deterministic name of the part that replaces these parts."""
    digest = hashlib.sha256("\0".join(sorted(Path(p).name for p in parts)).encode()).hexdigest()[:20]
    return f"{COMPACTED_PREFIX}{digest}.parquet"


def read_parts_table(root: str, parts: list[str]) -> pa.Table:
    """The rows of these parts, sorted by their first two columns (tour/clip id, view/frame) for later reads."""
    fs, _ = storage.resolve(root)
    paths = [storage.resolve(p)[1] for p in parts]
    # parts written before a column was added lack it: the union keeps it (null there) whichever part comes first
    schema = pa.unify_schemas([pq.read_schema(p, filesystem=fs) for p in paths])
    return sorted_rows(pads.dataset(paths, filesystem=fs, format="parquet", schema=schema).to_table())


def sorted_rows(table: pa.Table) -> pa.Table:
    """A table's rows sorted by their first two columns (tour/clip id, view/frame), as compacted parts keep them."""
    keys = [(name, "ascending") for name in table.column_names[:2]]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def compact(root: str, into: str | None = None) -> CompactSummary:
    """Compact root's manifest in place (local outputs), or into a new output `into` (any storage)."""
    if into:
        return compact_into(root, into)
    if storage.is_remote(root):
        raise ValueError("URI: an s3:// manifest cannot be compacted in place without a moment in which a reader "
                         "lists both the parts and their compacted copy (S3 changes one key at a time); "
                         "use --into s3://.../NEW_PREFIX to write a compacted output beside it")
    return compact_local(storage.absolute(root))


def compact_local(root: str, small_only: bool = False) -> CompactSummary:
    """Write the compacted part into a fresh folder and exchange it with manifest/ in one atomic step. small_only
    merges only the parts batches wrote, keeping earlier compacted ones (hard-linked into the fresh folder): what a
    running job does, so that each compaction costs the rows since the last one."""
    manifest = Path(root) / "manifest"
    if not manifest.is_dir():
        raise ValueError(f"URI: {root} has no manifest/ folder")
    with storage.local_lock(manifest_lock(root), exclusive=True):
        shutil.rmtree(Path(root) / WORK, ignore_errors=True)  # what a compaction that crashed left behind
        every = sorted(str(p) for p in manifest.glob("*.parquet"))
        kept = [p for p in every if small_only and Path(p).name.startswith(COMPACTED_PREFIX)]
        parts = [p for p in every if p not in kept]
        if len(parts) <= 1:
            return CompactSummary(str(manifest), len(every), len(every), count_rows(every))
        table = read_parts_table(root, parts)
        rows = table.num_rows + count_rows(kept)
        fresh = Path(root) / WORK / uuid.uuid4().hex / "manifest"
        fresh.mkdir(parents=True)
        pq.write_table(table, fresh / compacted_name(parts))
        for part in kept:
            os.link(part, fresh / Path(part).name)
        mark_compacted(root, parts)  # before the swap: a crash leaves the parts in place, which is still right
        storage.exchange_dirs(str(fresh), str(manifest))  # manifest/ now holds the merged part; fresh/ the old ones
        shutil.rmtree(Path(root) / WORK, ignore_errors=True)
    return CompactSummary(str(manifest), len(every), len(kept) + 1, rows)


def mark_compacted(root: str, parts: list[str]) -> None:
    """Record the names of parts merged away, so that a late retry of their batch does not publish them again."""
    marks = Path(root) / COMPACTED
    marks.mkdir(exist_ok=True)
    for part in parts:
        (marks / Path(part).name).touch()


def compact_into(root: str, into: str) -> CompactSummary:
    """Write one compacted part under `into`/manifest with absolute file URIs (the images stay where they are)."""
    if storage.list_files(storage.join(into, "manifest"), ".parquet"):
        raise ValueError(f"--into: {into} already has a manifest; give a new output prefix")
    parts = storage.list_files(storage.join(root, "manifest"), ".parquet")
    if not parts:
        raise ValueError(f"URI: {root} has no manifest parts")
    table = read_parts_table(root, parts)
    for i, name in enumerate(table.column_names):
        if name.endswith("_uri"):  # image_uri (tours), rgb_uri/depth_uri (datasets)
            uris = [u if u is None else resolve_uri(storage.absolute(root), u) for u in table[name].to_pylist()]
            table = table.set_column(i, name, pa.array(uris, pa.string()))
    target = storage.join(into, "manifest", compacted_name(parts))
    storage.write_bytes(target, parquet_bytes(table), staging=storage.join(into, "_staging"))
    return CompactSummary(storage.join(into, "manifest"), len(parts), 1, table.num_rows)


def count_rows(parts: list[str]) -> int:
    """Rows in these local Parquet files."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


@storage.waits_out_outages
def publish_pending(root: str, published: set[str]) -> int:
    """Publish the parts staged under root/_pending as one manifest part, leaving out the tours in `published` (a
    batch retried after its part was published stages it again), then delete them. Adds the tours it published to
    `published`; returns how many. Safe to repeat after a crash at any step."""
    staged = storage.read_folder(storage.join(root, PENDING), ".parquet")  # one GET a part
    if not staged:
        return 0
    tables = [pq.read_table(pa.BufferReader(data)) for data in staged.values()]
    table = sorted_rows(pa.concat_tables(tables, promote_options="default"))
    ids = table.column(0)  # tour_id (clip_id in datasets)
    fresh = set(pc.unique(ids).to_pylist()) - published
    if fresh:
        commit_part(root, {}, table.filter(pc.is_in(ids, pa.array(sorted(fresh), ids.type))), sorted(fresh))
        published |= fresh
    storage.delete_files(list(staged))
    return len(fresh)


class Publisher:
    """A running job's publisher of its staged parts: one merged part per call, remembering what it published."""

    def __init__(self, root: str) -> None:
        self.root, self.published = root, set()

    def publish(self) -> int:
        """Publish what is staged now; the number of tours published."""
        return publish_pending(self.root, self.published)
