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
MODEL_KEYS = ("cloud_model", "edge_model", "edge_onnx")


def cluster_config(config: dict, port: int = PORT) -> dict:
    """The RayService version of a Serve config written by the calibrate stage."""
    config = copy.deepcopy(config)
    config["http_options"] = {**(config.get("http_options") or {}), "host": HOST, "port": int(port)}
    for app in config["applications"]:
        args = app.setdefault("args", {})
        args.pop("base_dir", None)
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
              "# stage's output, with http_options for the cluster; do not edit by hand. Model paths resolve\n"
              "# against RESOPS_HOME=/app (the image's copy of models/promoted) and files_sha256 pins them.\n"
              f"# model_version: {', '.join(f'{k}={v}' for k, v in version.items())}\n")
    return header + yaml.safe_dump(config, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE),
                    help="Serve config of the calibrate stage (default: models/serve/serve_config.yaml)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where the RayService reads it (default: %(default)s)")
    ap.add_argument("--port", type=int, default=PORT, help="Serve HTTP port in the pods (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when --out differs from what would be written")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from components.serve.config import load_serve_config

    try:
        text = render(cluster_config(load_serve_config(args.source), args.port))
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
