"""The Serve config file of the promoted models: written by the ``calibrate`` stage, used by
``resops serve`` locally and by the RayService (``serveConfigV2``) on Kubernetes.

Its content is what ``serve build`` makes (``proxy_location``, ``http_options``, ``applications``
with each deployment's options, the ones the application builder gives them), with
``import_path: components.serve.app:app_builder`` and the builder's ``args``: model files,
versions, calibration, threshold, limits. It is validated with Ray's ``ServeDeploySchema`` when
written and when read, and deployed as ``serve deploy`` does (Serve's REST API on the dashboard),
so a changed ``user_config`` is a lightweight update of the running replicas. Model paths in it are relative to the
project directory (``base_dir`` when deploying; ``$RESOPS_HOME`` or the working directory in
a replica), so the same file works in a checkout and in the container image.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import yaml

IMPORT_PATH = "components.serve.app:app_builder"
APP_NAME = "resops"
TIER_KEYS = ("max_batch_size", "batch_wait_timeout_s", "threads", "placement")
DEPLOYMENT_KEYS = ("num_replicas", "autoscaling_config", "num_cpus", "resources", "max_ongoing_requests")


def tier_settings(section: dict) -> dict:
    """params.yaml ``serve.edge`` / ``serve.cloud`` -> ``build_app``'s per-tier settings.

    ``autoscaling`` (null or ``{min_replicas, max_replicas, target_ongoing_requests, ...}``) becomes
    Serve's ``autoscaling_config``, which replaces ``num_replicas``.
    """
    section = dict(section)
    out = {k: section[k] for k in (*TIER_KEYS, "num_replicas", "num_cpus", "resources", "max_ongoing_requests")
           if section.get(k) is not None}
    if section.get("autoscaling"):
        out["autoscaling_config"] = dict(section["autoscaling"])
    return out


def build_serve_config(args: dict, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
                       route_prefix: str = "/") -> dict:
    """A Serve deploy config (a dict, validated) for ``app_builder(args)``.

    The application is built here (which validates the model files) so the ``deployments`` section
    holds exactly the options the code gives each deployment, as ``serve build`` would write them.
    """
    from ray.serve.schema import ServeDeploySchema

    from components.serve.app import app_plan

    args = copy.deepcopy(args)
    _, deployments = app_plan(copy.deepcopy(args))
    if not args.get("files_sha256"):  # pin the files the config was written for
        from components.registry import file_sha256
        from components.serve.app import resolve_path

        paths = [resolve_path(args.get(k), args.get("base_dir")) for k in ("cloud_model", "edge_model", "edge_onnx")]
        args["files_sha256"] = {Path(p).name: file_sha256(p) for p in paths if p}
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": int(port)},
        "applications": [{
            "name": name, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
            "args": copy.deepcopy(args), "deployments": deployments,
            # One JSON object per log line (request id, route, latency in the access log): what log shippers parse.
            "logging_config": {"encoding": "JSON", "log_level": "INFO", "enable_access_log": True},
        }],
    }
    ServeDeploySchema.model_validate(config)
    return config


def write_serve_config(path: str | Path, config: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Serve config of the promoted models, written by `resops run calibrate` (what `serve build` makes,\n"
              "# plus the app builder's args). `resops serve` deploys it; the RayService uses it as serveConfigV2.\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, width=100))
    return path


def load_serve_config(path: str | Path) -> dict:
    """Read and validate a Serve config file; a missing or invalid file raises ``ValueError`` naming it."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Serve config {path} does not exist: run `dvc repro` (the calibrate stage) first")
    try:
        config = yaml.safe_load(path.read_text())
        ServeDeploySchema.model_validate(config)
    except Exception as exc:
        raise ValueError(f"Serve config {path} is not a valid Serve deploy config: {exc}") from None
    return config


def dashboard_address(address: str | None = None) -> str:
    """The Ray dashboard's HTTP address that Serve's REST API is on: ``address``, else
    ``$RAY_DASHBOARD_ADDRESS`` (what ``serve deploy`` reads; ``pipelines.runtime.init_ray`` sets it
    from ``ray.init``), else Ray's default ``http://127.0.0.1:8265``."""
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or "http://127.0.0.1:8265"
    return address if "://" in address else f"http://{address}"


def deploy_config(config: dict, *, base_dir: str | Path | None = None, host: str | None = None,
                  port: int | None = None, overrides: dict | None = None, timeout_s: float = 300.0,
                  dashboard: str | None = None) -> None:
    """Deploy a Serve config on the connected Ray (``ray.init`` first) as ``serve deploy config.yaml``
    does: ``PUT /api/serve/applications/`` of Serve's REST API on the dashboard (``dashboard``, see
    :func:`dashboard_address`), with Ray's own client for it, which sends Ray's auth token when token
    authentication is on. The deploy is declarative: applications not in ``config`` are removed, and a
    change of ``user_config`` only reconfigures the running replicas.

    ``base_dir`` is where relative model paths start (the project directory); ``host``/``port``
    override ``http_options``; ``overrides`` updates every application's ``args`` (e.g.
    ``{"default_mode": "edge"}``). Waits until every application runs; when one fails to deploy,
    deletes it and raises ``CheckpointError`` for a model-file problem, else ``RuntimeError``, with
    the replica's reason.
    """
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient  # the client of `serve deploy`
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(config)
    if host is not None:
        config.setdefault("http_options", {})["host"] = host
    if port is not None:
        config.setdefault("http_options", {})["port"] = int(port)
    for app in config["applications"]:
        app["args"] = {**app.get("args", {}), **(overrides or {})}
        for dep in app.get("deployments", []):  # the router's user_config would reset what args override
            live = {k: v for k, v in (overrides or {}).items() if k in (dep.get("user_config") or {})}
            if live:
                dep["user_config"] = {**dep["user_config"], **live}
        if base_dir is not None:
            app["args"]["base_dir"] = str(Path(base_dir).resolve())
    schema = ServeDeploySchema.model_validate(config)
    address = dashboard_address(dashboard)
    try:
        client = ServeSubmissionClient(address)
    except Exception as exc:  # refused, timed out, not a dashboard
        raise RuntimeError(f"Serve's REST API on the Ray dashboard at {address} does not answer ({exc}): deploying "
                           "a Serve config needs the dashboard (ray.include_dashboard: true; on a cluster set "
                           "RAY_DASHBOARD_ADDRESS to the head's http://host:8265)") from None
    client.deploy_applications(schema.model_dump(mode="json", exclude_unset=True))
    names = [app.name for app in schema.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        states = {n: (statuses[n].status if n in statuses else "NOT_STARTED") for n in names}
        failed = [n for n, s in states.items() if str(getattr(s, "value", s)) in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise _deploy_error(failed[0], statuses[failed[0]])
        if all(str(getattr(s, "value", s)) == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve applications {states} not running after {timeout_s:.0f} s")
        time.sleep(0.5)


def _deploy_error(name: str, app_status) -> Exception:
    """The failed deployment's own exception line, as CheckpointError when it is one; the app is deleted."""
    from ray import serve

    from components.models.checkpoint import CheckpointError

    lines = [app_status.message or ""]
    for dep_name, dep in app_status.deployments.items():
        if dep.message and str(getattr(dep.status, "value", dep.status)) != "HEALTHY":
            lines.append(f"{dep_name}: {dep.message}")
    text = "\n".join(line for line in lines if line)
    try:
        serve.delete(name)
    except Exception:  # best effort: the error below is what matters
        pass
    marker = "CheckpointError: "
    if marker in text:
        reason = text.split(marker, 1)[1].strip().splitlines()[0]
        return CheckpointError(f"deploying {name!r} failed: {reason}")
    last = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return RuntimeError(f"deploying {name!r} failed: {last[-1] if last else 'unknown reason'}")


def edge_uses_onnx(backend: str, files: dict) -> bool:
    """Whether the edge tier runs the int8 ONNX model (``serve.edge.backend`` auto/onnx/torch and the
    promoted ``files``); ``onnx`` without an int8 model is an error."""
    if backend not in ("auto", "onnx", "torch"):
        raise ValueError(f"serve.edge.backend must be auto, onnx or torch, got {backend!r}")
    if backend == "onnx" and "edge_int8" not in files:
        raise ValueError("serve.edge.backend is onnx but the promoted model has no int8 ONNX edge model "
                         "(set prune.quantize.enabled: true)")
    return backend in ("auto", "onnx") and "edge_int8" in files


def signal_settings(prepared_report: dict | None) -> dict | None:
    """The app's ``signal`` settings when the model was trained on EEG scalograms: the windows and
    the transform the prepare stage used, so a posted signal becomes the same images."""
    r = prepared_report or {}
    if r.get("modality") != "eeg":
        return None
    return {"fs": float(r["fs"]), "window": int(r["window"]), "overlap": int(r["overlap"]), "cwt": dict(r["cwt"])}


def serve_args(params, promoted_dir: str | Path, calibration: dict | None, prepared_report: dict | None = None) -> dict:
    """``app_builder`` args from params.yaml ``serve`` and the promoted models (``model.json``).

    The edge tier runs the int8 ONNX edge model when the prune stage built one and
    ``serve.edge.backend`` is ``auto`` or ``onnx``; ``torch`` runs the pruned torch model.
    """
    import json

    promoted_dir = Path(promoted_dir)
    info_file = promoted_dir / "model.json"
    if not info_file.exists():
        raise FileNotFoundError(f"{info_file} does not exist: no model has been promoted yet (run `dvc repro`)")
    promoted = json.loads(info_file.read_text())
    files = promoted["files"]
    s = params("serve")
    use_onnx = edge_uses_onnx(s["edge"]["backend"], files)
    threshold = s["cascade"]["threshold"]
    if threshold is None:
        if calibration is None:
            raise ValueError("serve.cascade.threshold is null but there is no calibration to take it from")
        threshold = calibration["threshold"]["threshold"]
    temperatures = {t: calibration[t]["temperature"] for t in ("edge", "cloud")} if calibration else {}
    signal = signal_settings(prepared_report)
    return {
        "cloud_model": files["full"], "edge_model": files.get("edge", files["full"]),
        **({"edge_onnx": files["edge_int8"]} if use_onnx else {}),
        "model_version": promoted["version"], "temperatures": temperatures, "threshold": float(threshold),
        "default_mode": s["default_mode"], "max_body_bytes": s["max_body_bytes"],
        "max_image_pixels": s["max_image_pixels"], "min_image_side": s["min_image_side"],
        "max_batch_images": s["max_batch_images"], "auth_token_env": s["auth_token_env"],
        "edge": tier_settings(s["edge"]), "cloud": tier_settings(s["cloud"]), "router": dict(s["router"]),
        "calibration": calibration, "feedback": dict(s["feedback"]),
        **({"signal": signal} if signal else {}),
        **({"drift": drift_args(s["drift"])} if s["drift"]["enabled"] else {}),
    }


# Written by the calibrate stage next to the Serve config (components.feedback.reference).
DRIFT_REFERENCE = "models/serve/drift_reference.json"


def drift_args(settings: dict) -> dict:
    """``serve.drift`` checked, with the reference file the router loads."""
    from components.feedback.drift import DriftSettings

    d = DriftSettings(**settings)
    return {"reference": DRIFT_REFERENCE, "threshold": d.threshold, "embed_rate": d.embed_rate,
            "check_every": d.check_every}
