"""`diffpano dataset import`: images + poses/captions (JSON or CSV) to the docs/datasets.md dataset, validated first."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.data.importer import import_dataset
from diffpano.data.manifest import DATASET_SCHEMA, read_dataset
from diffpano.geometry.spherical import make_pose, yaw_matrix
from diffpano.io import storage
from diffpano.io.depth import decode_depth
from diffpano.io.manifest import decode_rgb

app = build_app()

runner = CliRunner()
H, W = 16, 32


def pose16(i: int) -> list[float]:
    """A valid pose: yawed by i * 30 degrees, walked i metres along x."""
    return make_pose(yaw_matrix(math.radians(30 * i)), torch.tensor([float(i), 0.0, 0.5])).reshape(16).tolist()


def write_png(path, array) -> None:
    """Save an array as an image file, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_inputs(tmp_path, frames: int = 3, clips: int = 2, depth: bool = True) -> tuple[list[dict], dict]:
    """Images (and depth) under tmp_path/images and their records; also the arrays by relative path."""
    rng = np.random.default_rng(0)
    records, arrays = [], {}
    for c in range(clips):
        for f in range(frames):
            rel = f"room{c}/f{f}.png"
            arrays[rel] = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            write_png(tmp_path / "images" / rel, arrays[rel])
            rec = dict(image=rel, caption=f"room {c} view {f}", pose_c2w=pose16(f), scene_id=f"house{c}",
                       clip_id=f"walk{c}")
            if depth:
                drel = f"room{c}/d{f}.png"
                arrays[drel] = rng.integers(0, 20000, (H, W), dtype=np.uint16)
                write_png(tmp_path / "images" / drel, arrays[drel])
                rec["depth"] = drel
            records.append(rec)
    return records, arrays


def write_json(path, data) -> str:
    """Write JSON; return the path as a string."""
    path.write_text(json.dumps(data))
    return str(path)


def write_csv(path, records: list[dict]) -> str:
    """Write records as CSV with poses as space-separated strings."""
    keys = sorted({k for r in records for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "pose_c2w": " ".join(str(x) for x in np.ravel(r["pose_c2w"]))})
    return str(path)


def check_dataset(out: str, records: list[dict], arrays: dict) -> pd.DataFrame:
    """The manifest has one row per record, readable with pyarrow and pandas; files equal the inputs."""
    table = read_dataset(out)
    assert table.schema.equals(DATASET_SCHEMA) and table.num_rows == len(records)
    if not storage.is_remote(out):
        assert pads.dataset(f"{out}/manifest", format="parquet").count_rows() == len(records)
        assert len(pd.read_parquet(f"{out}/manifest")) == len(records)
    df = table.to_pandas()
    assert not df.duplicated(["clip_id", "frame_index"]).any()
    for rec in records:
        row = df[(df.caption == rec["caption"])].iloc[0]
        assert (row.height, row.width) == (H, W)
        np.testing.assert_allclose(np.asarray(row.pose_c2w).reshape(16), np.ravel(rec["pose_c2w"]), atol=1e-6)
        data = storage.read_bytes(storage.join(out, row.rgb_uri))
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_array_equal(decode_rgb(data), arrays[rec["image"]])
        if "depth" in rec:
            depth = decode_depth(storage.read_bytes(storage.join(out, row.depth_uri)))
            np.testing.assert_allclose(depth, arrays[rec["depth"]] / 1000.0, atol=1e-6)
        else:
            assert pd.isna(row.depth_uri)
    return df


def test_import_json_end_to_end_and_reimport_adds_nothing(tmp_path):
    records, arrays = make_inputs(tmp_path)
    poses = write_json(tmp_path / "poses.json", {"frames": records})
    out = str(tmp_path / "ds")
    summary = import_dataset(str(tmp_path / "images"), poses, out)
    assert (summary.clips, summary.frames, summary.skipped_clips) == (2, 6, 0)
    df = check_dataset(out, records, arrays)
    assert sorted(df.frame_index[df.clip_id == "walk1"]) == [0, 1, 2]
    assert set(df.scene_id) == {"house0", "house1"}
    again = import_dataset(str(tmp_path / "images"), poses, out)
    assert (again.clips, again.frames, again.skipped_clips) == (0, 0, 2)
    assert read_dataset(out).num_rows == 6


def test_import_csv_defaults_scene_clip_and_frame_order(tmp_path):
    records, arrays = make_inputs(tmp_path, frames=3, clips=1, depth=False)
    for r in records:
        del r["scene_id"], r["clip_id"]
    records = [records[2], records[0], records[1]]  # frame_index defaults to the order in the file
    poses = write_csv(tmp_path / "kitchen.csv", records)
    out = str(tmp_path / "ds")
    import_dataset(str(tmp_path / "images"), poses, out)
    df = check_dataset(out, records, arrays).sort_values("frame_index")
    assert set(df.scene_id) == {"kitchen"} and set(df.clip_id) == {"kitchen"}
    assert df.caption.tolist() == [r["caption"] for r in records]


def test_import_nested_pose_and_jpeg_reencoded_as_png(tmp_path):
    img = np.zeros((H, W, 3), np.uint8)
    img[:, : W // 2] = (200, 40, 40)
    (tmp_path / "images").mkdir()
    Image.fromarray(img).save(tmp_path / "images" / "pano.jpg", quality=95)
    pose = np.asarray(pose16(1)).reshape(4, 4).tolist()
    poses = write_json(tmp_path / "p.json", [dict(image="pano.jpg", caption="a red wall", pose_c2w=pose)])
    out = str(tmp_path / "ds")
    import_dataset(str(tmp_path / "images"), poses, out)
    row = read_dataset(out).to_pylist()[0]
    assert row["rgb_uri"].endswith(".png")
    data = storage.read_bytes(storage.join(out, row["rgb_uri"]))
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (W, H)
    assert np.abs(decode_rgb(data).astype(int) - img).max() < 40  # JPEG is lossy


def test_cli_import_prints_summary(tmp_path):
    records, arrays = make_inputs(tmp_path, frames=2, clips=1, depth=False)
    poses = write_json(tmp_path / "poses.json", records)
    out = str(tmp_path / "ds")
    result = runner.invoke(app, ["dataset", "import", str(tmp_path / "images"), poses, "--out", out])
    assert result.exit_code == 0, result.output
    assert "1 clips, 2 frames" in result.output and out in result.output
    check_dataset(out, records, arrays)
    result = runner.invoke(app, ["dataset", "import", str(tmp_path / "images"), poses, "--out", out])
    assert result.exit_code == 0 and "already present" in result.output
    assert read_dataset(out).num_rows == 2


def break_missing(records, tmp_path):
    records[3]["image"] = "rooms/a.png"
    return "poses.json[3].image", "file not found: rooms/a.png"


def break_size(records, tmp_path):
    write_png(tmp_path / "images" / "odd.png", np.zeros((H, W + 1, 3), np.uint8))
    records[1]["image"] = "odd.png"
    return "poses.json[1].image", "width = 2*height"


def break_pose(records, tmp_path):
    records[4]["pose_c2w"] = np.diag([1.0, 2.0, 1.0, 1.0]).reshape(16).tolist()
    return "poses.json[4].pose_c2w", "orthonormal"


def break_caption(records, tmp_path):
    records[2]["caption"] = "  "
    return "poses.json[2].caption", "non-empty"


def break_duplicate(records, tmp_path):
    records[1]["frame_index"] = 0
    records[0]["frame_index"] = 0
    return "poses.json[1].frame_index", "duplicate frame 0"


def break_depth_size(records, tmp_path):
    write_png(tmp_path / "images" / "small.png", np.zeros((H // 2, W // 2), np.uint16))
    records[5]["depth"] = "small.png"
    return "poses.json[5].depth", "differs"


@pytest.mark.parametrize(
    "breaker", [break_missing, break_size, break_pose, break_caption, break_duplicate, break_depth_size]
)
def test_bad_input_names_record_and_field_and_writes_nothing(tmp_path, breaker):
    records, _ = make_inputs(tmp_path)
    where, what = breaker(records, tmp_path)
    poses = write_json(tmp_path / "poses.json", records)
    out = tmp_path / "ds"
    with pytest.raises(ValueError) as err:
        import_dataset(str(tmp_path / "images"), poses, str(out))
    assert where in str(err.value) and what in str(err.value)
    assert not out.exists()  # validation precedes every write: no manifest part, no image
    result = runner.invoke(app, ["dataset", "import", str(tmp_path / "images"), poses, "--out", str(out)])
    assert result.exit_code == 2 and where in " ".join(result.output.replace("│", " ").split())
    assert not out.exists()


def test_frame_indices_must_be_contiguous_and_many_errors_reported_together(tmp_path):
    records, _ = make_inputs(tmp_path, frames=3, clips=1, depth=False)
    for i, r in enumerate(records):
        r["frame_index"] = i + 1
    poses = write_json(tmp_path / "poses.json", records)
    with pytest.raises(ValueError, match=r"0\.\.2, got \[1, 2, 3\]"):
        import_dataset(str(tmp_path / "images"), poses, str(tmp_path / "ds"))
    records[0]["caption"], records[2]["image"] = "", "nope.png"
    write_json(tmp_path / "poses.json", records)
    with pytest.raises(ValueError) as err:
        import_dataset(str(tmp_path / "images"), poses, str(tmp_path / "ds"))
    assert "poses.json[0].caption" in str(err.value) and "poses.json[2].image" in str(err.value)


def test_import_to_s3(s3_endpoint, tmp_path):
    records, arrays = make_inputs(tmp_path, frames=2, clips=2)
    poses = write_json(tmp_path / "poses.json", records)
    out = "s3://diffpano-test/imported/ds"
    summary = import_dataset(str(tmp_path / "images"), poses, out)
    assert (summary.clips, summary.frames) == (2, 4)
    check_dataset(out, records, arrays)
    assert len(storage.list_files(f"{out}/manifest", ".parquet")) == 2
    assert import_dataset(str(tmp_path / "images"), poses, out).clips == 0
    assert read_dataset(out).num_rows == 4
