"""Offline checks of cluster/: the launcher YAML against Ray's schema, the Serve configs against Serve's schemas, the
KubeRay manifests' required fields and entrypoints, the generated serveConfigV2, and the Dockerfile's pins."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import typer
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from cluster import render
from diffpano.cli import build_app
from trainer.config import load_config

app = build_app()

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
AWS = CLUSTER / "aws" / "cluster.yaml"
K8S = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CLUSTER / "k8s").glob("*.yaml"))}
IMAGE_DIR = "/home/ray/diffpano"  # where the Dockerfile puts the repository


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_specs() -> dict[str, dict]:
    """The RayCluster spec of each manifest (a RayCluster's own, a RayJob's rayClusterSpec, a RayService's)."""
    keys = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    return {name: (m["spec"] if keys[m["kind"]] is None else m["spec"][keys[m["kind"]]]) for name, m in K8S.items()}


def containers(spec: dict) -> list[dict]:
    """Every container of a RayCluster spec: the head's and each worker group's."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_launcher_yaml_validates_against_the_schema_in_the_ray_wheel():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load(AWS)
    jsonschema.validate(config, schema)
    validate_config(prepare_config(load(AWS)))  # Ray's own checks after its AWS defaults are filled in
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_wrokers": 2}, schema)  # the schema does catch a misspelt key


def test_the_launcher_has_a_cpu_head_and_autoscaling_gpu_workers_with_spot_and_iam_profiles():
    config = load(AWS)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # CPU instance families
    assert "--num-gpus=0" in " ".join(config["head_start_ray_commands"])
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU families
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in workers)
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert not any("AWS_SECRET" in line for line in AWS.read_text().splitlines())


@pytest.mark.parametrize("path", [ROOT / "serve" / "config.yaml", CLUSTER / "serve" / "diffpano.yaml"])
def test_serve_configs_validate_with_no_unknown_or_deprecated_keys(path):
    config = load(path)
    ServeDeploySchema.model_validate(config)
    allowed, scaling = set(DeploymentSchema.model_fields), AutoscalingConfig.model_fields
    for application in config["applications"]:
        for deployment in application["deployments"]:
            assert set(deployment) <= allowed, set(deployment) - allowed
            block = deployment.get("autoscaling_config")
            if block:
                AutoscalingConfig.model_validate(block)
                assert set(block) <= set(scaling), set(block) - set(scaling)
                assert not [k for k in block if scaling[k].deprecated], "deprecated autoscaling keys"


def test_the_cluster_serve_config_and_the_rayservice_are_generated_from_the_repository_config():
    config = render.cluster_serve_config()
    assert render.CLUSTER_SERVE_CONFIG.read_text() == render.serve_config_text(config), "run: python -m cluster.render"
    rayservice = render.RAYSERVICE.read_text()
    assert render.with_serve_config(rayservice, config) == rayservice, "run: python -m cluster.render"
    assert yaml.safe_load(K8S["rayservice"]["spec"]["serveConfigV2"]) == config
    local = load(ROOT / "serve" / "config.yaml")
    assert config["applications"][0]["import_path"] == local["applications"][0]["import_path"]
    assert config["http_options"]["host"] == "0.0.0.0"  # the cluster's proxies answer the Service, not loopback


def test_render_merges_by_name_and_refuses_unknown_names():
    base = {"a": 1, "apps": [{"name": "x", "v": 1, "d": {"k": 1}}, {"name": "y", "v": 2}]}
    assert render.merge(base, {"apps": {"x": {"d": {"j": 2}}}}) == {
        "a": 1, "apps": [{"name": "x", "v": 1, "d": {"k": 1, "j": 2}}, {"name": "y", "v": 2}]}
    with pytest.raises(KeyError, match="'z'"):
        render.merge(base, {"apps": {"z": {}}})


def test_kuberay_manifests_have_the_fields_kuberay_requires():
    kinds = {name: m["kind"] for name, m in K8S.items()}
    assert kinds == {"raycluster": "RayCluster", "rayjob-bulk": "RayJob", "rayjob-train": "RayJob",
                     "rayservice": "RayService"}
    for name, manifest in K8S.items():
        assert manifest["apiVersion"] == "ray.io/v1" and manifest["metadata"]["name"], name
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, name
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}, name
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and group["template"]["spec"]["containers"], name
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            assert int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for name in ("raycluster", "rayjob-bulk", "rayservice"):
        assert cluster_specs()[name]["enableInTreeAutoscaling"] is True, name
        assert any(g["minReplicas"] < g["maxReplicas"] for g in cluster_specs()[name]["workerGroupSpecs"]), name
    assert "serveConfigV2" in K8S["rayservice"]["spec"]


def test_every_node_runs_one_image_pinned_to_the_projects_ray_version():
    images = {load(AWS)["docker"]["image"]}
    images |= {c["image"] for spec in cluster_specs().values() for c in containers(spec)}
    assert len(images) == 1, images
    assert images.pop().endswith(f"-ray{ray.__version__}")
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}" in dockerfile and "FROM rayproject/ray:${RAY_VERSION}-" in dockerfile
    assert re.search(r'ray\[serve,train\]==' + re.escape(ray.__version__), (ROOT / "pyproject.toml").read_text())
    assert f"WORKDIR {IMAGE_DIR}" in dockerfile and "pip install" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "outputs", ".git"} <= set(ignored)


def parse_entrypoint(manifest: dict) -> tuple[str, typer.Context]:
    """The RayJob's `diffpano ...` entrypoint parsed by the real CLI (options checked, nothing run)."""
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] == "diffpano"
    command = typer.main.get_command(app)
    ctx = command.make_context("diffpano", argv[1:], resilient_parsing=False)
    sub = command.get_command(ctx, argv[1])
    return argv[1], sub.make_context(argv[1], argv[2:], parent=ctx)


def test_the_training_rayjob_runs_a_valid_config_with_s3_storage_and_retries_that_resume():
    kind, ctx = parse_entrypoint(K8S["rayjob-train"])
    assert kind == "train" and ctx.params["stages"] == "all"
    assert ctx.params["storage_root"].startswith("s3://") and ctx.params["name"]  # a retry resumes the named run
    config = Path(ctx.params["config"].replace(IMAGE_DIR, str(ROOT)))
    cfg = load_config(config, ctx.params["overrides"])
    assert cfg.model.base.startswith("s3://") and cfg.data.dataset.startswith("s3://")
    gpus = K8S["rayjob-train"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == int(
        gpus["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * gpus["replicas"]
    spec = K8S["rayjob-train"]["spec"]
    assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True


def test_the_bulk_rayjob_reads_and_writes_s3_with_one_gpu_per_replica():
    kind, ctx = parse_entrypoint(K8S["rayjob-bulk"])
    assert kind == "bulk"
    assert ctx.params["specs"].startswith("s3://") and ctx.params["out"].startswith("s3://")
    assert ctx.params["gpus"] == 1
    group = K8S["rayjob-bulk"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["maxReplicas"] >= ctx.params["replicas"]
