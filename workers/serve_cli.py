"""``seemly serve``: deploy the segmenter (``workers.serve:build_app``) on Ray Serve.

Local by default: starts Ray in this process (bound to 127.0.0.1), deploys, prints the URL and
serves until Ctrl-C. With ``SEEMLY_RAY_ADDRESS`` (or ``--address``) it deploys to that cluster and
returns (Serve applications outlive their deployer).

The deployment comes from a Serve config file (``--config infra/serve/segmenter.yaml``, the same
document KubeRay's RayService runs) or from flags; flags given with a config override it. The
deploy is a declarative Serve config either way (``deploy_apps``, what ``serve deploy`` does), so a
later deploy that only changes the live settings (``--promote``, ``--cache-mb``) reconfigures the
running replicas in place instead of replacing them.

    seemly serve                                   # local Ray, classic engine, http://127.0.0.1:8000/segment
    seemly serve --replicas 2 --num-cpus 0.5
    seemly serve --config infra/serve/segmenter.yaml --host 127.0.0.1
    seemly serve --promote classic-ft-3            # switch the promoted version, no restart
    seemly serve --status

Point the backend at it: ``SEEMLY_SEGMENTER_URL=http://127.0.0.1:8000/segment seemly backend``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from seemly.config import get_settings
from workers.serve import APP_NAME, ROUTE_PREFIX, SEGMENTER, AppArgs

log = logging.getLogger(__name__)

IMPORT_PATH = "workers.serve:build_app"


# --- configs ---------------------------------------------------------------------------------------
def base_config(host: str = "127.0.0.1", port: int = 8000) -> dict[str, Any]:
    """A minimal Serve config of the segmenter application (what ``seemly serve`` deploys by default)."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": ROUTE_PREFIX,
                "import_path": IMPORT_PATH,
                "args": {},
                "deployments": [],
            }
        ],
    }


def load_config(path: str | Path) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict) or not config.get("applications"):
        raise SystemExit(f"{path} is not a Serve config with applications")
    return config


def _app(config: dict[str, Any]) -> dict[str, Any]:
    for app in config["applications"]:
        if app.get("import_path") == IMPORT_PATH:
            return app
    raise SystemExit(f"the Serve config has no application with import_path {IMPORT_PATH}")


def _segmenter_entry(app: dict[str, Any]) -> dict[str, Any]:
    deployments = app.setdefault("deployments", [])
    for entry in deployments:
        if entry.get("name") == SEGMENTER:
            return entry
    entry = {"name": SEGMENTER}
    deployments.append(entry)
    return entry


def apply_overrides(
    config: dict[str, Any],
    *,
    app_args: dict[str, Any] | None = None,
    live: dict[str, Any] | None = None,
    replicas: int | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    host: str | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """``config`` with flags applied: ``app_args`` into the app's ``args`` (a code change: new
    replicas), ``live`` into the Segmenter's ``user_config`` (in place), sizing into the Segmenter
    deployment, host/port into ``http_options``."""
    config = json.loads(json.dumps(config))  # a deep copy
    app = _app(config)
    if app_args:
        app["args"] = {**(app.get("args") or {}), **app_args}
    entry = _segmenter_entry(app)
    if live:
        # user_config replaces the code's whole live config: start from the args' one.
        current = entry.get("user_config") or AppArgs.model_validate(app.get("args") or {}).live().model_dump(
            mode="json"
        )
        entry["user_config"] = {**current, **live}
    if replicas is not None:  # the code's autoscaling default goes too (args), and the config's
        app["args"] = {**(app.get("args") or {}), "num_replicas": replicas}
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = replicas
    if num_cpus is not None or num_gpus is not None:
        actor = entry.setdefault("ray_actor_options", {})
        if num_cpus is not None:
            actor["num_cpus"] = num_cpus
        if num_gpus is not None:
            actor["num_gpus"] = num_gpus
    http = config.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    return config


# --- deploying ---------------------------------------------------------------------------------------
def deploy(config: dict[str, Any], *, wait_s: float = 180.0) -> None:
    """Apply a Serve config on the connected Ray cluster and wait until the application runs."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    wait_running([app.name for app in schema.applications], wait_s)


def wait_running(app_names: list[str], wait_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + wait_s
    while True:
        status = serve.status()
        states = {name: status.applications.get(name) for name in app_names}
        if all(s is not None and s.status == "RUNNING" for s in states.values()):
            return
        failed = {n: s.message for n, s in states.items() if s is not None and s.status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deploying failed: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {wait_s:g} s: {states}")
        time.sleep(0.5)


def deployed_config(app_name: str = APP_NAME) -> dict[str, Any]:
    """The Serve config the running cluster was given (for changing one setting of it)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = (details.get("applications") or {}).get(app_name)
    if not app or not app.get("deployed_app_config"):
        raise SystemExit(
            f"no Serve application {app_name!r} deployed from a config; deploy it with `seemly serve`"
        )
    return {
        "proxy_location": details.get("proxy_location") or "HeadOnly",
        "http_options": {
            k: v for k, v in (details.get("http_options") or {}).items() if k in ("host", "port")
        },
        "applications": [app["deployed_app_config"]],
    }


def promote(version: str | None, *, app_name: str = APP_NAME, wait_s: float = 120.0) -> dict[str, Any]:
    """Make ``version`` the promoted one on the running replicas (a live reconfigure, no restart);
    ``None`` promotes the base engine again."""
    from ray import serve

    if version is not None:
        known = serve.get_deployment_handle(SEGMENTER, app_name=app_name).info.remote().result(timeout_s=60)
        if version not in known["versions"]:
            raise SystemExit(f"unknown model version {version!r}; the service serves {known['versions']}")
    config = apply_overrides(deployed_config(app_name), live={"promoted": version})
    deploy(config, wait_s=wait_s)
    return config


def shutdown_app(app_name: str = APP_NAME) -> None:
    from ray import serve

    serve.delete(app_name)


# --- the command ------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> None:
    parser.add_argument("--config", type=Path, help="a Serve config file (e.g. infra/serve/segmenter.yaml)")
    parser.add_argument("--address", help="Ray cluster address (default: SEEMLY_RAY_ADDRESS, else local Ray)")
    parser.add_argument("--host", help="Serve HTTP host (default 127.0.0.1; the config's when --config)")
    parser.add_argument("--port", type=int, help="Serve HTTP port (default 8000)")
    parser.add_argument("--engine", help="base engine (default: SEEMLY_ENGINE)")
    parser.add_argument("--replicas", type=int, help="fixed Segmenter replicas (default: autoscaling 1..4)")
    parser.add_argument(
        "--num-cpus", type=float, help="CPUs per replica (default: SEEMLY_RAY_NUM_CPUS_PER_ACTOR)"
    )
    parser.add_argument(
        "--num-gpus", type=float, help="GPUs per replica (default: SEEMLY_RAY_NUM_GPUS_PER_ACTOR)"
    )
    parser.add_argument("--cache-mb", type=float, help="embedding cache per replica, MiB (default 1024)")
    parser.add_argument("--max-batch-size", type=int, help="embeds batched together (default 4)")
    parser.add_argument(
        "--versions", type=Path, help="YAML/JSON of more model versions: {name: {engine, options}}"
    )
    parser.add_argument("--promote", metavar="VERSION", help="switch the running service's promoted version")
    parser.add_argument("--status", action="store_true", help="show the running service and exit")
    parser.add_argument("--delete", action="store_true", help="delete the segmenter application and exit")


def _connect(address: str | None, local_ok: bool) -> bool:
    """Connect to Ray; ``True`` when this process started a local instance."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, namespace="serve", log_to_driver=False)
        return False
    if not local_ok:
        try:
            ray.init(address="auto", namespace="serve", log_to_driver=False)
            return False
        except ConnectionError as exc:
            raise SystemExit(
                "no running Ray cluster: set SEEMLY_RAY_ADDRESS, or start the service with `seemly serve`"
            ) from exc
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", namespace="serve", log_to_driver=True)
    return True


def run(args: argparse.Namespace, words: tuple[str, ...] = ()) -> int:
    settings = get_settings()
    address = args.address or settings.ray_address
    if args.promote or args.status or args.delete:
        _connect(address, local_ok=False)
        if args.delete:
            shutdown_app()
            print(f"deleted the {APP_NAME} application")
        elif args.promote:
            promote(args.promote)
            print(f"promoted {args.promote}: the running replicas serve it now (reconfigured in place)")
        else:
            from ray import serve

            status = serve.status().applications.get(APP_NAME)
            if status is None:
                print(f"no {APP_NAME} application on this Ray cluster; deploy it with `seemly serve`")
                return 1
            deployments = {name: d.status for name, d in status.deployments.items()}
            print(
                json.dumps({"status": status.status, "message": status.message, "deployments": deployments})
            )
            info = (
                serve.get_deployment_handle(SEGMENTER, app_name=APP_NAME).info.remote().result(timeout_s=30)
            )
            print(json.dumps({k: info[k] for k in ("promoted", "versions", "cache", "replica")}, default=str))
        return 0

    config = load_config(args.config) if args.config else base_config()
    app_args: dict[str, Any] = {}
    if args.engine:
        app_args["engine"] = args.engine
    live: dict[str, Any] = {}
    if args.cache_mb is not None:
        live["cache_mb"] = args.cache_mb
    if args.max_batch_size is not None:
        live["max_batch_size"] = args.max_batch_size
    if args.versions is not None:
        live["versions"] = yaml.safe_load(args.versions.read_text())
    host = args.host or (None if args.config else "127.0.0.1")
    config = apply_overrides(
        config,
        app_args=app_args,
        live=live,
        replicas=args.replicas,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        host=host,
        port=args.port,
    )
    started_local = _connect(address, local_ok=True)
    deploy(config)
    http = config.get("http_options") or {}
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{ROUTE_PREFIX}"
    url = url.replace("://0.0.0.0:", "://127.0.0.1:")
    print(f"the segmenter is running: {url}  (health: {url}/v1/health)")
    print(f"point the backend at it:  SEEMLY_SEGMENTER_URL={url} seemly backend")
    if not started_local:
        return 0
    print("serving on a local Ray instance; Ctrl-C stops it")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly on SIGTERM too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0
