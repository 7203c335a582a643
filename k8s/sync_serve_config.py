#!/usr/bin/env python
"""Copy the pipeline's Serve config into the RayService: models/serve/serve_config.yaml ->
k8s/base/serve_config.yaml, which kustomize embeds as the RayService's ``serveConfigV2``.

The calibrate stage writes the config for a local ``resops serve``; this script makes the cluster
version of it and changes nothing else:

* ``http_options``: host 0.0.0.0 (the Serve proxies must accept traffic from the Kubernetes
  Service) and port 8000 (the ``serve`` port of the RayService pods);
* ``args.base_dir`` is dropped: it is an absolute path of the machine that deployed it. Model paths
  stay relative (``models/promoted/...``) and the replicas resolve them against ``$RESOPS_HOME``,
  which the pods set to ``/app``, the image's copy of the repository;
* the tiers autoscale (``--max-replicas``, default 4, as the RayService's CPU worker group): each
  deployment with a fixed ``num_replicas`` gets Serve's ``autoscaling_config`` (1 to max replicas,
  ``target_ongoing_requests`` a full batch per replica; the ingress that runs the edge model, 16), in
  the deployments section and in the app's args alike, so the built app and the config agree;
* the config is validated with Ray's ``ServeDeploySchema`` (as ``resops serve`` does), and model
  paths that are absolute or leave the project are refused.

``files_sha256`` stays: a replica whose model file differs from the one the config was calibrated
for refuses to start, so build the image from the same checkout (see k8s/README.md).

    python k8s/sync_serve_config.py                 # write k8s/base/serve_config.yaml
    python k8s/sync_serve_config.py --check         # exit 1 if the checked-in copy is out of date
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "models" / "serve" / "serve_config.yaml"
DEFAULT_OUT = ROOT / "k8s" / "base" / "serve_config.yaml"
HOST, PORT = "0.0.0.0", 8000
MAX_REPLICAS = 4  # the RayService's cpu worker group: maxReplicas
INGRESS_TARGET = 16  # ongoing requests per Router replica that runs the edge model (sub-millisecond each)
MODEL_KEYS = ("cloud_model", "edge_model", "edge_onnx")


def autoscale(app: dict, max_replicas: int) -> None:
    """Serve's ``autoscaling_config`` for every tier with a fixed replica count (deployments and args)."""
    args = app.setdefault("args", {})
    deployments = {d["name"]: d for d in app.get("deployments", [])}
    tiers = {"CloudClassifier": "cloud", "EdgeClassifier": "edge"}
    if "EdgeClassifier" not in deployments:  # the edge model runs in the Router: it takes the edge's replicas
        tiers["Router"] = "edge"
    for name, tier in tiers.items():
        dep, settings = deployments.get(name), args.get(tier)
        if dep is None or settings is None or dep.get("autoscaling_config"):
            continue
        replicas = int(dep.pop("num_replicas", 1))
        target = INGRESS_TARGET if name == "Router" else max(2, int(settings.get("max_batch_size", 8)))
        auto = {"min_replicas": 1, "max_replicas": max(replicas, int(max_replicas)), "target_ongoing_requests": target}
        dep["autoscaling_config"] = dict(auto)
        settings.pop("num_replicas", None)
        settings["autoscaling_config"] = dict(auto)


def cluster_config(config: dict, port: int = PORT, max_replicas: int = MAX_REPLICAS) -> dict:
    """The RayService version of a Serve config written by the calibrate stage."""
    config = copy.deepcopy(config)
    config["http_options"] = {**(config.get("http_options") or {}), "host": HOST, "port": int(port)}
    for app in config["applications"]:
        args = app.setdefault("args", {})
        args.pop("base_dir", None)
        autoscale(app, max_replicas)
        for key in MODEL_KEYS:
            path = args.get(key)
            if path is None:
                continue
            p = PurePosixPath(path)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"application {app.get('name')!r}: {key} is {path!r}; model paths must be relative "
                                 "to the project (they resolve against RESOPS_HOME=/app in the pods)")
    return config


def render(config: dict) -> str:
    import yaml

    version = {a.get("name"): (a.get("args") or {}).get("model_version") for a in config["applications"]}
    header = ("# serveConfigV2 of the RayService (k8s/base/kustomization.yaml embeds this file).\n"
              "# Written by `python k8s/sync_serve_config.py` from models/serve/serve_config.yaml, the calibrate\n"
              "# stage's output, with http_options and autoscaling for the cluster; do not edit by hand. Model\n"
              "# paths resolve against RESOPS_HOME=/app (the image's copy of models/promoted) and files_sha256\n"
              "# pins them.\n"
              f"# model_version: {', '.join(f'{k}={v}' for k, v in version.items())}\n")
    return header + yaml.safe_dump(config, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE),
                    help="Serve config of the calibrate stage (default: models/serve/serve_config.yaml)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where the RayService reads it (default: %(default)s)")
    ap.add_argument("--port", type=int, default=PORT, help="Serve HTTP port in the pods (default: %(default)s)")
    ap.add_argument("--max-replicas", type=int, default=MAX_REPLICAS,
                    help="autoscaling ceiling of each tier (default: %(default)s, the RayService's CPU workers)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when --out differs from what would be written")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from components.serve.config import load_serve_config

    try:
        text = render(cluster_config(load_serve_config(args.source), args.port, args.max_replicas))
    except (FileNotFoundError, ValueError) as exc:
        print(f"sync_serve_config: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is not the cluster version of {args.source}: run `python k8s/sync_serve_config.py`",
                  file=sys.stderr)
            return 1
        print(f"{out} is up to date with {args.source}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} from {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
