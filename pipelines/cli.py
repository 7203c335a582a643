"""The `resops` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from components import ResopsError


def _params(args):
    from pipelines.params import load_params

    params = load_params(args.params, args.set)
    params.config  # every section typed and checked before anything runs (components.config)
    return params


def pipeline_stages(params) -> dict:
    """The stage functions of the params' pipeline: ``pipeline: detect`` (pipelines/detect/params.yaml)
    runs the detection stages, anything else (the default params.yaml has no key) the classification ones."""
    kind = params.get("pipeline", "classify")
    if kind == "detect":
        from pipelines.detect_stages import STAGES
    elif kind == "classify":
        from pipelines.stages import STAGES
    else:
        raise ValueError(f"{params.source}: pipeline must be classify or detect, got {kind!r}")
    return STAGES


def _stage_names(stages: list[str], known: dict | None = None) -> list[str]:
    if known is None:
        from pipelines.stages import STAGES as known
    if "all" in stages:
        if len(stages) > 1:
            raise ValueError("'all' runs every stage: name no other stage with it")
        return list(known)
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} of this pipeline; its stages: {', '.join(known)}")
    return list(stages)


def cmd_run(args) -> int:
    """Run stages here, or (stages listed in ``cluster.submit``, outside a cluster job) as a Ray job."""
    import os

    from pipelines import submit

    params = _params(args)
    STAGES = pipeline_stages(params)
    names = _stage_names(args.stages, STAGES)
    if params.get("pipeline", "classify") == "detect":
        if (params.get("cluster") or {}).get("submit"):
            raise ValueError("cluster.submit is not supported by the detection pipeline yet: run its stages here "
                             "(train joins a cluster through ray.address or RAY_ADDRESS)")
        remote = set()
    else:
        remote = set(params("cluster.submit") or [])
    if "all" in remote:
        remote = set(STAGES)
    if args.local or os.environ.get(submit.IN_JOB_ENV):
        remote = set()
    i = 0
    while i < len(names):
        j = i
        while j < len(names) and (names[j] in remote) == (names[i] in remote):
            j += 1
        group = names[i:j]
        if names[i] in remote:
            _, rc = submit.submit(group, params, address=submit.cluster_address(None, params), overrides=args.set,
                                  params_file=args.params)
            if rc:
                return rc
        else:
            for name in group:
                STAGES[name](params)
        i = j
    if args.export:
        copied = submit.export_outputs(".", names, args.export)
        print(f"[resops] exported {len(copied)} output(s) to {args.export}", flush=True)
    return 0


def cmd_submit(args) -> int:
    from pipelines import submit

    params = _params(args)
    _, rc = submit.submit(_stage_names(args.stages), params, address=submit.cluster_address(args.address, params),
                          overrides=args.set, params_file=args.params, wait=not args.no_wait,
                          fetch=not args.no_fetch)
    return rc


def _job_client(args):
    from pipelines import submit

    return submit.client(submit.cluster_address(args.address, _params(args)))


def cmd_status(args) -> int:
    info = _job_client(args).get_job_info(args.job)
    record = {"job": info.submission_id, "status": str(info.status.value), "message": info.message,
              "entrypoint": info.entrypoint, "metadata": info.metadata, "start_time": info.start_time,
              "end_time": info.end_time, "driver_exit_code": getattr(info, "driver_exit_code", None)}
    print(json.dumps(record, indent=2) if args.json else f"{record['job']}: {record['status']}"
          + (f" ({record['message']})" if record["message"] else ""))
    return {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}.get(record["status"], 0)


def cmd_logs(args) -> int:
    from pipelines import submit

    jc = _job_client(args)
    if args.follow:
        status = submit.follow(jc, args.job)
        return 0 if status == "SUCCEEDED" else 1
    print(jc.get_job_logs(args.job), end="")
    return 0


def cmd_stop(args) -> int:
    stopped = _job_client(args).stop_job(args.job)
    print(f"{args.job}: {'stop requested' if stopped else 'already finished'}")
    return 0


def cmd_jobs(args) -> int:
    jobs = sorted(_job_client(args).list_jobs(), key=lambda j: j.start_time or 0)
    for j in jobs:
        if j.submission_id:
            print(f"{j.submission_id}\t{j.status.value}\t{(j.metadata or {}).get('resops_stages', j.entrypoint)}")
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
    suffix = Path(args.file).suffix.lower()
    # A signal file (EEG: one number per line, or a 1-D .npy) goes to the signal endpoint.
    signal_type = {".txt": "text/plain", ".npy": "application/x-npy"}.get(suffix)
    headers = {"content-type": signal_type or "application/octet-stream"}
    token = os.environ.get(args.token_env) if args.token_env else None
    if token:
        headers["authorization"] = f"Bearer {token}"
    query = {k: v for k, v in (("mode", args.mode), ("threshold", args.threshold),
                               ("score_threshold", args.score_threshold)) if v is not None}
    if args.explain:
        if signal_type or args.detect:
            print("resops predict --explain: images of a classifier app only", file=sys.stderr)
            return 2
        r = httpx.post(args.url.rstrip("/") + "/explain", content=data, headers=headers, timeout=args.timeout)
        try:
            body = r.json()
        except ValueError:
            raise ResopsError(f"{args.url}/explain answered {r.status_code} without JSON: {r.text[:120]!r}") from None
        if r.status_code == 200:
            import base64

            out = Path(args.output or Path(args.file).with_suffix(".gradcam.png").name)
            out.write_bytes(base64.b64decode(body.pop("heatmap_png")))
            body["heatmap_file"] = str(out)
        print(json.dumps(body, indent=2))
        return 0 if r.status_code == 200 else 1
    path = "/predict_signal" if signal_type else ("/detect" if args.detect else "/predict")
    r = httpx.post(args.url.rstrip("/") + path, content=data, params=query, headers=headers, timeout=args.timeout)
    try:
        body = r.json()
    except ValueError:  # not resops answering (a proxy's HTML page, an empty 502)
        raise ResopsError(f"{args.url}{path} answered {r.status_code} without JSON: {r.text[:120]!r}") from None
    print(json.dumps(body, indent=2))
    return 0 if r.status_code == 200 else 1


def cmd_feedback_export(args) -> int:
    from components.feedback.export import export

    p = _params(args)
    prepared = Path("data/prepared/report.json")
    classes = json.loads(prepared.read_text())["class_names"] if prepared.exists() else None
    out = export(args.source or p("serve.feedback.location"), args.to, corrections=args.corrections,
                 class_names=classes)
    print(f"resops feedback export: {out['exported']} images to {out['to']} {out['by_class']} "
          f"({out['corrected']} corrected, {out['skipped_unreadable']} unreadable left out); "
          f"next: correct the labels, `dvc add {out['to']}`, add it to data.extra", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["edge"]:  # the device runtime: nothing below (pandas, Ray, torch) is imported for it
        from components.edge.cli import main as edge_main

        return edge_main(argv[1:])
    args = parse_args(argv)
    import httpx

    from components.models.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ResopsError, FileNotFoundError, KeyError, ValueError, CheckpointError, ConnectionError) as exc:
        print(f"resops {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # resops predict: the server is not there, or did not answer in time
        url = getattr(args, "url", "")
        print(f"resops {args.command}: error: no answer from {url} ({type(exc).__name__}: {exc or 'timed out'})",
              file=sys.stderr)
        return 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; ``-S`` before and after the command are merged into ``set``, in that order."""
    ap = argparse.ArgumentParser(prog="resops", description="ResNet18-family visual inspection on Ray: DVC stages, serving.")
    ap.add_argument("--version", action="version", version=f"resops {_version()}")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    set_help = "override a parameter for this run, e.g. -S train.epochs=2 (repeatable; before or after the command)"
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    # the same option after the command (`resops run train -S train.epochs=1`), merged below
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("-S", "--set", action="append", dest="set_after", default=[], metavar="KEY=VALUE", help=set_help)
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:  # every command takes -S
        return sub.add_parser(name, parents=[after], **kw)

    _add_pipeline_commands(command)
    _add_job_commands(command)
    _add_serving_commands(command)
    sub.add_parser("edge", add_help=False, help="the edge runtime on the device: the int8 edge model, escalating to "
                                                "the cloud app (`resops edge --help`; needs no Ray or torch)")
    args = ap.parse_args(argv)
    args.set = [*args.set, *getattr(args, "set_after", [])]
    return args


def _add_pipeline_commands(command) -> None:
    from pipelines.detect_stages import STAGES as DETECT_STAGES
    from pipelines.stages import STAGES

    r = command("run", help="run pipeline stages (what each DVC stage calls); stages in cluster.submit "
                            "run as a job on the cluster")
    r.add_argument("stages", nargs="+", choices=[*STAGES, *(s for s in DETECT_STAGES if s not in STAGES), "all"],
                   metavar="STAGE", help=f"one or more of {', '.join(STAGES)} (detection pipeline: "
                                         f"{', '.join(DETECT_STAGES)}), or all")
    r.add_argument("--local", action="store_true", help="run here even if cluster.submit lists the stage")
    r.add_argument("--export", metavar="URI", help="afterwards copy the stages' outputs to this path or s3:// URI")
    r.set_defaults(func=cmd_run)
    sb = command("submit", help="run pipeline stages as one Ray job on a cluster: upload the project, "
                                "stream the logs, fetch the outputs, exit with the job's status")
    sb.add_argument("stages", nargs="+", choices=[*STAGES, "all"], metavar="STAGE")
    sb.add_argument("--address", **ADDRESS)
    sb.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sb.add_argument("--no-fetch", action="store_true", help="leave the outputs in cluster.artifacts")
    sb.set_defaults(func=cmd_submit)


ADDRESS = dict(help="Ray cluster (Jobs API), e.g. http://127.0.0.1:8265; default $RESOPS_CLUSTER_ADDRESS, "
                    "cluster.address, then Ray's RAY_ADDRESS")


def _add_job_commands(command) -> None:
    for name, func, helptext in (("status", cmd_status, "a job's status (exit 1 if it failed)"),
                                 ("logs", cmd_logs, "a job's logs"), ("stop", cmd_stop, "stop a job")):
        jp = command(name, help=helptext)
        jp.add_argument("job", help="submission id (printed by resops submit)")
        jp.add_argument("--address", **ADDRESS)
        if name == "status":
            jp.add_argument("--json", action="store_true")
        if name == "logs":
            jp.add_argument("-f", "--follow", action="store_true", help="stream until the job ends; exit with its status")
        jp.set_defaults(func=func)
    jl = command("jobs", help="the cluster's resops jobs")
    jl.add_argument("--address", **ADDRESS)
    jl.set_defaults(func=cmd_jobs)


def _add_serving_commands(command) -> None:
    s = command("serve", help="serve the promoted models (edge + cloud tiers) with Ray Serve (127.0.0.1 by default)")
    s.add_argument("--config", default="models/serve/serve_config.yaml",
                   help="Serve config written by the calibrate stage (default: models/serve/serve_config.yaml)")
    s.add_argument("--mode", choices=["edge", "cloud", "cascade"], help="default routing mode (default: serve.default_mode)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)

    pr = command("predict", help="send an image to a running resops server and print the answer")
    pr.add_argument("file")
    pr.add_argument("--detect", action="store_true", help="a detection app: POST /detect (boxes)")
    pr.add_argument("--score-threshold", type=float, help="--detect: lowest box score to return")
    pr.add_argument("--url", default="http://127.0.0.1:8000")
    pr.add_argument("--mode", choices=["edge", "cloud", "cascade"], help="routing mode (default: the server's)")
    pr.add_argument("--threshold", type=float, help="cascade escalation threshold (default: the calibrated one)")
    pr.add_argument("--token-env", default="RESOPS_API_TOKEN",
                    help="environment variable holding the bearer token, if the server needs one")
    pr.add_argument("--timeout", type=float, default=30.0)
    pr.add_argument("--explain", action="store_true",
                    help="POST /explain: the cloud model's answer and its Grad-CAM heat map over the image, saved as -o")
    pr.add_argument("-o", "--output", help="--explain: where to write the heat map PNG (default: FILE.gradcam.png here)")
    pr.set_defaults(func=cmd_predict)
    fb = command("feedback", help="what serving kept (serve.feedback): export it as a <class>/<image> tree "
                                         "for labelling and `dvc add`")
    fbs = fb.add_subparsers(dest="feedback_command", required=True)
    fe = fbs.add_parser("export", help="the store's images as <to>/<class>/<image> (class: the cloud's answer, "
                                       "else the edge's) plus manifest.csv with their provenance")
    fe.add_argument("--from", dest="source", help="the feedback store, a directory or s3:// URI "
                                                  "(default: serve.feedback.location)")
    fe.add_argument("--to", required=True, help="the folder to write, e.g. data/extra/feedback-2026-12")
    fe.add_argument("--corrections", help="CSV of sha256,label rows: labels a person gave (label_source person)")
    fe.set_defaults(func=cmd_feedback_export)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resops")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
