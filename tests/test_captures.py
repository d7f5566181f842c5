"""360-degree captures as training data: a procedural walk with known poses rendered at 512x1024 and reconstructed
from its images alone (COLMAP rig SfM), then checked against the truth; bad captures fail alone; videos are read.
The whole CLI job (about two minutes) runs with `make test-slow`; a six-keyframe reconstruction runs by default."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter
from tiny_captioners import write_tiny_blip2, write_tiny_llm
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.data.captures.align import angle_deg, metric_poses
from diffpano.data.captures.frames import select_frames, video_frames
from diffpano.data.captures.sfm import reconstruct
from diffpano.data.manifest import read_dataset
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer
from diffpano.data.procedural.scenes import generate_scene
from diffpano.data.procedural.walks import clip_poses
from diffpano.io import storage

WALK_FRAMES, SPACING = 12, 0.5
app = build_app()


@pytest.fixture(scope="module")
def walk():
    """(true camera-to-world poses, panoramas 512x1024) of a walk through procedural scene 0."""
    scene = generate_scene(0)
    poses = clip_poses(scene, WALK_FRAMES, SPACING, np.random.default_rng(0))
    renderer = SceneMeshRenderer(scene)
    return poses, [renderer.render(p, 512, 1024).rgb for p in poses]


def walk_panoramas(seed: int, frames: int) -> list[np.ndarray]:
    """Panoramas 512x1024 of a walk through procedural scene `seed`."""
    scene = generate_scene(seed)
    renderer = SceneMeshRenderer(scene)
    return [renderer.render(p, 512, 1024).rgb for p in clip_poses(scene, frames, SPACING, np.random.default_rng(seed))]


@pytest.fixture(scope="module")
def captures(walk, tmp_path_factory):
    """Folders of panoramas: the walk with a blurred and a repeated frame slipped in; two walks in different houses
    one after the other; and four bad captures (two frames, featureless, not panoramas, unrelated frames)."""
    root = tmp_path_factory.mktemp("captures")
    (root / "two_houses").mkdir()
    for part, seed in (("a", 1), ("b", 2)):
        for i, rgb in enumerate(walk_panoramas(seed, 5)):
            Image.fromarray(rgb).save(root / "two_houses" / f"{part}_{i}.png")
    (root / "unrelated").mkdir()
    for seed in range(10, 14):
        Image.fromarray(walk_panoramas(seed, 1)[0]).save(root / "unrelated" / f"{seed}.png")
    folder = root / "walk"
    folder.mkdir()
    for i, rgb in enumerate(walk[1]):
        Image.fromarray(rgb).save(folder / f"frame_{i}.png")
    Image.fromarray(walk[1][5]).filter(ImageFilter.GaussianBlur(4)).save(folder / "frame_5b.png")
    Image.fromarray(walk[1][8]).save(folder / "frame_8b.png")
    (root / "two_frames").mkdir()
    for i in range(2):
        Image.fromarray(walk[1][i]).save(root / "two_frames" / f"{i}.png")
    (root / "plain").mkdir()
    ramp = np.linspace(60, 200, 1024)[None, :, None] * np.ones((512, 1, 3))
    for i in range(4):
        Image.fromarray((ramp + 8 * i).astype(np.uint8)).save(root / "plain" / f"{i}.png")
    (root / "photos").mkdir()
    for i in range(3):
        Image.fromarray(walk[1][i][:300, :400]).save(root / "photos" / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def caption_models(tmp_path_factory):
    """Local tiny BLIP2 and LLM directories (random weights: the captions are words, not descriptions)."""
    root = tmp_path_factory.mktemp("captioners")
    return write_tiny_blip2(root / "blip2"), write_tiny_llm(root / "llm")


def capture(*args: str) -> tuple[int, str]:
    """Exit code and flattened output of `diffpano dataset capture ARGS --quiet`."""
    result = CliRunner().invoke(app, ["dataset", "capture", *args, "--quiet"])
    return result.exit_code, re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (scale, rotation, translation) taking points src (N, 3) closest to dst."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    u, sig, vt = np.linalg.svd((dst - mu_d).T @ (src - mu_s) / len(src))
    flip = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    scale = float((sig * np.diag(flip)).sum() / ((src - mu_s) ** 2).sum(1).mean())
    rotation = u @ flip @ vt
    return scale, rotation, mu_d - scale * rotation @ mu_s


def rotation_errors(est: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Degrees between each estimated and true camera rotation after the best common rotation of the worlds."""
    u, _, vt = np.linalg.svd(sum(t @ e.T for e, t in zip(est, true, strict=True)))
    align = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    rel = np.einsum("nji,njk->nik", true, align @ est)  # true^T (align est)
    return np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))


@pytest.fixture(scope="module")
def built(ray_local, captures, caption_models, tmp_path_factory):
    """The CLI run over all captures (images alone, only --camera-height given), its output and the dataset."""
    out = tmp_path_factory.mktemp("capture-out") / "ds"
    args = [str(captures / "*"), "--out", str(out), "--frames", "6", "--spacing", "0.4", "--size",
            "128x256", "--sfm-size", "512x1024", "--camera-height", "1.5", "--captioner", caption_models[0],
            "--summariser", caption_models[1]]
    code, text = capture(*args)
    return args, code, text, out, read_dataset(str(out)).to_pandas()


@pytest.mark.slow
def test_capture_poses_match_the_walk(walk, built):
    """>= 90% registered; every registered frame's rotation <= 1 degree, centre <= 5% of the path and gravity <= 2
    degrees (a median would let 5 of 12 frames be wrong); scale within 5%."""
    true_poses, _ = walk
    _, code, text, _, df = built
    assert code == 0, text
    rows = df[df.scene_id == "walk"].sort_values(["clip_id", "frame_index"])
    index = [int(re.search(r"frame_(\d+)\.png$", s).group(1)) for s in rows.source_uri]
    assert len(set(index)) >= 0.9 * WALK_FRAMES and len(index) == len(set(index)), index
    est = np.stack(rows.pose_c2w.map(lambda p: np.asarray(p, np.float64).reshape(4, 4)))
    true = true_poses[index]
    assert np.max(rotation_errors(est[:, :3, :3], true[:, :3, :3])) <= 1.0
    scale, rotation, shift = umeyama(est[:, :3, 3], true[:, :3, 3])
    centres = scale * est[:, :3, 3] @ rotation.T + shift
    length = np.linalg.norm(np.diff(true_poses[:, :3, 3], axis=0), axis=1).sum()
    assert np.max(np.linalg.norm(centres - true[:, :3, 3], axis=1)) <= 0.05 * length
    # Gravity (+y of the world) seen from each camera: row 1 of the camera-to-world rotation.
    assert np.max(angle_deg(est[:, 1, :3], true[:, 1, :3])) <= 2.0
    assert abs(scale - 1.0) <= 0.05, scale
    assert np.allclose(est[:, 1, 3], true[:, 1, 3], atol=0.05 * 1.5)  # the camera 1.5 m above the floor (y = 0)


@pytest.mark.slow
def test_capture_job_drops_blur_and_repeats_fails_bad_captures_alone_and_reruns_add_nothing(built):
    args, code, text, out, df = built
    assert code == 0, text
    counts = {name: int(n) for n, name in re.findall(r"(\d+) (read|blurred|still|kept|registered)", text)}
    # frames of walk, two_houses, two_frames, plain and unrelated (the photos fail on their first frame)
    assert counts["read"] == 14 + 10 + 2 + 4 + 4 and counts["blurred"] == 1 and counts["still"] == 1, text
    assert counts["kept"] == 12 + 10 + 2 + 4 + 4 and counts["registered"] >= 0.9 * (12 + 10), text
    assert "4 scene(s) failed" in text, text
    assert set(df.scene_id) == {"walk", "two_houses"} and not df.duplicated(["clip_id", "frame_index"]).any()
    assert not df.source_uri.str.contains("frame_5b|frame_8b").any()
    assert all(c.strip() for c in df.caption) and set(df.height) == {128} and df.depth_uri.isna().all()
    assert df.groupby("clip_id").size().max() <= 6
    failures = [json.loads(line) for uri in storage.list_files(storage.join(str(out), "failures"), ".jsonl")
                for line in storage.read_bytes(uri).decode().splitlines()]
    errors = {f["scene"]: f["error"] for f in failures}
    assert set(errors) == {"two_frames", "plain", "photos", "unrelated"}, errors
    assert "need at least 3" in errors["two_frames"] and "too plain" in errors["plain"]
    assert "registered no model" in errors["unrelated"]
    assert "not an equirectangular panorama" in errors["photos"]
    parts = sorted(p.name for p in (out / "manifest").iterdir())
    code, text = capture(*args)
    assert code == 0 and "0 clips / 0 keyframes written" in text, text
    assert sorted(p.name for p in (out / "manifest").iterdir()) == parts


@pytest.mark.slow
def test_a_capture_that_reconstructs_as_two_models_becomes_separate_clips(built):
    _, code, text, _, df = built
    assert code == 0, text
    houses = df[df.scene_id == "two_houses"]
    parts = houses.groupby("clip_id").source_uri.agg(lambda s: {re.search(r"/([ab])_\d+\.png$", u).group(1) for u in s})
    assert sorted(min(p) for p in parts) == ["a", "b"] and all(len(p) == 1 for p in parts), parts


def test_six_keyframes_reconstruct_upright_and_metric(tmp_path):
    """The library path alone, fast: every keyframe registered, each one's rotation within 1 degree and gravity
    within 2 degrees, steps and camera height in metres within 5%."""
    scene = generate_scene(3)
    renderer = SceneMeshRenderer(scene)
    true = clip_poses(scene, 6, SPACING, np.random.default_rng(3))
    models = reconstruct([renderer.render(p, 512, 1024).rgb for p in true], tmp_path, threads=2)
    assert len(models) == 1 and models[0].frames == list(range(6))
    est, _ = metric_poses(models[0].poses, models[0].points, camera_height=-true[0, 1, 3])
    assert np.max(rotation_errors(est[:, :3, :3], true[:, :3, :3])) <= 1.0
    assert np.max(angle_deg(est[:, 1, :3], true[:, 1, :3])) <= 2.0
    steps = np.linalg.norm(np.diff(est[:, :3, 3], axis=0), axis=1) / np.linalg.norm(np.diff(true[:, :3, 3], axis=0),
                                                                                     axis=1)
    assert np.all(np.abs(steps - 1) <= 0.05) and np.allclose(est[:, 1, 3], true[:, 1, 3], atol=0.05), steps


def test_video_frames_are_sampled_at_the_rate_and_named_by_time(tmp_path):
    import imageio_ffmpeg

    path = tmp_path / "capture.mp4"
    writer = imageio_ffmpeg.write_frames(str(path), (256, 128), fps=4, macro_block_size=1)
    writer.send(None)
    rng = np.random.default_rng(0)
    shots = [np.repeat(np.repeat(rng.integers(0, 255, (16, 32, 3), np.uint8), 8, 0), 8, 1) for _ in range(8)]
    for shot in shots:
        writer.send(np.ascontiguousarray(shot))
    writer.close()
    frames = list(video_frames(str(path), 64, fps=2))
    assert [uri.rsplit("#t=", 1)[1] for uri, _ in frames] == ["0.000", "0.500", "1.000", "1.500"]
    assert all(uri.startswith(str(path)) and rgb.shape == (64, 128, 3) for uri, rgb in frames)
    kept = select_frames(iter(frames), 100)
    assert kept.read == 4 and len(kept.images) == 4


def test_floor_scale_and_gravity_of_a_tilted_scaled_reconstruction(walk):
    """metric_poses undoes an arbitrary rotation, scale and shift of the true world, from poses and floor points."""
    true, _ = walk
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    s, t = 0.37, np.array([3.0, -1.0, 2.0])
    floor = np.c_[rng.uniform(-3, 3, 400), np.zeros(400), rng.uniform(-3, 3, 400)]
    table = np.c_[rng.uniform(-1, 1, 100), np.full(100, -0.75), rng.uniform(-1, 1, 100)]
    points = s * np.r_[floor, table] @ q.T + t
    poses = np.tile(np.eye(4), (len(true), 1, 1))
    poses[:, :3, :3] = q @ true[:, :3, :3]
    poses[:, :3, 3] = s * true[:, :3, 3] @ q.T + t
    est, scale = metric_poses(poses, points, camera_height=-true[0, 1, 3])
    assert scale == pytest.approx(1 / s, rel=0.01)
    assert np.allclose(est[:, 1, :3], true[:, 1, :3], atol=1e-6)  # gravity exact in every camera
    assert np.allclose(est[:, 1, 3], true[:, 1, 3], atol=0.01)


def test_unlevelled_panoramas_are_refused(walk):
    true, _ = walk
    tilted = true.copy()
    for i in range(1, len(tilted), 2):
        c, s = np.cos(0.3), np.sin(0.3)
        tilted[i, :3, :3] = tilted[i, :3, :3] @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    with pytest.raises(ValueError, match="not levelled"):
        metric_poses(tilted, np.zeros((0, 3)), 1.5)


@pytest.mark.parametrize(("extra", "field"), [
    (["--camera-height", "nan"], "camera_height"), (["--camera-height", "7"], "camera_height"),
    (["--scale", "-1"], "scale"), (["--spacing", "0"], "spacing"), (["--fps", "0"], "fps"),
    (["--size", "33x65"], "size"), (["--sfm-size", "512x512"], "sfm_size"), (["--frames", "1"], "frames"),
])
def test_bad_capture_options_are_refused_naming_the_field(captures, caption_models, tmp_path, extra, field):
    code, text = capture(str(captures / "walk"), "--out", str(tmp_path / "ds"), "--captioner", caption_models[0],
                         "--summariser", caption_models[1], *extra)
    assert code == 2 and field in text, text
    assert not (tmp_path / "ds").exists()


def test_captures_without_captioning_models_are_refused_pointing_at_caption(captures, tmp_path):
    code, text = capture(str(captures / "walk"), "--out", str(tmp_path / "ds"))
    assert code == 2 and "--captioner" in text and "--summariser" in text and "--caption TEXT" in text, text
    assert not (tmp_path / "ds").exists()


def test_a_fixed_caption_and_a_captioner_together_are_refused(captures, caption_models, tmp_path):
    code, text = capture(str(captures / "walk"), "--out", str(tmp_path / "ds"), "--caption", "a hallway",
                         "--captioner", caption_models[0], "--summariser", caption_models[1])
    assert code == 2 and "caption: give --caption TEXT or --captioner and --summariser, not both" in text, text
    assert not (tmp_path / "ds").exists()


def test_a_caption_the_stack_left_empty_is_refused_naming_the_keyframe():
    from diffpano.data.captures.build import non_empty

    assert non_empty([" a hall ", "a room"], "walk-0000") == ["a hall", "a room"]
    with pytest.raises(ValueError, match="keyframe 1 of walk-0000 an empty caption.*--caption TEXT"):
        non_empty(["a hall", "  ", "a room"], "walk-0000")


@pytest.mark.slow
def test_a_capture_captioned_with_one_text_needs_no_captioning_models(ray_local, captures, tmp_path):
    code, text = capture(str(captures / "walk"), "--out", str(tmp_path / "ds"), "--frames", "6", "--spacing", "0.4",
                         "--size", "128x256", "--sfm-size", "512x1024", "--camera-height", "1.5",
                         "--caption", "a narrow hallway with white walls")
    assert code == 0, text
    captions = read_dataset(str(tmp_path / "ds")).to_pandas().caption
    assert len(captions) >= 6 and set(captions) == {"a narrow hallway with white walls"}
