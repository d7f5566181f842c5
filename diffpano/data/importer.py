"""Import equirectangular images with poses and captions (JSON or CSV) as a dataset (docs/datasets.md)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
from PIL import Image

from diffpano.data.manifest import DATASET_SCHEMA, depth_path, read_dataset, rgb_path
from diffpano.geometry.spherical import check_panorama_size, validate_poses
from diffpano.io import storage
from diffpano.io.manifest import commit_part, png_bytes

ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes of a 16-bit grayscale PNG
MAX_REPORTED_ERRORS = 20


@dataclass
class FrameRecord:
    """One validated input keyframe: where its files are and what the manifest row will say."""

    where: str  # "poses.json[3]", for error messages
    scene_id: str
    clip_id: str
    frame_index: int
    caption: str
    pose: np.ndarray  # (4, 4) float64
    image: str  # relative to the images folder
    depth: str | None
    height: int = 0
    width: int = 0


@dataclass
class ImportSummary:
    """What an import wrote: clips and frames added, clips skipped because they were already there."""

    output: str
    clips: int = 0
    frames: int = 0
    skipped_clips: int = 0
    parts: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One-line human summary."""
        skipped = f", {self.skipped_clips} clips already present (skipped)" if self.skipped_clips else ""
        return f"imported {self.clips} clips, {self.frames} frames{skipped} -> {self.output}"


class ImportErrors:
    """Collects validation errors so that one run reports many of them at once."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        """Record one error."""
        self.messages.append(message)

    def raise_if_any(self) -> None:
        """Raise one ValueError listing the errors (the first MAX_REPORTED_ERRORS of them)."""
        if not self.messages:
            return
        shown = self.messages[:MAX_REPORTED_ERRORS]
        more = len(self.messages) - len(shown)
        raise ValueError("\n".join(shown + ([f"... and {more} more errors"] if more else [])))


def read_records(poses_file: str) -> list[dict]:
    """The raw records of a JSON (list, or {"frames": [...]}) or CSV poses file."""
    name = PurePosixPath(str(poses_file)).name
    if not storage.exists(poses_file):
        raise ValueError(f"{name}: poses file not found: {poses_file}")
    text = storage.read_bytes(poses_file).decode("utf-8-sig")
    if name.lower().endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: not valid JSON ({err})") from None
    if isinstance(data, dict) and "frames" in data:
        data = data["frames"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f'{name}: expected a list of records or {{"frames": [...]}} of JSON objects')
    return data


def optional(record: dict, key: str) -> object | None:
    """A record's value, None when absent, null or an empty string (CSV's empty cell)."""
    value = record.get(key)
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def parse_pose(value: object, where: str) -> np.ndarray:
    """A valid docs/geometry.md pose (4, 4) of 16 numbers, a 4x4 nested list or a string of 16 numbers."""
    if value is None:
        raise ValueError(f"{where}: missing")
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,;\[\]]+", value) if p]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{where}: expected 16 numbers, got {value!r}") from None
    try:
        pose = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected 16 numbers or a 4x4 matrix") from None
    if pose.shape not in ((16,), (4, 4)):
        raise ValueError(f"{where}: expected 16 numbers or a 4x4 matrix, got shape {pose.shape}")
    pose = pose.reshape(4, 4)
    validate_poses(pose, field=where)
    return pose


def parse_id(value: object, where: str) -> str:
    """A scene or clip id usable as a path component."""
    text = str(value).strip()
    if not ID_PATTERN.match(text):
        raise ValueError(f"{where}: must be letters, digits, '_', '-' or '.' (not starting with '.'), got {text!r}")
    return text


def parse_frame_index(value: object, where: str) -> int:
    """A non-negative integer frame index (an int in JSON, digits in CSV)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    raise ValueError(f"{where}: must be a non-negative integer, got {value!r}")


def default_scene_id(poses_file: str) -> str:
    """The poses file's stem made into a valid id."""
    stem = PurePosixPath(str(poses_file)).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".") or "scene"


def parse_record(record: dict, where: str, default_scene: str) -> FrameRecord:
    """A record's fields, checked one by one (files are checked later); frame_index -1 means 'default'."""
    caption = record.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}.caption: must be a non-empty string, got {caption!r}")
    image = optional(record, "image")
    if not isinstance(image, str):
        raise ValueError(f"{where}.image: missing (a path relative to the images folder)")
    depth = optional(record, "depth")
    if depth is not None and not isinstance(depth, str):
        raise ValueError(f"{where}.depth: must be a path relative to the images folder, got {depth!r}")
    scene = optional(record, "scene_id")
    scene_id = default_scene if scene is None else parse_id(scene, f"{where}.scene_id")
    clip = optional(record, "clip_id")
    clip_id = scene_id if clip is None else parse_id(clip, f"{where}.clip_id")
    frame = optional(record, "frame_index")
    frame_index = -1 if frame is None else parse_frame_index(frame, f"{where}.frame_index")
    pose = parse_pose(optional(record, "pose_c2w"), f"{where}.pose_c2w")
    return FrameRecord(where, scene_id, clip_id, frame_index, caption, pose, image.strip(), depth)


def open_image(data: bytes) -> Image.Image:
    """A fully decoded PIL image of file bytes (raises on truncated or unknown files)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def check_files(rec: FrameRecord, images_dir: str) -> None:
    """Check the record's image and depth files: present, decodable, 2:1, depth a same-size 16-bit PNG."""
    uri = storage.join(images_dir, rec.image)
    if not storage.exists(uri):
        raise ValueError(f"{rec.where}.image: file not found: {rec.image}")
    try:
        with open_image(storage.read_bytes(uri)) as im:
            rec.width, rec.height = im.size
    except Exception as err:  # Pillow raises many types for unreadable files
        raise ValueError(f"{rec.where}.image: not a readable image: {rec.image} ({err})") from None
    check_panorama_size(rec.height, rec.width, field=f"{rec.where}.image")
    if rec.depth is None:
        return
    duri = storage.join(images_dir, rec.depth)
    if not storage.exists(duri):
        raise ValueError(f"{rec.where}.depth: file not found: {rec.depth}")
    try:
        with open_image(storage.read_bytes(duri)) as im:
            size, mode, fmt = im.size, im.mode, im.format
    except Exception as err:
        raise ValueError(f"{rec.where}.depth: not a readable image: {rec.depth} ({err})") from None
    if fmt != "PNG" or mode not in DEPTH_MODES:
        raise ValueError(f"{rec.where}.depth: must be a 16-bit grayscale PNG in millimetres, got {fmt} {mode}")
    if size != (rec.width, rec.height):
        raise ValueError(
            f"{rec.where}.depth: size {size[1]}x{size[0]} differs from the image's {rec.height}x{rec.width}"
        )


def group_clips(records: list[FrameRecord], errors: ImportErrors) -> dict[str, list[FrameRecord]]:
    """Records grouped by clip (file order), frame indices defaulted and checked to be 0..n-1, sizes equal."""
    clips: dict[str, list[FrameRecord]] = {}
    for rec in records:
        clips.setdefault(rec.clip_id, []).append(rec)
    for clip_id, recs in clips.items():
        first = recs[0]
        seen: dict[int, FrameRecord] = {}
        for pos, rec in enumerate(recs):
            if rec.scene_id != first.scene_id:
                errors.add(f"{rec.where}.scene_id: clip {clip_id!r} already belongs to scene {first.scene_id!r} "
                           f"({first.where}), got {rec.scene_id!r}")
            if (rec.height, rec.width) != (first.height, first.width):
                errors.add(f"{rec.where}.image: size {rec.height}x{rec.width} differs from {first.height}x"
                           f"{first.width} of clip {clip_id!r}'s first frame ({first.where})")
            if rec.frame_index < 0:
                rec.frame_index = pos
            if rec.frame_index in seen:
                errors.add(f"{rec.where}.frame_index: duplicate frame {rec.frame_index} of clip {clip_id!r} "
                           f"(also {seen[rec.frame_index].where})")
            seen[rec.frame_index] = rec
        if len(seen) == len(recs) and sorted(seen) != list(range(len(recs))):
            errors.add(f"{first.where}.frame_index: clip {clip_id!r} must number its frames 0..{len(recs) - 1}, "
                       f"got {sorted(seen)}")
        recs.sort(key=lambda r: r.frame_index)
    return clips


def plan_import(images_dir: str, poses_file: str) -> dict[str, list[FrameRecord]]:
    """Validate every record and file of an import; the clips (id -> frames in order) it would write."""
    raw = read_records(poses_file)
    name = PurePosixPath(str(poses_file)).name
    if not raw:
        raise ValueError(f"{name}: no records")
    if not storage.exists(images_dir):
        raise ValueError(f"IMAGES_DIR: folder not found: {images_dir}")
    scene = default_scene_id(poses_file)
    errors = ImportErrors()
    records = []
    for i, record in enumerate(raw):
        try:
            rec = parse_record(record, f"{name}[{i}]", scene)
            check_files(rec, images_dir)
            records.append(rec)
        except ValueError as err:
            errors.add(str(err))
    errors.raise_if_any()
    clips = group_clips(records, errors)
    errors.raise_if_any()
    return clips


def rgb_png(data: bytes) -> bytes:
    """PNG bytes of an RGB panorama: 8-bit RGB PNGs as they are, anything else (JPEG, RGBA, ...) re-encoded."""
    # IHDR bytes 24, 25: bit depth 8 and colour type 2 (truecolour) make a PNG usable as it is
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[24:26] == b"\x08\x02":
        return data
    with open_image(data) as im:
        return png_bytes(np.asarray(im.convert("RGB")))


def depth_png(data: bytes) -> bytes:
    """A depth PNG re-encoded as plain 16-bit grayscale millimetres."""
    with open_image(data) as im:
        mm = np.asarray(im).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG")
    return buf.getvalue()


def frame_row(rec: FrameRecord) -> dict:
    """The manifest row of one imported keyframe."""
    return dict(
        scene_id=rec.scene_id, clip_id=rec.clip_id, frame_index=rec.frame_index, caption=rec.caption,
        pose_c2w=rec.pose.astype(np.float32).reshape(16).tolist(),
        rgb_uri=rgb_path(rec.scene_id, rec.clip_id, rec.frame_index),
        depth_uri=None if rec.depth is None else depth_path(rec.scene_id, rec.clip_id, rec.frame_index),
        height=rec.height, width=rec.width,
    )


def write_clip(images_dir: str, out: str, recs: list[FrameRecord]) -> str:
    """Write one clip's images a file at a time, then its manifest part; returns the part's URI."""
    for rec in recs:
        data = rgb_png(storage.read_bytes(storage.join(images_dir, rec.image)))
        storage.write_bytes(storage.join(out, rgb_path(rec.scene_id, rec.clip_id, rec.frame_index)), data)
        if rec.depth is not None:
            data = depth_png(storage.read_bytes(storage.join(images_dir, rec.depth)))
            storage.write_bytes(storage.join(out, depth_path(rec.scene_id, rec.clip_id, rec.frame_index)), data)
    table = pa.Table.from_pylist([frame_row(r) for r in recs], schema=DATASET_SCHEMA)
    return commit_part(out, {}, table, [recs[0].clip_id])


def iter_new_clips(clips: dict[str, list[FrameRecord]], out: str) -> Iterator[list[FrameRecord]]:
    """The clips whose clip_id is not yet in the dataset at out."""
    present = set(read_dataset(out, columns=["clip_id"]).column("clip_id").to_pylist())
    return (recs for clip_id, recs in clips.items() if clip_id not in present)


def import_dataset(images_dir: str, poses_file: str, out: str) -> ImportSummary:
    """Validate everything, then write each new clip (images first, then its manifest part); skip clips present."""
    clips = plan_import(images_dir, poses_file)
    summary = ImportSummary(output=str(out))
    for recs in iter_new_clips(clips, out):
        summary.parts.append(write_clip(images_dir, out, recs))
        summary.clips += 1
        summary.frames += len(recs)
    summary.skipped_clips = len(clips) - summary.clips
    return summary
