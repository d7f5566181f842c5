"""Shared fixtures: a real S3 endpoint on 127.0.0.1 (moto's server mode) and tiny models built in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A test using one of these fixtures gets the marker, so `make test-unit` (-m "not ray and not serve and not s3")
# runs the fast tests without Ray, Serve or S3; modules that start Ray otherwise declare `pytestmark`.
FIXTURE_MARKERS = {"ray_local": "ray", "server": "serve", "s3_server": "s3", "s3_endpoint": "s3"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real parts their fixtures start."""
    for item in items:
        for name in FIXTURE_MARKERS.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(FIXTURE_MARKERS[name])


def _ray_running() -> bool:
    """Whether this process has started or joined Ray."""
    ray = sys.modules.get("ray")
    return bool(ray and ray.is_initialized())


@pytest.fixture(autouse=True)
def _ray_tests_are_marked(request):
    """Fail a test that starts Ray without the `ray` marker (it would run in `make test-unit`)."""
    before = _ray_running()
    yield
    if not before and _ray_running() and not request.node.get_closest_marker("ray"):
        pytest.fail("this test started Ray: mark it with pytest.mark.ray")


class S3Server:
    """The moto server of the session, which a test may stop and start again on the same port (data is kept)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self.server.start()


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """The S3 server itself (see s3_endpoint)."""
    return S3Server()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    """An S3 HTTP server on 127.0.0.1 with bucket 'diffpano-test'; AWS_* variables point at it."""
    import boto3

    server = s3_server
    host, port = server.host, server.port
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="diffpano-test")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _tiny(latent: bool):
    """A tiny random model whose EA modules are switched on (non-zero output projections)."""
    from diffpano.pipelines.factory import build_tiny_pipeline

    pipe = build_tiny_pipeline(latent=latent, seed=0)
    torch.manual_seed(1)
    for block in pipe.epipolar.blocks.values():
        torch.nn.init.normal_(block.to_out.weight, std=0.2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe():
    """Pixel-space tiny multi-view model."""
    return _tiny(latent=False)


@pytest.fixture(scope="session")
def tiny_latent_pipe():
    """Latent-space (VAE) tiny multi-view model."""
    return _tiny(latent=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipe, tmp_path_factory):
    """The pixel-space tiny model saved as a model directory."""
    from diffpano.pipelines.loading import save_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(tiny_pipe, str(path))
    return path


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> str:
    """Two scenes x two clips x four keyframes at 32x64 for training runs, committed without Ray."""
    from diffpano.data.manifest import commit_clips
    from diffpano.data.procedural.build import ProceduralSpec, render_clips

    root = str(tmp_path_factory.mktemp("trainds") / "ds")
    spec = ProceduralSpec(scenes=2, clips_per_scene=2, frames=4, height=32, width=64, seed=7)
    for s in range(2):
        commit_clips(root, render_clips(spec, s, [0, 1]))
    return root


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster on 127.0.0.1 for the session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def lora_root(tiny_model_dir, train_dataset, tmp_path_factory) -> Path:
    """Two stage-1 LoRAs of the tiny model, trained here for 3 steps each at different rates, as a LoRA root:
    ROOT/warm and ROOT/cool (each RUN/lora of its run)."""
    import shutil

    from trainer.config import load_config
    from trainer.run import train

    runs, root = tmp_path_factory.mktemp("lora-runs"), tmp_path_factory.mktemp("loras")
    for name, lr in (("warm", "0.05"), ("cool", "0.02")):
        cfg = load_config("trainer/configs/tiny.yaml", [
            f"data.dataset={train_dataset}", f"model.base={tiny_model_dir}", "stage1.steps=3", "stage1.lora_rank=4",
            "stage1.lora_alpha=8", f"stage1.lr={lr}", "stage2.steps=0", "scaling.num_workers=0",
            "run.checkpoint_every=100"])
        train(cfg, [1], name, str(runs), local_device="cpu")
        shutil.copytree(runs / name / "lora", root / name)
    return root


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, lora_root, tmp_path_factory):
    """The HTTP app on Serve (127.0.0.1) with the tiny model, an API key, two ingress replicas (as serve/config.yaml)
    and one model replica queueing at most 4; jobs beat every 0.2 s and are taken over after 2 s of silence; job
    webhooks may call 127.0.0.1, signed with WEBHOOK_SECRET; METERED_KEY may generate METERED_QUOTA images a
    minute; requests may name the LoRAs of lora_root, one held by the model replica at a time, and the meshes under
    ROOT/meshes (rooms.glb)."""
    from helpers import KEY, METERED_KEY, METERED_QUOTA, WEBHOOK_SECRET, free_port
    from mesh_rooms import write_glb
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("served")
    meshes = root / "meshes"
    meshes.mkdir()
    write_glb(meshes / "rooms.glb")
    key_file = root / "key"
    key_file.write_text(f"{KEY}\nmetered {METERED_KEY}\n")  # the default key, and one with a quota
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    args = {"model": str(tiny_model_dir), "output_root": str(root / "out"), "api_key_file": str(key_file),
            "max_body_bytes": 8192, "max_height": 64, "max_batch_views": 8, "batch_wait_timeout_s": 0.3,
            "job_concurrency": 2, "job_heartbeat_s": 0.2, "job_lease_s": 2.0, "webhook_secret": WEBHOOK_SECRET,
            "webhook_allow": ["127.0.0.1"], "quotas": {"metered": METERED_QUOTA}, "lora_root": str(lora_root),
            "max_loras_per_replica": 1, "mesh_roots": [str(meshes)]}
    deployments = [
        {"name": "DiffPanoAPI", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0}},
        {"name": "PanoGenerator", "ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 8,
         "max_queued_requests": 4, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
    ]
    serve.run(build_app(args, deployments), name="diffpano", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}", root / "out"
    serve.shutdown()
