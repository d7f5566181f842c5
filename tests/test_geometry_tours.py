"""Tours on a geometry you give: img2img strength in the pipeline (diffusers' convention, every sampler), and
`diffpano generate --mesh` on a textured two-room mesh: the tour starts from the mesh's renders at a walk over its
floor and keeps their depth; bad meshes and strengths are refused naming the option."""

from __future__ import annotations

import numpy as np
import pytest
from mesh_rooms import write_glb
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.data.meshes.mesh import load_mesh
from diffpano.data.meshes.raycast import MeshRenderer
from diffpano.geometry.trajectories import walk
from diffpano.io.manifest import read_manifest, read_tours

app = build_app()
SIZE = dict(height=16, width=32)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m", "euler", "heun"])
def test_strength_moves_a_tour_from_its_images_to_pure_generation(tiny_pipe, scheduler):
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 32, 3), dtype=np.uint8)
    run = dict(num_inference_steps=10, guidance_scale=3.0, seed=0, scheduler=scheduler, **SIZE)
    gaps, calls = [], []
    for strength in (0.0, 0.3, 0.6, 1.0):
        out = tiny_pipe("a room", walk(3), image=images, strength=strength, **run).images[0]
        gaps.append(float(np.abs(out.astype(int) - images).mean()))
        calls.append(tiny_pipe.num_timesteps)
    assert gaps[0] == 0 and gaps[0] < gaps[1] < gaps[2] < gaps[3], gaps  # 0: the images as they are
    assert calls[0] == 0 < calls[1] < calls[2] < calls[3], calls  # the noisiest steps are skipped
    with pytest.raises(ValueError, match=r"strength: must be a number in \[0, 1\]"):
        tiny_pipe("a room", walk(3), image=images, strength=1.5, **run)
    with pytest.raises(ValueError, match="image: expected uint8 images of shape"):
        tiny_pipe("a room", walk(3), image=images[:2], strength=0.5, **run)


@pytest.fixture(scope="module")
def glb(tmp_path_factory):
    return write_glb(tmp_path_factory.mktemp("mesh") / "rooms.glb")


def generate(*args: str):
    result = CliRunner().invoke(app, ["generate", "a cosy room", *args])
    return result.exit_code, result.output


def test_a_tour_on_a_mesh_starts_from_its_renders_and_keeps_their_depth(glb, tiny_model_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--views", "3", "--steps", "6", "--seed", "4", "--size", "16x32",
              "--mesh", str(glb)]
    code, text = generate(*common, "--strength", "0", "--out", str(tmp_path / "zero"))
    assert code == 0 and "rendered at 3 poses" in text, text
    [tour] = read_tours(str(tmp_path / "zero"))
    renderer = MeshRenderer(load_mesh(glb))
    views = [renderer.render(p, 16, 32) for p in tour.poses]
    assert np.array_equal(tour.images, np.stack([v.rgb for v in views]))  # strength 0: the renders themselves
    assert np.abs(tour.depths - np.stack([v.depth for v in views])).max() <= 0.0006  # millimetre PNGs
    assert np.all(tour.poses[:, 1, 3] < -1.0)  # at eye height over the floor (y down)
    assert read_manifest(str(tmp_path / "zero")).column("depth_uri").null_count == 0
    gaps = {}
    for strength in ("0.5", "1"):
        out = tmp_path / strength
        code, text = generate(*common, "--strength", strength, "--out", str(out))
        assert code == 0, text
        [made] = read_tours(str(out))
        assert np.allclose(made.poses, tour.poses)  # the same walk: drawn by the seed
        gaps[strength] = np.abs(made.images.astype(int) - tour.images).mean()
    assert 0 < gaps["0.5"] < gaps["1"], gaps


@pytest.mark.parametrize(("args", "message"), [
    (["--mesh", "GLB", "--strength", "1.5"], "--strength"),
    (["--mesh", "GLB", "--strength", "nan"], "--strength"),
    (["--mesh", "/nonexistent/rooms.glb"], "--mesh: there is no file"),
    (["--mesh", "BROKEN"], "--mesh broken.glb"),
    (["--mesh", "GLB", "--unit-scale", "0"], "--unit-scale"),
])
def test_bad_meshes_and_strengths_are_refused_naming_the_option(glb, tiny_model_dir, tmp_path, args, message):
    broken = tmp_path / "broken.glb"
    broken.write_bytes(b"glTF not really")
    args = [{"BROKEN": str(broken), "GLB": str(glb)}.get(a, a) for a in args]
    code, text = generate("--model", str(tiny_model_dir), "--steps", "2", "--size", "16x32", "--out",
                          str(tmp_path / "out"), *args)
    assert code == 2 and message in text, text
    code, text = generate("--model", str(tiny_model_dir), "--strength", "0.5", "--out", str(tmp_path / "out"))
    assert code == 2 and "only with --mesh" in text, text


def test_a_layout_tour_walks_a_house_the_prompt_describes(tiny_model_dir, tmp_path):
    from diffpano.data.procedural.scenes import generate_scene
    from diffpano.data.proxy import layout_proxy

    prompt = "A bedroom with blue walls and a dark wooden floor."
    result = CliRunner().invoke(app, ["generate", prompt, "--layout", "--strength", "0", "--model", str(tiny_model_dir),
                                      "--views", "3", "--steps", "4", "--seed", "2", "--size", "16x32", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0 and "room bedroom, walls blue, floor dark wood" in result.output, result.output
    [tour] = read_tours(str(tmp_path / "out"))
    proxy = layout_proxy(2, 16, 32, 3, 1.0, "bedroom", "blue", "dark wood")
    assert np.array_equal(tour.images, proxy.rgb) and np.allclose(tour.poses, proxy.poses)
    scene = generate_scene(2, "bedroom", "blue", "dark wood")
    assert {(r.kind, r.wall, r.floor) for r in scene.rooms} == {("bedroom", "blue", "dark wood")}
    plain = generate_scene(2)
    assert [(r.x0, r.z0) for r in plain.rooms] == [(r.x0, r.z0) for r in scene.rooms]  # the same plan, restyled
    for args, message in ((["--mesh", "x.glb"], "not both"), (["--trajectory", "orbit"], "--trajectory needs --mesh")):
        result = CliRunner().invoke(app, ["generate", prompt, "--layout", *args, "--model", str(tiny_model_dir)])
        assert result.exit_code == 2 and message in result.output, result.output
