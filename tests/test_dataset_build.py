"""`diffpano dataset build` on local Ray: docs/datasets.md output, idempotent re-runs, resume, S3, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from typer.testing import CliRunner

from batch.dataset import build_dataset
from diffpano.cli import build_app
from diffpano.data.loaders import ClipDataset
from diffpano.data.manifest import DATASET_SCHEMA, read_dataset
from diffpano.data.procedural.build import ProceduralSpec, clip_id, render_clips
from diffpano.geometry.spherical import validate_poses
from diffpano.io import storage
from diffpano.io.depth import decode_depth
from diffpano.io.manifest import decode_rgb

app = build_app()

ARGS = ["dataset", "build", "--scenes", "2", "--clips-per-scene", "2", "--frames", "3", "--size", "32x64", "--quiet"]


pytestmark = pytest.mark.ray  # bulk jobs, dataset builds and training run on Ray here


def plain(text: str) -> str:
    """CLI output without rich's boxes and line breaks."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def build(out, *extra) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*ARGS, "--out", str(out), *extra])
    return result.exit_code, plain(result.output)


def files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """A small dataset built once through the CLI."""
    out = tmp_path_factory.mktemp("ds") / "procedural"
    code, text = build(out)
    assert code == 0, text
    return out, text


def test_build_writes_spec_manifest_images_and_depth(built):
    out, text = built
    assert "4 clips / 12 keyframes written" in text
    table = pads.dataset(str(out / "manifest"), format="parquet").to_table()
    assert table.schema.equals(DATASET_SCHEMA, check_metadata=False)
    df = pd.read_parquet(out / "manifest")
    rows = duckdb.sql(f"select count(*), count(distinct clip_id || '/' || frame_index) from "
                      f"read_parquet('{out}/manifest/*.parquet')").fetchall()
    assert len(df) == table.num_rows == rows[0][0] == rows[0][1] == 12
    spec = ProceduralSpec(scenes=2, clips_per_scene=2, frames=3, height=32, width=64)
    assert set(df.clip_id) == {clip_id(spec, s, c) for s in range(2) for c in range(2)}
    for row in df.itertuples():
        rgb = decode_rgb((out / row.rgb_uri).read_bytes())
        depth = decode_depth((out / row.depth_uri).read_bytes())
        assert rgb.shape == (32, 64, 3) and depth.shape == (32, 64) and row.height == 32 and row.width == 64
        assert 0.2 < depth[depth > 0].min() and depth.max() < 20 and (depth > 0).mean() > 0.99
        assert row.caption.endswith(".") and len(row.caption.split()) >= 8
    validate_poses(np.stack(df.pose_c2w.to_numpy()).reshape(-1, 4, 4), "pose_c2w")
    assert sorted(df.groupby("clip_id").frame_index.apply(list).iloc[0]) == [0, 1, 2]


def test_build_is_deterministic_and_loads_for_training(built):
    out, _ = built
    again = render_clips(ProceduralSpec(scenes=2, clips_per_scene=2, frames=3, height=32, width=64), 1, [1])[0]
    df = read_dataset(str(out)).to_pandas()
    rows = df[df.clip_id == again.clip_id].sort_values("frame_index")
    assert rows.caption.tolist() == again.captions
    assert np.array_equal(decode_rgb((out / rows.rgb_uri.iloc[2]).read_bytes()), again.rgb[2])
    clips = ClipDataset(str(out), num_views=3, num_ref_views=2)
    sample = clips[0]
    assert len(clips) == 4 and sample["images"].shape == (3, 3, 32, 64) and sample["ref_index"].shape == (3, 2)


def test_rerun_adds_nothing_and_growing_adds_only_new_scenes(built, tmp_path):
    out, _ = built
    before = files(out)
    code, text = build(out)
    assert code == 0 and "0 clips / 0 keyframes written (4 clips already there)" in text
    assert files(out) == before
    code, text = build(out, "--scenes", "3")
    assert code == 0 and "2 clips / 6 keyframes written (4 clips already there)" in text
    df = read_dataset(str(out)).to_pandas()
    assert len(df) == 18 and not df.duplicated(["clip_id", "frame_index"]).any()


def test_crash_between_images_and_manifest_resumes_without_duplicates(ray_local, tmp_path):
    spec = ProceduralSpec(scenes=2, clips_per_scene=1, frames=2, height=32, width=64)
    out = str(tmp_path / "ds")
    build_dataset(spec, out, progress=False)
    parts = storage.list_files(storage.join(out, "manifest"), ".parquet")
    (tmp_path / "ds" / "manifest" / parts[0].rsplit("/", 1)[1]).unlink()  # images written, manifest part lost
    assert read_dataset(out).num_rows == 2
    summary = build_dataset(spec, out, progress=False)
    assert (summary.clips_written, summary.clips_present) == (1, 1)
    df = read_dataset(out).to_pandas()
    assert len(df) == 4 and not df.duplicated(["clip_id", "frame_index"]).any()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "64x129"], "size"),
        (["--size", "33x65"], "size"),
        (["--size", "big"], "--size"),
        (["--frames", "0"], "frames"),
        (["--spacing", "-1"], "spacing"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, extra, message):
    out = tmp_path / "ds"
    code, text = build(out, *extra)
    assert code == 2 and message in text
    assert not out.exists()


def test_changed_settings_on_an_existing_dataset_are_refused(built):
    out, _ = built
    before = files(out)
    code, text = build(out, "--frames", "4")
    assert code == 2 and "frames" in text and "built with frames=3" in text
    assert files(out) == before


def test_build_to_s3(ray_local, s3_endpoint):
    spec = ProceduralSpec(scenes=1, clips_per_scene=2, frames=2, height=32, width=64, seed=5)
    out = "s3://diffpano-test/datasets/proc"
    summary = build_dataset(spec, out, progress=False)
    assert summary.frames_written == 4
    table = read_dataset(out)
    assert table.num_rows == 4
    rgb = decode_rgb(storage.read_bytes(storage.join(out, table.column("rgb_uri")[0].as_py())))
    assert rgb.shape == (32, 64, 3)
    assert build_dataset(spec, out, progress=False).frames_written == 0


def test_local_processes_build_the_same_dataset_without_ray(built, tmp_path):
    """`--processes 2` renders in a local process pool (Ray unimportable) and writes what Ray tasks wrote."""
    out = tmp_path / "local"
    code = "import sys; sys.modules['ray'] = None\nfrom diffpano.cli import build_app\nbuild_app()(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, *ARGS, "--out", str(out), "--processes", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 clips / 12 keyframes written" in plain(done.stdout)
    ray_built, _ = built
    ours, theirs = (read_dataset(str(d)).to_pandas().sort_values(["clip_id", "frame_index"]) for d in (out, ray_built))
    theirs = theirs[theirs.clip_id.isin(ours.clip_id)]  # other tests add clips to the shared dataset
    assert len(ours) == len(theirs) == 12
    assert list(ours.caption) == list(theirs.caption) and list(ours.rgb_uri) == list(theirs.rgb_uri)
    for uri in ours.rgb_uri:
        assert (out / uri).read_bytes() == (ray_built / uri).read_bytes()


def test_a_procedural_scene_that_fails_is_recorded_and_the_others_complete(ray_local, tmp_path):
    """The one scene-job loop records a failure for every source, procedural scenes included."""

    class FlakyScenes(ProceduralSpec):  # defined here so that Ray ships it by value to the workers
        """Procedural scenes of which scene 1 cannot be built (a captioner crash, say)."""

        def build_scene(self, job, out, result):
            if job.source == 1:
                raise RuntimeError("scene 1 cannot be built")
            super().build_scene(job, out, result)

    out = str(tmp_path / "ds")
    spec = FlakyScenes(scenes=3, clips_per_scene=1, frames=2, height=32, width=64)
    summary = build_dataset(spec, out, progress=False)
    assert (summary.clips_written, summary.frames_written) == (2, 4), summary.line()
    assert "1 scene(s) failed" in summary.line()
    [uri] = storage.list_files(storage.join(out, "failures"), ".jsonl")
    assert uri.rsplit("/", 1)[1].startswith("build-")
    [failure] = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines()]
    assert failure == {"scene": "proc0-000001", "source": 1, "error": "RuntimeError: scene 1 cannot be built"}
    assert set(read_dataset(out, ["scene_id"]).column("scene_id").to_pylist()) == {"proc0-000000", "proc0-000002"}
    again = build_dataset(spec, out, progress=False)  # only the failed scene is tried again
    assert (again.clips_present, again.clips_written, len(again.failures)) == (2, 0, 1)


def test_every_spec_field_is_an_option_of_its_command():
    """The dataset commands' options are derived from the sources' specs: one name per field, sizes as HxW."""
    import typer

    from diffpano.data.captures.build import CaptureSpec
    from diffpano.data.meshes.build import MeshSpec

    group = typer.main.get_command(app).commands["dataset"]
    for name, spec in (("build", ProceduralSpec), ("render", MeshSpec), ("capture", CaptureSpec)):
        flags = {f for p in group.commands[name].params for f in (*p.opts, *p.secondary_opts)}
        expected = {"--" + f.replace("_", "-") for f in spec.model_fields if f not in ("source", "width")}
        expected = {f.replace("height", "size") if f in ("--height", "--sfm-height") else f for f in expected}
        assert expected <= flags, (name, expected - flags)
        assert "--keyframe-spacing" not in flags and "--spacing" in flags
