"""Frozen-encoder caches: text embeddings and VAE latents of a dataset, computed once by a pool of Ray actors (or in
this process when asked for no actors), stored beside it.

A cache is a folder `<dataset>/cache/<kind>-<digest>` of Parquet parts plus a `_COMPLETE.json` marker written
last; without the marker (or with one for other inputs) it is not trusted and gets rebuilt from scratch. The
digest covers the encoder's files, so a changed encoder never reads a stale cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from diffpano.data.loaders import resize_rgb
from diffpano.data.manifest import read_dataset
from diffpano.io import storage
from diffpano.io.manifest import decode_rgb, resolve_uri
from diffpano.models.text import encode_prompts
from diffpano.pipelines.loading import load_model
from fanout.actors import map_on_actors, start_actors

CACHE_VERSION = 2  # bump when what a cache holds changes for the same encoder files (preprocessing, layout,
#                   the VAE encoder wrapping in longitude since 2)
MARKER = "_COMPLETE.json"
TEXT_ROWS_PER_FILE = 256
LATENT_ROWS_PER_FILE = 512
HASH_CHUNK = 8 << 20
# Config keys that name a library version or a save location, not the model, and a tokenizer's call-time
# truncation/padding state (tokenizer.json records the last call's): they must not change the digest.
VOLATILE_KEYS = frozenset(
    {"_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "_diffusers_version", "truncation",
     "padding"}
)

TEXT_SCHEMA = pa.schema([("caption", pa.string()), ("embedding", pa.binary()), ("shape", pa.list_(pa.int32()))])
LATENT_SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("frame_index", pa.int32()), ("latent", pa.binary()), ("shape", pa.list_(pa.int32()))]
)


# ---------------------------------------------------------------- digests and locations


def text_cache_uri(dataset: str, model_dir: str) -> str:
    """Where the text-embedding cache of a model's text encoder lives for this dataset."""
    return _text_uri(storage.absolute(dataset), text_digest(model_dir))


def latent_cache_uri(dataset: str, model_dir: str, size: tuple[int, int]) -> str:
    """Where the VAE-latent cache of a latent model at this image size lives for this dataset."""
    h, w = _check_size(model_dir, size)
    return _latent_uri(storage.absolute(dataset), (h, w), latent_digest(model_dir, (h, w)))


def _text_uri(dataset: str, digest: str) -> str:
    """Text cache location of an encoder digest."""
    return storage.join(dataset, "cache", f"text-{digest}")


def _latent_uri(dataset: str, size: tuple[int, int], digest: str) -> str:
    """Latent cache location of a VAE digest and image size."""
    return storage.join(dataset, "cache", f"latent-{size[0]}x{size[1]}-{digest}")


def text_digest(model_dir: str) -> str:
    """16 hex of sha256 over the text encoder's and tokenizer's files (read as bytes, no torch modules loaded)."""
    h = hashlib.sha256(f"diffpano-text-cache/{CACHE_VERSION}".encode())
    index = _model_index(model_dir)
    h.update(json.dumps(index.get("text_encoder"), sort_keys=True).encode())  # the class load_model builds
    _hash_component(h, model_dir, "text_encoder")
    _hash_component(h, model_dir, "tokenizer")
    return h.hexdigest()[:16]


def latent_digest(model_dir: str, size: tuple[int, int]) -> str:
    """16 hex of sha256 over the VAE's files and the image size."""
    h = hashlib.sha256(f"diffpano-latent-cache/{CACHE_VERSION}/{int(size[0])}x{int(size[1])}".encode())
    _hash_component(h, model_dir, "vae")
    return h.hexdigest()[:16]


def has_vae(model_dir: str) -> bool:
    """True for a latent-space model directory (it has a vae/ component)."""
    return storage.exists(storage.join(storage.absolute(model_dir), "vae", "config.json"))


def _model_index(model_dir: str) -> dict:
    """The model directory's model_index.json ({} when absent)."""
    uri = storage.join(storage.absolute(model_dir), "model_index.json")
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}


def _hash_component(h, model_dir: str, name: str) -> None:
    """Feed the relative names and contents of a component folder's files into h (JSON canonicalised)."""
    base = storage.join(storage.absolute(model_dir), name)
    files = [u for u in storage.list_files(base) if not u.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise FileNotFoundError(f"model: {model_dir} has no {name}/ files")
    for uri in files:
        h.update(f"\0{name}/{uri[len(base) + 1 :]}\0".encode())
        if uri.endswith(".json"):
            h.update(_canonical_json(storage.read_bytes(uri)))
            continue
        fs, path = storage.resolve(uri)
        with fs.open_input_stream(path) as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)


def _canonical_json(data: bytes) -> bytes:
    """JSON bytes with sorted keys and without volatile top-level keys; other bytes unchanged."""
    try:
        value = json.loads(data)
    except ValueError:
        return data
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in VOLATILE_KEYS}
    return json.dumps(value, sort_keys=True).encode()


def _vae_factor(model_dir: str) -> int:
    """Pixels per latent cell, from the VAE config."""
    config = json.loads(storage.read_bytes(storage.join(storage.absolute(model_dir), "vae", "config.json")))
    return 2 ** (len(config["block_out_channels"]) - 1)


def _check_size(model_dir: str, size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) validated for the model's VAE; ValueError when the model has none or the size does not fit."""
    if not has_vae(model_dir):
        raise ValueError(f"model: {model_dir} is a pixel-space model (no vae/); it has no latent cache")
    h, w = (int(v) for v in size)
    f = _vae_factor(model_dir)
    if h <= 0 or w <= 0 or h % f or w % f:
        raise ValueError(f"size: height and width must be positive multiples of {f} for this VAE, got {h}x{w}")
    return h, w


# ---------------------------------------------------------------- encoders


class EmbedCaptions:
    """float16 token embeddings of captions with the model directory's text encoder (loaded once)."""

    def __init__(self, model_dir: str, device: str = "cpu") -> None:
        pipe = load_model(model_dir, device, torch.float32)
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Rows (caption, embedding bytes, shape) of a batch of captions."""
        captions = [str(c) for c in batch["caption"]]
        emb = _to_float16(encode_prompts(self.tokenizer, self.text_encoder, captions), "text embedding")
        return pa.table(
            {"caption": captions, "embedding": [e.tobytes() for e in emb], "shape": [list(emb.shape[1:])] * len(emb)},
            schema=TEXT_SCHEMA,
        )


class EncodeLatents:
    """float16 VAE latents (scaled latent-distribution means) of keyframes resized to `size`."""

    def __init__(self, model_dir: str, size: tuple[int, int], device: str = "cpu") -> None:
        self.pipe = load_model(model_dir, device, torch.float32)
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Rows (clip_id, frame_index, latent bytes, shape) of a batch of keyframes."""
        images = np.stack([resize_rgb(decode_rgb(storage.read_bytes(str(u))), self.size) for u in batch["rgb_uri"]])
        with torch.inference_mode():
            latents = _to_float16(self.pipe._encode_images(torch.from_numpy(images)), "latent")
        return pa.table(
            {
                "clip_id": [str(c) for c in batch["clip_id"]],
                "frame_index": np.asarray(batch["frame_index"], np.int32),
                "latent": [z.tobytes() for z in latents],
                "shape": [list(latents.shape[1:])] * len(latents),
            },
            schema=LATENT_SCHEMA,
        )


def _to_float16(x: torch.Tensor, what: str) -> np.ndarray:
    """A tensor as a float16 array; ValueError when a value does not fit float16 (it would train on inf)."""
    out = x.detach().float().cpu().numpy().astype(np.float16)
    if not np.isfinite(out).all():
        raise ValueError(f"cache: a {what} overflows float16 (max |value| {float(x.abs().max()):.4g})")
    return out


# ---------------------------------------------------------------- building


def build_text_cache(
    dataset: str, model_dir: str, num_actors: int = 1, batch_size: int = 64, progress: bool = True,
    num_gpus: float = 0.0,
) -> str:
    """Embed the dataset's unique captions and "" with the model's text encoder once; returns the cache URI."""
    dataset, model_dir = storage.absolute(dataset), storage.absolute(model_dir)
    digest = text_digest(model_dir)
    uri = _text_uri(dataset, digest)
    captions = sorted({c or "" for c in read_dataset(dataset, ["caption"]).column("caption").to_pylist()} | {""})
    _build(
        uri, kind="text", digest=digest, source=_fingerprint(captions),
        items=[{"caption": c} for c in captions], actor=EmbedCaptions,
        actor_kwargs={"model_dir": model_dir, "device": _device(num_gpus)},
        num_actors=num_actors, batch_size=batch_size, num_gpus=num_gpus, rows_per_file=TEXT_ROWS_PER_FILE,
        progress=progress,
    )
    return uri


def build_latent_cache(
    dataset: str, model_dir: str, size: tuple[int, int], num_actors: int = 1, batch_size: int = 8,
    progress: bool = True, num_gpus: float = 0.0,
) -> str | None:
    """Encode every keyframe, resized to size, with the model's VAE once; the cache URI, or None for pixel models."""
    dataset, model_dir = storage.absolute(dataset), storage.absolute(model_dir)
    if not has_vae(model_dir):
        return None
    h, w = _check_size(model_dir, size)
    digest = latent_digest(model_dir, (h, w))
    uri = _latent_uri(dataset, (h, w), digest)
    table = read_dataset(dataset, ["clip_id", "frame_index", "rgb_uri"])
    columns = (table.column(k).to_pylist() for k in ("clip_id", "frame_index", "rgb_uri"))
    frames = {(c, int(i)): u for c, i, u in zip(*columns, strict=True)}
    keys = sorted(frames)
    # Manifest URIs (relative ones as they are) identify the inputs, so a copied dataset keeps its cache.
    _build(
        uri, kind="latent", digest=digest, source=_fingerprint([f"{c}\0{i}\0{frames[c, i]}" for c, i in keys]),
        items=[{"clip_id": c, "frame_index": i, "rgb_uri": resolve_uri(dataset, frames[c, i])} for c, i in keys],
        actor=EncodeLatents,
        actor_kwargs={"model_dir": model_dir, "size": (h, w), "device": _device(num_gpus)},
        num_actors=num_actors, batch_size=batch_size, num_gpus=num_gpus, rows_per_file=LATENT_ROWS_PER_FILE,
        progress=progress,
    )
    return uri


def _device(num_gpus: float) -> str:
    """Device the cache actors use."""
    return "cuda" if num_gpus > 0 else "cpu"


def _fingerprint(keys: list[str]) -> str:
    """16 hex identifying the set of inputs a cache was built from (a grown dataset invalidates it)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _build(
    uri: str, *, kind: str, digest: str, source: str, items: list[dict], actor: type, actor_kwargs: dict,
    num_actors: int, batch_size: int, num_gpus: float, rows_per_file: int, progress: bool,
) -> None:
    """Encode items with `actor` into Parquet parts under uri (on Ray actors, or here when num_actors is 0), then
    write the marker; skip if complete."""
    marker = read_marker(uri)
    if marker and marker.get("digest") == digest and marker.get("source") == source:
        return
    _clear(uri)
    fs, path = storage.resolve(uri)
    if not storage.is_remote(uri):
        fs.create_dir(path)
    per_part = min(rows_per_file, math.ceil(len(items) / max(1, num_actors))) if items else 1
    parts = [(i, items[k : k + per_part]) for i, k in enumerate(range(0, len(items), per_part))]
    args = (uri, actor, actor_kwargs, batch_size)
    with tqdm(total=len(items), unit="row", desc=uri.rsplit("/", 1)[-1], disable=not progress) as bar:
        if num_actors == 0:
            writer = PartWriter(*args)
            rows = (writer.write(part) for part in parts)
        elif parts:
            pool = start_actors(PartWriter, min(num_actors, len(parts)), *args, num_gpus=num_gpus)
            rows = map_on_actors(pool, "write", parts)
        else:
            rows = iter(())
        for count in rows:
            bar.update(count)
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(uri, ".parquet")]
    count = sum(pq.read_metadata(f"{path}/{name}", filesystem=fs).num_rows for name in names)
    if count != len(items):
        raise RuntimeError(f"cache {uri}: wrote {count} rows for {len(items)} inputs; not marking it complete")
    created = datetime.now(timezone.utc).isoformat()
    info = {"kind": kind, "digest": digest, "source": source, "count": count, "parts": names, "created_at": created}
    storage.write_bytes(storage.join(uri, MARKER), json.dumps(info, indent=1).encode())


class PartWriter:
    """Encodes one part's items, batch by batch (threads overlap image decoding), into `part-NNNNN.parquet`; a
    re-run part (its actor restarted) overwrites its own file."""

    def __init__(self, uri: str, encoder: type, encoder_kwargs: dict, batch_size: int, threads: int = 8) -> None:
        self.uri, self.encode = uri, encoder(**encoder_kwargs)
        self.batch_size, self.threads = batch_size, threads

    def write(self, part: tuple[int, list[dict]]) -> int:
        """Encode and write part (index, items); the rows written."""
        index, items = part
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        batches = ({k: np.asarray([it[k] for it in chunk]) for k in chunk[0]} for chunk in chunks)
        with ThreadPoolExecutor(self.threads) as pool:
            table = pa.concat_tables(pool.map(self.encode, batches))
        fs, path = storage.resolve(self.uri)
        pq.write_table(table, f"{path}/part-{index:05d}.parquet", filesystem=fs)
        return table.num_rows


def read_marker(uri: str) -> dict | None:
    """The cache's completion marker, or None when the cache is absent or incomplete."""
    marker = storage.join(uri, MARKER)
    return json.loads(storage.read_bytes(marker)) if storage.exists(marker) else None


def _clear(uri: str) -> None:
    """Remove a cache folder, its marker first (so no reader trusts the parts while they go)."""
    fs, path = storage.resolve(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(f"{path}/{MARKER}")
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


# ---------------------------------------------------------------- loading


def load_text_cache(uri: str) -> dict[str, np.ndarray]:
    """Caption -> (L, D) float32 embedding of a complete text cache; ValueError naming uri when incomplete."""
    table = _read_cache(uri, TEXT_SCHEMA)
    return {
        c: _decode(e, s)
        for c, e, s in zip(*(table.column(k).to_pylist() for k in ("caption", "embedding", "shape")), strict=True)
    }


def load_latent_cache(uri: str) -> dict[tuple[str, int], np.ndarray]:
    """(clip_id, frame_index) -> (c, h, w) float32 latent of a complete latent cache; ValueError when incomplete."""
    table = _read_cache(uri, LATENT_SCHEMA)
    columns = (table.column(k).to_pylist() for k in ("clip_id", "frame_index", "latent", "shape"))
    return {(c, int(i)): _decode(z, s) for c, i, z, s in zip(*columns, strict=True)}


def _decode(data: bytes, shape: list[int]) -> np.ndarray:
    """float32 array of float16 bytes."""
    return np.frombuffer(data, np.float16).reshape(shape).astype(np.float32)


def _read_cache(uri: str, schema: pa.Schema) -> pa.Table:
    """All rows of the parts a complete cache's marker names."""
    marker = read_marker(uri)
    if marker is None:
        raise ValueError(f"cache {uri}: incomplete or missing (no {MARKER}); build it first")
    fs, path = storage.resolve(uri)
    try:
        tables = [pq.read_table(f"{path}/{name}", filesystem=fs, schema=schema) for name in marker["parts"]]
    except FileNotFoundError as err:
        raise ValueError(f"cache {uri}: a part its marker names is missing ({err}); rebuild it") from err
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if table.num_rows != marker["count"]:
        raise ValueError(f"cache {uri}: {table.num_rows} rows, the marker says {marker['count']}; rebuild it")
    return table
