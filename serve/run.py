"""Start the Serve application from its config YAML on a local (or RAY_ADDRESS) cluster."""

from __future__ import annotations

from importlib import resources

import yaml
from ray.serve.schema import ServeDeploySchema

from fanout.cluster import join_ray


def default_config() -> str:
    """The config YAML shipped with the package."""
    return str(resources.files("serve").joinpath("config.yaml"))


def load_config(path: str | None, overrides: dict | None = None) -> ServeDeploySchema:
    """The Serve config, validated; `overrides` replace application args (model, output_root, ...)."""
    with open(path or default_config()) as f:
        tree = yaml.safe_load(f)
    for app in tree.get("applications", []):
        app.setdefault("args", {}).update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ServeDeploySchema.model_validate(tree)


def start(path: str | None = None, host: str | None = None, port: int | None = None,
          overrides: dict | None = None) -> str:
    """Start Ray (if needed), Serve's proxy and the application; returns the endpoint's base URL. ValueError before
    anything starts when an application's model cannot sample as configured."""
    from ray import serve

    from diffpano.pipelines.loading import check_model
    from serve.app import build_app

    config = load_config(path, overrides)
    for app in config.applications:
        check_model(app.args.get("model"), own_scheduler=app.args.get("default_scheduler") is None)
    http = config.http_options.model_dump(exclude_unset=True)
    http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    join_ray(log_to_driver=True)
    serve.start(http_options=http)
    for app in config.applications:
        deployments = [d.model_dump(exclude_unset=True) for d in app.deployments]
        serve.run(build_app(app.args, deployments), name=app.name, route_prefix=app.route_prefix, blocking=False)
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
