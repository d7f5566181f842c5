"""The Serve application: the ingress in front of the model deployment (import path `serve.app:build_app`)."""

from __future__ import annotations

from ray.serve import Application

from diffpano.io import storage
from serve.deployment import PanoGenerator
from serve.ingress import DiffPanoAPI, ServerSettings


def build_app(args: dict | None = None, deployments: list[dict] | None = None) -> Application:
    """The application of `args` (ServerSettings).

    `deployments` (the config YAML's per-deployment options, by name) are applied here when the app is started
    from Python; `serve run`/`serve deploy` apply them themselves.
    """
    settings = ServerSettings.model_validate(args or {})
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments or []}
    for name in ("DiffPanoAPI", "PanoGenerator") if deployments is not None else ():
        # Replicas started from Python get this process's storage variables (S3 endpoint, keys), as jobs' workers do.
        actor = options.setdefault(name, {}).setdefault("ray_actor_options", {})
        actor.setdefault("runtime_env", {"env_vars": storage.worker_env()})
    generator = PanoGenerator.options(**options.get("PanoGenerator", {})).bind(
        settings.model, settings.device, settings.max_batch_views, settings.batch_wait_timeout_s, settings.compile,
        settings.default_scheduler, settings.storage_wait_s,
        storage.absolute(settings.lora_root) if settings.lora_root else None, settings.max_loras_per_replica)
    return DiffPanoAPI.options(**options.get("DiffPanoAPI", {})).bind(generator, settings.model_dump())
