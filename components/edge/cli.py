"""``resops edge`` (also ``resops-edge``): serve an edge bundle on the device.

    resops edge --bundle models/serve/edge --cloud-url https://inspect.example.com --port 8100

Imports neither Ray nor torch: it runs where only ``requirements-edge.lock`` is installed.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="resops edge", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="models/serve/edge",
                    help="the edge bundle directory (edge.json + the ONNX file; default: models/serve/edge)")
    ap.add_argument("--cloud-url", help="the cloud app's base URL (resops serve / the RayService); "
                                        "without it the runtime is standalone and nothing escalates")
    ap.add_argument("--cloud-token-env", default="RESOPS_API_TOKEN",
                    help="environment variable holding the cloud app's bearer token (default: RESOPS_API_TOKEN)")
    ap.add_argument("--token-env", default="RESOPS_EDGE_TOKEN",
                    help="environment variable holding this runtime's own bearer token; when set, clients must "
                         "send it (default: RESOPS_EDGE_TOKEN)")
    ap.add_argument("--mode", choices=["edge", "cloud", "cascade"], default="cascade", help="default routing mode")
    ap.add_argument("--threshold", type=float, help="cascade threshold (default: the calibrated one in the bundle)")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the cloud before answering "
                                                               "locally (degraded); default 2")
    ap.add_argument("--outbox", help="outbox directory (default: outbox/ next to the bundle)")
    ap.add_argument("--outbox-max-items", type=int, default=500)
    ap.add_argument("--outbox-max-mb", type=float, default=200.0)
    ap.add_argument("--resend-interval", type=float, default=5.0, help="seconds between resend attempts")
    ap.add_argument("--feedback", metavar="DIR", help="keep escalated, unsure and sampled inputs here for the next data "
                                                      "version (resops feedback export); default: off")
    ap.add_argument("--feedback-rate", type=float, default=0.0, help="share of the confident inputs kept as well")
    ap.add_argument("--feedback-max-mb", type=float, default=500.0, help="the feedback store's bound (oldest dropped)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (and concurrent images)")
    ap.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 on a "
                                                        "trusted network)")
    ap.add_argument("--port", type=int, default=8100)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from components.edge.app import create_app
    from components.edge.bundle import BundleError

    try:
        app = create_app(args.bundle, auth_token_env=args.token_env, cloud_token_env=args.cloud_token_env,
                         cloud_url=args.cloud_url, default_mode=args.mode, threshold=args.threshold,
                         timeout_s=args.timeout, outbox_dir=args.outbox, outbox_max_items=args.outbox_max_items,
                         outbox_max_bytes=int(args.outbox_max_mb * 1e6), resend_interval_s=args.resend_interval,
                         threads=args.threads,
                         feedback={"enabled": True, "location": args.feedback, "rate": args.feedback_rate,
                                   "max_bytes": int(args.feedback_max_mb * 1e6)} if args.feedback else None)
    except (BundleError, ValueError) as exc:
        print(f"resops edge: error: {exc}", file=sys.stderr)
        return 2
    rt = app.state.runtime
    print(f"resops edge: {rt.bundle.model_name} {rt.bundle.model_version} on http://{args.host}:{args.port}/ "
          f"(mode {rt.default_mode}, threshold {rt.threshold:.3f}, cloud {rt.cloud_url or 'none'}). Ctrl-C stops.",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
