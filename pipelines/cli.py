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
    """Deploy the generated Serve config (models/serve/serve_config.yaml) on Ray and serve until Ctrl-C."""
    import signal
    import threading
    import time

    from components.serve.config import deploy_config, load_serve_config
    from pipelines.runtime import init_ray

    params = _params(args)
    config = load_serve_config(args.config)
    host = args.host or params("serve.host")
    port = args.port or params("serve.port")
    overrides = {"default_mode": args.mode} if args.mode else None
    init_ray(params)
    from ray import serve

    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (kill, Kubernetes) stops like Ctrl-C
        def _stop(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _stop)
    try:
        deploy_config(config, base_dir=Path.cwd(), host=host, port=port, overrides=overrides)
        app = config["applications"][0]
        mode = args.mode or app["args"].get("default_mode")
        print(f"Serving {app['args'].get('model_version')} on http://{host}:{port}/ (default mode {mode}, "
              f"cascade threshold {app['args'].get('threshold'):.3f}; OpenAPI docs at /docs). Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
    return 0


def cmd_predict(args) -> int:
    import os

    import httpx

    data = Path(args.file).read_bytes()
    headers = {"content-type": "application/octet-stream"}
    token = os.environ.get(args.token_env) if args.token_env else None
    if token:
        headers["authorization"] = f"Bearer {token}"
    query = {k: v for k, v in (("mode", args.mode), ("threshold", args.threshold)) if v is not None}
    r = httpx.post(args.url.rstrip("/") + "/predict", content=data, params=query, headers=headers,
                   timeout=args.timeout)
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

    s = sub.add_parser("serve", help="serve the promoted models (edge + cloud tiers) with Ray Serve (127.0.0.1 by default)")
    s.add_argument("--config", default="models/serve/serve_config.yaml",
                   help="Serve config written by the calibrate stage (default: models/serve/serve_config.yaml)")
    s.add_argument("--mode", choices=["edge", "cloud", "cascade"], help="default routing mode (default: serve.default_mode)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)

    pr = sub.add_parser("predict", help="send an image to a running resops server and print the answer")
    pr.add_argument("file")
    pr.add_argument("--url", default="http://127.0.0.1:8000")
    pr.add_argument("--mode", choices=["edge", "cloud", "cascade"], help="routing mode (default: the server's)")
    pr.add_argument("--threshold", type=float, help="cascade escalation threshold (default: the calibrated one)")
    pr.add_argument("--token-env", default="RESOPS_API_TOKEN",
                    help="environment variable holding the bearer token, if the server needs one")
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
