"""Frozen-encoder caches on a local Ray cluster: equal to direct encoding, reused, keyed by encoder, rebuilt, S3."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import ray
import torch

from diffpano.data.loaders import resize_rgb
from diffpano.data.manifest import commit_clips, read_dataset
from diffpano.data.procedural.build import ProceduralSpec, render_clips
from diffpano.io import storage
from diffpano.io.manifest import decode_rgb
from diffpano.models.text import encode_prompts
from diffpano.pipelines.loading import load_model, save_model
from trainer.cache import (
    MARKER,
    build_latent_cache,
    build_text_cache,
    latent_cache_uri,
    load_latent_cache,
    load_text_cache,
    read_marker,
    text_cache_uri,
)

F16 = dict(rtol=2e-3, atol=2e-3)


pytestmark = pytest.mark.ray  # bulk jobs, dataset builds and training run on Ray here


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3_endpoint) -> str:
    """A 2-clip x 2-keyframe dataset of 16x32 panoramas (S3 is up first: every job then shares one worker env)."""
    root = str(tmp_path_factory.mktemp("cache-ds") / "ds")
    spec = ProceduralSpec(scenes=1, clips_per_scene=2, frames=2, height=16, width=32)
    commit_clips(root, render_clips(spec, 0, [0, 1]))
    return root


@pytest.fixture(scope="module")
def latent_model_dir(tiny_latent_pipe, tmp_path_factory) -> str:
    """The latent-space tiny model saved as a model directory."""
    path = str(tmp_path_factory.mktemp("models") / "tiny-latent")
    save_model(tiny_latent_pipe, path)
    return path


@pytest.fixture(scope="module")
def text_cache(ray_local, dataset, tiny_model_dir) -> str:
    """The pixel-space tiny model's text cache of the dataset, built once for the module."""
    return build_text_cache(dataset, str(tiny_model_dir), batch_size=2, progress=False)


@pytest.fixture(scope="module")
def latent_cache(ray_local, dataset, latent_model_dir) -> tuple[str, tuple[int, int]]:
    """The latent tiny model's latent cache of the dataset at 8x16 (area-averaged from 16x32), and that size."""
    size = (8, 16)
    return build_latent_cache(dataset, latent_model_dir, size, batch_size=3, progress=False), size


def captions_of(root: str) -> set[str]:
    return set(read_dataset(root, ["caption"]).column("caption").to_pylist())


def no_ray_job(*args, **kwargs):
    raise AssertionError("a complete cache must be reused without a Ray job")


def test_text_cache_equals_direct_encoding_and_is_reused(text_cache, dataset, tiny_model_dir, monkeypatch):
    uri = text_cache
    assert uri == text_cache_uri(dataset, str(tiny_model_dir))
    assert uri.startswith(f"{dataset}/cache/text-")
    cache = load_text_cache(uri)
    assert set(cache) == captions_of(dataset) | {""}
    pipe = load_model(tiny_model_dir, "cpu", torch.float32)
    prompts = sorted(cache)
    direct = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts).numpy()
    for prompt, expected in zip(prompts, direct, strict=True):
        assert cache[prompt].dtype == np.float32 and cache[prompt].shape == expected.shape
        np.testing.assert_allclose(cache[prompt], expected, **F16)
    marker = read_marker(uri)
    assert marker["count"] == len(cache) and marker["parts"]

    monkeypatch.setattr(ray.data, "from_items", no_ray_job)
    assert build_text_cache(dataset, str(tiny_model_dir), progress=False) == uri
    assert read_marker(uri)["created_at"] == marker["created_at"]


def test_cache_uri_follows_the_text_encoder_not_the_save_location(dataset, tmp_path):
    from diffpano.pipelines.factory import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=3)
    first, same = str(tmp_path / "first"), str(tmp_path / "same")
    save_model(pipe, first)
    with torch.no_grad():
        next(iter(pipe.unet.parameters())).view(-1)[0] += 0.01  # not the text encoder: same cache
        encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red room"])  # leaves call state in tokenizer.json
    save_model(pipe, same)
    assert text_cache_uri(dataset, same) == text_cache_uri(dataset, first)
    with torch.no_grad():
        next(iter(pipe.text_encoder.parameters())).view(-1)[0] += 0.01
    save_model(pipe, str(tmp_path / "changed"))
    assert text_cache_uri(dataset, str(tmp_path / "changed")) != text_cache_uri(dataset, same)


def test_partial_or_outgrown_cache_is_rebuilt(text_cache, dataset, tiny_model_dir, tmp_path):
    root = str(tmp_path / "ds")
    storage.copy_tree(dataset, root)  # the dataset and its complete cache
    uri = text_cache_uri(root, str(tiny_model_dir))
    assert set(load_text_cache(uri)) == captions_of(root) | {""}
    storage.write_bytes(storage.join(uri, "part-00042.parquet"), b"stale part of a crashed attempt")
    fs, marker = storage.resolve(storage.join(uri, MARKER))
    fs.delete_file(marker)
    with pytest.raises(ValueError, match=uri):
        load_text_cache(uri)

    # A new clip arrives too: the rebuilt cache must hold its captions.
    spec = ProceduralSpec(scenes=1, clips_per_scene=3, frames=2, height=16, width=32)
    commit_clips(root, render_clips(spec, 0, [2]))
    assert build_text_cache(root, str(tiny_model_dir), progress=False) == uri
    assert not storage.exists(storage.join(uri, "part-00042.parquet"))
    assert set(load_text_cache(uri)) == captions_of(root) | {""}
    assert read_marker(uri)["count"] == len(captions_of(root) | {""})


def test_latent_cache_equals_vae_encoding(latent_cache, dataset, latent_model_dir, tiny_model_dir):
    uri, size = latent_cache
    assert uri == latent_cache_uri(dataset, latent_model_dir, size)
    cache = load_latent_cache(uri)
    rows = read_dataset(dataset, ["clip_id", "frame_index", "rgb_uri"]).to_pylist()
    assert set(cache) == {(r["clip_id"], r["frame_index"]) for r in rows}
    pipe = load_model(latent_model_dir, "cpu", torch.float32)
    images = np.stack([resize_rgb(decode_rgb(storage.read_bytes(f"{dataset}/{r['rgb_uri']}")), size) for r in rows])
    with torch.no_grad():
        expected = pipe._encode_images(torch.from_numpy(images)).numpy()
    assert expected.shape[-2:] == (4, 8)
    for row, latent in zip(rows, expected, strict=True):
        np.testing.assert_allclose(cache[row["clip_id"], row["frame_index"]], latent, **F16)
    assert latent_cache_uri(dataset, latent_model_dir, (16, 32)) != uri

    assert build_latent_cache(dataset, str(tiny_model_dir), size, progress=False) is None
    with pytest.raises(ValueError, match="pixel-space"):
        latent_cache_uri(dataset, str(tiny_model_dir), size)
    with pytest.raises(ValueError, match="multiples of 2"):
        latent_cache_uri(dataset, latent_model_dir, (9, 16))


def test_caches_of_a_dataset_on_s3(
    text_cache, latent_cache, s3_endpoint, dataset, tiny_model_dir, latent_model_dir, monkeypatch
):
    root = "s3://diffpano-test/cache/ds"
    for folder in ("manifest", "rgb"):  # not the local latent cache: it must be built on S3
        storage.copy_tree(f"{dataset}/{folder}", f"{root}/{folder}")
    assert not storage.list_files(f"{root}/cache")
    local_uri, size = latent_cache
    uri = build_latent_cache(root, latent_model_dir, size, progress=False)
    assert uri.startswith(f"{root}/cache/latent-8x16-")
    marker = json.loads(storage.read_bytes(storage.join(uri, MARKER)))
    assert marker["count"] == 4 and all(storage.exists(storage.join(uri, part)) for part in marker["parts"])
    local, remote = load_latent_cache(local_uri), load_latent_cache(uri)
    assert set(remote) == set(local)
    for key, latent in remote.items():  # other batch sizes: equal up to float16 rounding
        np.testing.assert_allclose(latent, local[key], **F16)

    # A dataset copied with its caches keeps them: the text cache is reused on S3 without a Ray job.
    storage.copy_tree(text_cache, f"{root}/cache/{text_cache.rsplit('/', 1)[1]}")
    monkeypatch.setattr(ray.data, "from_items", no_ray_job)
    uri = build_text_cache(root, str(tiny_model_dir), progress=False)
    assert uri == f"{root}/cache/{text_cache.rsplit('/', 1)[1]}"
    assert set(load_text_cache(uri)) == captions_of(dataset) | {""}


def test_caches_encoded_in_process_equal_the_ray_built_ones(text_cache, latent_cache, dataset, tiny_model_dir,
                                                             latent_model_dir, tmp_path, monkeypatch):
    root = str(tmp_path / "ds")
    storage.copy_tree(dataset, root)
    shutil.rmtree(tmp_path / "ds" / "cache")  # the copy starts with no cache at all
    monkeypatch.setattr(ray.data, "from_items", no_ray_job)
    uri, size = latent_cache
    text = build_text_cache(root, str(tiny_model_dir), num_actors=0, batch_size=2, progress=False)
    latent = build_latent_cache(root, latent_model_dir, size, num_actors=0, batch_size=3, progress=False)
    assert read_marker(text)["count"] == len(captions_of(root) | {""}) and len(read_marker(latent)["parts"]) == 1
    for ours, theirs in ((load_text_cache(text), load_text_cache(text_cache)),
                         (load_latent_cache(latent), load_latent_cache(uri))):
        assert set(ours) == set(theirs)
        for key, value in ours.items():
            np.testing.assert_allclose(value, theirs[key], **F16)  # batches group differently: last bits differ
