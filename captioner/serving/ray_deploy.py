"""Deploying the caption application on a Ray cluster, and switching its model (no torch here).

The application is deployed *declaratively* (an import path and JSON arguments, as ``serve deploy``
does): the cluster builds it from :func:`build_app`, so the process that deploys it (the
``serve`` command) or reloads it (a bot) never imports torch, and a change of the captioner's
``user_config`` alone is a lightweight update: Serve calls ``reconfigure`` on the running
replicas instead of replacing them. Other declaratively deployed applications on the cluster are
kept as they are.

Serve's Python API for declarative configs is its controller client (what the dashboard's REST
API calls); it is used through the few functions below only.
"""

from __future__ import annotations

import time
from typing import Any

from .ray_spec import (
    APP_NAME,
    BOARD_NAMESPACE,
    BUILDER,
    CAPTIONER,
    INGRESS,
    ModelChoice,
    RaySpec,
    ReplicaModel,
    board_name,
)


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder (runs on the cluster, imports torch through ray_app)."""
    spec = RaySpec.from_args(dict(args["spec"]))
    app_name = str(args.get("app_name", APP_NAME))
    from .ray_app import CaptionerDeployment

    captioner = CaptionerDeployment.options(  # type: ignore[attr-defined]
        **spec.deployment_options(), user_config=ModelChoice().to_user_config()).bind(spec.to_args(), app_name)
    if not spec.http:
        return captioner
    from .ray_ingress import http_ingress

    return http_ingress().bind(captioner, spec.to_args())


def app_config(spec: RaySpec, model: ModelChoice, app_name: str = APP_NAME) -> dict[str, Any]:
    """One application of a Serve deploy config (``serve deploy`` YAML has the same shape)."""
    return {
        "name": app_name,
        "route_prefix": "/" if spec.http else None,
        "import_path": BUILDER,
        "args": {"spec": spec.to_args(), "app_name": app_name},
        "deployments": [{"name": CAPTIONER, "user_config": model.to_user_config()}],
    }


def serve_client(http_host: str = "127.0.0.1", http_port: int = 8000) -> Any:
    """Serve's controller client on the connected cluster (starting Serve if it is not running)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": http_host, "port": http_port})
        client = _get_global_client()
    return client


def _declared_apps(client: Any) -> dict[str, dict[str, Any]]:
    details = client.get_serve_details()
    return {name: app["deployed_app_config"] for name, app in (details.get("applications") or {}).items()
            if app.get("deployed_app_config")}


def _apply(client: Any, apps: dict[str, dict[str, Any]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))


def deploy(client: Any, spec: RaySpec, model: ModelChoice, app_name: str = APP_NAME,
           timeout: float = 600.0) -> None:
    """Deploy (or redeploy) the application and wait until it runs; raises RuntimeError if it fails."""
    apps = _declared_apps(client)
    apps[app_name] = app_config(spec, model, app_name)
    _apply(client, apps)
    wait_running(client, app_name, timeout)


def wait_running(client: Any, app_name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        app = (client.get_serve_details().get("applications") or {}).get(app_name)
        status = app.get("status") if app else None
        if status == "RUNNING":
            return
        if app and status == "DEPLOY_FAILED":
            raise RuntimeError(f"the Serve application {app_name} failed to deploy: {app.get('message')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Serve application {app_name} is not running after {timeout:g} s "
                               f"(status {status}); see `serve status`")
        time.sleep(0.5)


def current_model(client: Any, app_name: str = APP_NAME) -> ModelChoice:
    """The captioner's user_config as deployed; RuntimeError if the application is not deployed."""
    config = _declared_apps(client).get(app_name)
    if config is None:
        raise RuntimeError(f"no Serve application named {app_name!r} on this cluster; deploy it with "
                           "`python -m captioner serve`")
    for deployment in config.get("deployments") or []:
        if deployment.get("name") == CAPTIONER:
            return ModelChoice.from_user_config(deployment.get("user_config"))
    return ModelChoice()


def set_model(client: Any, spec: RaySpec, model: ModelChoice, app_name: str = APP_NAME) -> None:
    """Change only the captioner's user_config: every replica reconfigures in place.

    The application's config is rebuilt from ``spec`` exactly as :func:`deploy` built it (not
    read back from Serve, which fills in defaults): the same import path and arguments are the
    same code version, which is what makes Serve reconfigure replicas instead of replacing them.
    """
    apps = _declared_apps(client)
    if app_name not in apps:
        raise RuntimeError(f"no Serve application named {app_name!r} on this cluster")
    apps[app_name] = app_config(spec, model, app_name)
    _apply(client, apps)


def _captioner_details(client: Any, app_name: str) -> dict[str, Any]:
    app = (client.get_serve_details().get("applications") or {}).get(app_name) or {}
    return dict((app.get("deployments") or {}).get(CAPTIONER) or {})


def running_replicas(client: Any, app_name: str = APP_NAME) -> list[str]:
    """Ids of the captioner's replicas that are up now."""
    replicas = _captioner_details(client, app_name).get("replicas") or []
    return [r["replica_id"] for r in replicas if r.get("state") == "RUNNING"]


def replica_actor_names(client: Any, app_name: str = APP_NAME) -> list[str]:
    """Actor names of the captioner's running replicas (namespace ``serve``), e.g. to kill one."""
    replicas = _captioner_details(client, app_name).get("replicas") or []
    return [r["actor_name"] for r in replicas if r.get("state") == "RUNNING"]


def board_entries(app_name: str = APP_NAME) -> dict[str, ReplicaModel]:
    """What each replica last reported (empty before any replica has loaded a model)."""
    import ray

    try:
        board = ray.get_actor(board_name(app_name), namespace=BOARD_NAMESPACE)
    except ValueError:
        return {}
    return dict(ray.get(board.entries.remote(), timeout=30))


def wait_for_generation(client: Any, generation: int, app_name: str = APP_NAME,
                        timeout: float = 600.0) -> dict[str, ReplicaModel]:
    """Wait until every running replica has reported on ``generation``; its reports, by replica.

    Raises TimeoutError naming the replicas that did not report in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        details = _captioner_details(client, app_name)
        settled = details.get("status") == "HEALTHY"  # not while Serve is still applying the config
        replicas = [r["replica_id"] for r in details.get("replicas") or [] if r.get("state") == "RUNNING"]
        entries = board_entries(app_name)
        done = {r: entries[r] for r in replicas if r in entries and entries[r].generation >= generation}
        if settled and replicas and len(done) == len(replicas):
            return done
        if time.monotonic() > deadline:
            missing = sorted(set(replicas) - set(done))
            raise TimeoutError(f"replicas {missing} did not report on model generation {generation} "
                               f"within {timeout:g} s")
        time.sleep(0.2)


__all__ = ["APP_NAME", "INGRESS", "board_entries", "build_app", "current_model", "deploy", "replica_actor_names",
           "running_replicas", "serve_client", "set_model", "wait_for_generation"]
