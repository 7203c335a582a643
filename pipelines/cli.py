"""The `resops` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _params(args):
    from pipelines.params import load_params

    return load_params(args.params, args.set)


def cmd_run(args) -> int:
    from pipelines.stages import STAGES

    params = _params(args)
    names = list(STAGES) if args.stage == "all" else [args.stage]
    for name in names:
        STAGES[name](params)
    return 0


def cmd_serve(args) -> int:
    from components.registry import load_registry
    from components.serve.app import run
    from pipelines.runtime import init_ray

    params = _params(args)
    model = Path(args.model) if args.model else Path("models/promoted/full.pt")
    version = args.version
    if version is None:
        registry = load_registry("models/registry.json")
        version = registry.get("promoted") or "unpromoted"
    if not model.exists():
        print(f"resops serve: no model at {model}. Run `dvc repro` (promote stage) first or pass --model.", file=sys.stderr)
        return 2
    init_ray(params)
    run(str(model), host=args.host or params("serve.host"), port=args.port or params("serve.port"),
        blocking=True, model_version=version, num_replicas=params("serve.num_replicas"),
        max_batch_size=params("serve.max_batch_size"), batch_wait_timeout_s=params("serve.batch_wait_timeout_s"),
        threads=params("serve.threads"), max_body_bytes=params("serve.max_body_bytes"),
        max_image_pixels=params("serve.max_image_pixels"))
    return 0


def cmd_predict(args) -> int:
    import httpx

    data = Path(args.file).read_bytes()
    r = httpx.post(args.url.rstrip("/") + "/predict", content=data,
                   headers={"content-type": "application/octet-stream"}, timeout=args.timeout)
    print(json.dumps(r.json(), indent=2))
    return 0 if r.status_code == 200 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resops", description="ResNet18-family visual inspection on Ray: DVC stages, serving.")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter for this run, e.g. -S train.epochs=2 (repeatable)")
    sub = ap.add_subparsers(dest="command", required=True)

    from pipelines.stages import STAGES

    r = sub.add_parser("run", help="run a pipeline stage (what each DVC stage calls)")
    r.add_argument("stage", choices=[*STAGES, "all"])
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("serve", help="serve the promoted model with Ray Serve (127.0.0.1 by default)")
    s.add_argument("--model", help="model file (default: models/promoted/full.pt)")
    s.add_argument("--version", help="version label (default: the registry's promoted version)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)

    pr = sub.add_parser("predict", help="send an image to a running resops server and print the answer")
    pr.add_argument("file")
    pr.add_argument("--url", default="http://127.0.0.1:8000")
    pr.add_argument("--timeout", type=float, default=30.0)
    pr.set_defaults(func=cmd_predict)

    args = ap.parse_args(argv)
    from components.models.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (FileNotFoundError, KeyError, ValueError, CheckpointError) as exc:
        print(f"resops {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
