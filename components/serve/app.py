"""Cloud-edge collaborative inference on Ray Serve: the application, assembled from typed arguments.

Deployments, composed with DeploymentHandles:

* ``Router`` (:mod:`components.serve.router`) -- the FastAPI ingress (OpenAPI at ``/docs``). With
  ``serve.edge.placement`` ingress (the default for an int8 ONNX edge classifier) it also runs the edge
  model itself (:class:`~components.serve.tiers.IngressEdge`);
* ``EdgeClassifier`` (:mod:`components.serve.tiers`) -- with placement replica (a torch edge model, a
  detector, or by choice): the edge model in its own deployment, batched;
* ``CloudClassifier`` -- the promoted full model with dynamic batching (``@serve.batch``).

:func:`app_builder` is the Serve config's ``import_path`` (``components.serve.app:app_builder``): a typed
application builder, so Serve validates the config's ``args`` into :class:`~components.serve.args.AppArgs`.
"""
# No `from __future__ import annotations`: Serve reads app_builder's annotation to validate its args.

import copy
import os
from pathlib import Path

from components.registry import file_sha256
from components.serve.args import AppArgs, Deployment, RouterSettings, TierSettings
from components.serve.router import Router
from components.serve.tiers import CloudClassifier, EdgeClassifier, read_model_info

__all__ = ["AppArgs", "Router", "EdgeClassifier", "CloudClassifier", "app_builder", "app_plan",
           "build_app", "plan", "plan_app", "resolve_path"]


def resolve_path(path: str | None, base_dir: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute():
        p = Path(base_dir or os.environ.get("RESOPS_HOME") or ".") / p
    # Absolute: replicas do not share the caller's working directory. On a multi-node cluster the
    # path must reach the same file on every tier's node (shared volume or baked into the image);
    # replicas check the sha256 taken here.
    return str(p.resolve())


def deployment_options(settings: Deployment, max_batch_size: int) -> dict:
    """Serve options of a deployment: replicas or autoscaling, CPUs and resources, and in-flight room
    for a full batch (``max_ongoing_requests`` default: twice ``max_batch_size``)."""
    actor = {"num_cpus": float(settings.num_cpus), **({"resources": dict(settings.resources)} if settings.resources else {})}
    out = {"ray_actor_options": actor, "max_ongoing_requests": settings.max_ongoing_requests or 2 * max_batch_size}
    if settings.autoscaling_config:
        out["autoscaling_config"] = dict(settings.autoscaling_config)
    else:
        out["num_replicas"] = int(settings.num_replicas)
    return out


def pinned_sha256(files: list[str], files_sha256: dict | None) -> dict:
    """``{file name: sha256}`` of the model files, each as ``files_sha256`` recorded it (else ``CheckpointError``)."""
    from components.models.checkpoint import CheckpointError

    for path in files:
        if not Path(path).exists():
            raise CheckpointError(f"model file {path} does not exist")
    sha = {Path(p).name: file_sha256(p) for p in files}
    for name, found in sha.items():
        expected = (files_sha256 or {}).get(name)
        if expected and expected != found:
            raise CheckpointError(f"model file {name} has sha256 {found}, not {expected} as recorded in the "
                                  "Serve config: the file was replaced after the config was written")
    return sha


def plan_tier(tier: str, model_path: str, onnx_path: str | None, version: str, settings: TierSettings,
              args: AppArgs) -> tuple[dict, object, dict | None]:
    """``(info, what the Router is bound with, deployment spec or None)`` of one tier. An int8 ONNX edge
    classifier with placement auto or ingress runs inside the Router: it is bound as its settings (a dict)
    and has no deployment of its own."""
    meta = read_model_info(model_path)  # raises CheckpointError naming a missing or malformed file
    sha = pinned_sha256([p for p in (model_path, onnx_path) if p], args.files_sha256)
    temperature = float(args.temperatures.get(tier, 1.0))
    info = {**meta, "tier": tier, "model_version": version, "files": sha,
            "backend": "onnxruntime" if onnx_path else "torch", "temperature": temperature, "placement": "replica"}
    placement = getattr(settings, "placement", "replica")
    if tier == "edge" and placement != "replica" and onnx_path and meta["task"] == "classify":
        info["placement"] = "ingress"
        return info, {"onnx_path": onnx_path, "meta": meta, "model_version": version, "temperature": temperature,
                      "threads": settings.threads, "max_image_pixels": args.max_image_pixels,
                      "min_image_side": args.min_image_side, "sha256": sha}, None
    if placement == "ingress":
        raise ValueError("serve.edge.placement: ingress needs the int8 ONNX edge model of a classifier "
                         "(serve.edge.backend auto or onnx, prune.quantize.enabled: true)")
    cls = EdgeClassifier if tier == "edge" else CloudClassifier
    # user_config: the temperature can be changed in the Serve config without restarting replicas.
    options = {**deployment_options(settings, settings.max_batch_size), "user_config": {"temperature": temperature}}
    handle = cls.options(**options).bind(
        model_path, onnx_path=onnx_path, model_version=version, temperature=temperature,
        max_image_pixels=args.max_image_pixels, min_image_side=args.min_image_side,
        max_batch_size=settings.max_batch_size, batch_wait_timeout_s=settings.batch_wait_timeout_s,
        threads=settings.threads, sha256=sha)
    return info, handle, {"name": cls.name, **options}


def router_options(router: RouterSettings, args: AppArgs, info: dict) -> dict:
    """The Router's deployment options; with the edge model in the ingress it takes the edge's replicas
    (or autoscaling) and resources, and the edge's CPUs on top of its own."""
    actor = {"num_cpus": float(router.num_cpus), **({"resources": dict(router.resources)} if router.resources else {})}
    out = {"max_ongoing_requests": int(router.max_ongoing_requests), "ray_actor_options": actor,
           # user_config: threshold and default mode can be changed in the Serve config without a restart.
           "user_config": {"threshold": float(args.threshold), "default_mode": args.default_mode}}
    if info["edge"]["placement"] == "ingress":
        edge = deployment_options(args.edge, 1)
        actor["num_cpus"] += edge["ray_actor_options"]["num_cpus"]
        if edge["ray_actor_options"].get("resources") or actor.get("resources"):
            actor["resources"] = {**edge["ray_actor_options"].get("resources", {}), **actor.get("resources", {})}
        out.update({k: edge[k] for k in ("num_replicas", "autoscaling_config") if k in edge})
        out["user_config"]["edge_temperature"] = info["edge"]["temperature"]
    return out


def check_tiers(info: dict) -> None:
    if info["edge"]["task"] != info["cloud"]["task"]:
        raise ValueError(f"the edge model is a {info['edge']['task']} model and the cloud model a "
                         f"{info['cloud']['task']} model: one app serves one task")
    if info["edge"]["class_names"] != info["cloud"]["class_names"]:
        raise ValueError(f"the edge model's classes {info['edge']['class_names']} differ from the cloud model's "
                         f"{info['cloud']['class_names']}: a cascade cannot mix them")


def plan(args: AppArgs):
    """``(application, deployments)``: the Serve application and each deployment's options as a Serve
    config lists them (``name``, replicas or autoscaling, ``max_ongoing_requests``, ``ray_actor_options``,
    ``user_config``). Model files are loaded here once to validate them: a missing or malformed file
    raises ``CheckpointError`` now, naming the file, instead of failing replicas after deployment."""
    cloud_model = resolve_path(args.cloud_model, args.base_dir)
    edge_model = resolve_path(args.edge_model, args.base_dir) or cloud_model
    edge_onnx = resolve_path(args.edge_onnx, args.base_dir)
    info, bound, specs = {}, {}, []
    for tier, model_path, onnx_path, version, settings in (
            ("edge", edge_model, edge_onnx, args.edge_version, args.edge),
            ("cloud", cloud_model, None, args.cloud_version, args.cloud)):
        info[tier], bound[tier], spec = plan_tier(tier, model_path, onnx_path, version or args.model_version,
                                                  settings, args)
        specs += [spec] if spec else []
    check_tiers(info)
    info["calibration"] = args.calibration
    info["model_card"] = args.model_card  # the calibrate stage's card of this version: GET /models answers it
    options = router_options(args.router, args, info)
    if info["edge"]["placement"] == "ingress":
        bound["edge"]["cloud_input"] = {k: info["cloud"][k] for k in ("image_size", "in_chans")}
    specs.append({"name": "Router", **options})
    app = Router.options(**options).bind(
        bound["edge"], bound["cloud"], info, default_mode=args.default_mode, threshold=args.threshold,
        max_body_bytes=args.max_body_bytes, max_batch_images=args.max_batch_images, auth_token=args.auth_token,
        auth_token_env=args.auth_token_env, signal=args.signal, detection=args.detection.model_dump(),
        feedback=feedback_settings(args.feedback, args.base_dir), drift=drift_settings(args.drift, args.base_dir))
    return app, copy.deepcopy(specs)


def feedback_settings(feedback: dict | None, base_dir: str | None) -> dict | None:
    """``serve.feedback`` checked now (not in a replica), its local location taken from ``base_dir``."""
    if not feedback:
        return None
    from components.feedback import FeedbackSettings
    from components.storage import is_uri

    settings = dict(feedback)
    FeedbackSettings.from_dict(settings)
    if settings.get("enabled") and not is_uri(settings["location"]):
        settings["location"] = resolve_path(settings["location"], base_dir)
    return settings


def drift_settings(drift, base_dir: str | None) -> dict | None:
    """``drift`` with its reference read now: a missing file fails the deployment here, not in a replica."""
    if drift is None:
        return None
    from components.feedback.drift import load_reference

    path = resolve_path(drift.reference, base_dir)
    if not Path(path).exists():
        raise FileNotFoundError(f"drift reference {path} does not exist: run the calibrate stage (`dvc repro`) "
                                "or set serve.drift.enabled: false")
    return {**drift.model_dump(), "reference": load_reference(path)}


def plan_app(cloud_model: str, edge_model: str | None = None, **kwargs):
    """:func:`plan` of :class:`AppArgs` given as keyword arguments."""
    return plan(AppArgs(cloud_model=cloud_model, edge_model=edge_model, **kwargs))


def build_app(cloud_model: str, edge_model: str | None = None, **kwargs):
    """The Serve application: ``Router.bind(EdgeClassifier.bind(...), CloudClassifier.bind(...), ...)``
    (with the edge in the ingress, ``Router.bind(<edge settings>, CloudClassifier.bind(...))``); the
    arguments are :class:`AppArgs`' fields."""
    return plan_app(cloud_model, edge_model, **kwargs)[0]


def app_builder(args: AppArgs):
    """Application builder for a Serve config (``import_path: components.serve.app:app_builder``), the
    RayService ``serveConfigV2`` and ``serve run``."""
    return app_plan(args)[0]


def app_plan(args: "AppArgs | dict"):
    """:func:`plan` of a Serve config's ``args`` (a dict is validated into :class:`AppArgs`)."""
    return plan(args if isinstance(args, AppArgs) else AppArgs.model_validate(args))
