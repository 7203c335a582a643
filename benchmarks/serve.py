"""Serving benchmark: the cloud-edge Serve app under load over real HTTP, against a plain FastAPI baseline.

The app is the one ``resops serve`` deploys: the Serve config the ``calibrate`` stage writes
(``--config``, default ``models/serve/serve_config.yaml``: the promoted models, calibration,
threshold, tier settings), deployed with ``components.serve.config.deploy_config`` on a local Ray
started here (2 CPUs, the ``edge`` and ``cloud`` custom resources, isolated from any other Ray on
the machine as ``benchmarks/common.start_ray`` explains), HTTP proxy on 127.0.0.1.

Requests are the ELPV test images of the prepared data (``--data``, default ``data/prepared``:
split ``test`` of its shards, 656 images), shuffled once (seed 0) and sent as-is (the encoded PNG
as the raw body, ``image/png``) to ``POST /predict?mode=edge|cloud|cascade``. Per mode and
concurrency C (``--concurrency``, default 1,8,32) a closed-loop load generator (asyncio + httpx,
C workers pulling from one queue) sends ``--requests`` requests (default: every test image once;
more cycle through them) after ``--warmup`` unmeasured ones per mode. A cell stops sending after
``--max-seconds`` (requests left are counted as "not sent", not as errors; requests in flight
finish). Reported per cell: errors (non-200 answers or exceptions, ``--timeout`` per request),
accuracy against the true label and share answered by the edge tier (over successful answers),
client-side latency mean / p50 / p95 / p99 and throughput (successful answers / wall time).

Baseline (``--no-baseline`` skips it): the same full (cloud) model in a plain single-process
FastAPI app under uvicorn (a subprocess, run before Ray starts so they never share the cores):
``POST /predict`` decodes and preprocesses like the tiers (``AugmentOperator(policy=None,
output="tensor")``) and runs the torch model unbatched, one request at a time in one worker thread
with ``torch.set_num_threads(2)``, applying the cloud temperature of the config.

The verdict compares cascade with cloud-only at each concurrency: accuracy gap (points), share
answered at the edge, mean latency ratio (goal: gap >= -1 point, edge share > 50 %, ratio < 1).

    python benchmarks/serve.py [--config models/serve/serve_config.yaml] [--data data/prepared]
        [--concurrency 1,8,32] [--modes edge,cloud,cascade] [--requests N] [--max-seconds 120]
        [--warmup 16] [--timeout 60] [--no-baseline] [--out FILE]

Prints a Markdown table and writes benchmarks/results/serve.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before anything imports ray: a loopback-only Ray

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

# benchmarks/common.py (importing it also puts the repository root on sys.path)
from common import (RAY_INIT, RESULTS, ROOT, _free_port, environment_info, markdown_table, parse_ints, say,  # noqa: E402
                    setup_environment, write_json)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402  module level: the baseline's annotations resolve here
from fastapi.responses import JSONResponse  # noqa: E402

MODES = ("edge", "cloud", "cascade")
BASELINE, RAY_SERVE = "fastapi-baseline", "ray-serve"
GOAL = {"accuracy_gap_points": -1.0, "edge_share": 0.5, "mean_latency_ratio": 1.0}


# ------------------------------------------------------------------------------ data
def elpv_test_images(prepared: Path, seed: int = 0) -> list[tuple[bytes, str]]:
    """(encoded image bytes, true class name) of the test split, shuffled once with ``seed``."""
    from components.data.shards import read_shards

    df = read_shards(Path(prepared) / "shards", columns=["image", "label_name", "split"], split="test")
    if df.empty:
        raise ValueError(f"{prepared}/shards has no test rows")
    order = np.random.default_rng(seed).permutation(len(df))
    return [(bytes(df["image"].iloc[i]), str(df["label_name"].iloc[i])) for i in order]


# -------------------------------------------------------------------------- load generator
async def _load(url: str, items: list[tuple[bytes, str]], n: int, concurrency: int, max_seconds: float,
                timeout: float) -> tuple[list[dict], int, float]:
    """``n`` requests (cycling through ``items``) by ``concurrency`` closed-loop workers.

    Returns (one record per request sent, number not sent because ``max_seconds`` ran out, wall seconds).
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            data, truth = items[i % len(items)]
            rec = {"truth": truth, "status": None, "tier": None, "label": None, "error": None}
            t0 = time.perf_counter()
            try:
                resp = await client.post(url, content=data, headers={"content-type": "image/png"})
                rec["status"] = resp.status_code
                body = resp.json()
                if resp.status_code == 200:
                    rec["tier"], rec["label"] = body.get("tier"), body.get("label")
                else:
                    rec["error"] = f"HTTP {resp.status_code}: {str(body.get('error', body))[:200]}"
            except Exception as exc:  # timeouts, refused connections, bad JSON: an error, never a crash
                rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rec["latency_ms"] = (time.perf_counter() - t0) * 1000.0
            records.append(rec)

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return records, queue.qsize(), time.perf_counter() - start


def run_cell(url: str, items, n: int, concurrency: int, max_seconds: float, timeout: float) -> dict:
    """One (system, mode, concurrency) cell: the load, then its summary."""
    load_before = os.getloadavg()[0]
    records, not_sent, wall = asyncio.run(_load(url, items, n, concurrency, max_seconds, timeout))
    ok = [r for r in records if r["status"] == 200 and r["error"] is None]
    errors = [r for r in records if r not in ok]
    lat = np.array([r["latency_ms"] for r in ok])
    stat = lambda f: float(f(lat)) if ok else None  # noqa: E731
    return {
        "concurrency": concurrency, "requests_planned": n, "sent": len(records), "not_sent": not_sent,
        "ok": len(ok), "errors": len(errors), "error_samples": sorted({r["error"] for r in errors})[:5],
        "accuracy": float(np.mean([r["label"] == r["truth"] for r in ok])) if ok else None,
        "edge_share": float(np.mean([r["tier"] == "edge" for r in ok])) if ok else None,
        "latency_ms": {"mean": stat(np.mean), **{f"p{q}": stat(lambda a, q=q: np.percentile(a, q))
                                                 for q in (50, 95, 99)}, "max": stat(np.max)},
        "throughput_rps": len(ok) / wall if wall > 0 else None, "wall_seconds": wall,
        "load_average_before": load_before,
    }


def wait_healthy(base: str, timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"{base}/healthz", timeout=5.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base}/healthz did not answer 200 within {timeout_s:.0f} s")


def measure(system: str, base: str, modes, items, args) -> list[dict]:
    rows = []
    for mode in modes:
        url = f"{base}/predict" + ("" if system == BASELINE else f"?mode={mode}")
        if args.warmup:
            run_cell(url, items, args.warmup, min(4, args.warmup), args.max_seconds, args.timeout)
        for c in args.concurrency:
            row = {"system": system, "mode": mode, **run_cell(url, items, args.requests, c, args.max_seconds,
                                                               args.timeout)}
            say(f"{system} {mode} c={c}: {row['ok']}/{row['requests_planned']} ok, {row['errors']} errors, "
                f"{row['not_sent']} not sent, accuracy {_f(row['accuracy'])}, mean {_f(row['latency_ms']['mean'], 1)} ms, "
                f"{_f(row['throughput_rps'], 1)} req/s")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ baseline
def baseline_server(model_path: str, temperature: float, port: int, threads: int) -> None:
    """The plain baseline: one process, one worker thread running the full model unbatched."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import uvicorn

    from components.augment.operator import AugmentOperator
    from components.data.images import ImageDecodeError
    from components.evaluate.calibration import softmax
    from components.models import load_model

    torch.set_num_threads(threads)
    model, meta = load_model(model_path)
    model = model.eval().to(memory_format=torch.channels_last)
    names = [str(n) for n in meta["class_names"]]
    op = AugmentOperator(policy=None, output="tensor", image_size=int(meta["image_size"]),
                         in_chans=int(meta["in_chans"]))
    pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,))

    def infer(data: bytes) -> dict:
        x = op({"image": np.array([data], dtype=object), "label": np.array([0])})["image"]
        with torch.inference_mode():
            logits = model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float().numpy()
        probs = softmax(logits, temperature)[0]
        i = int(np.argmax(probs))
        return {"label": names[i], "label_index": i, "confidence": float(probs[i]), "tier": "baseline"}

    app = FastAPI(title="resops plain baseline")

    @app.post("/predict")
    async def predict(request: Request):
        data = await request.body()
        if not data:
            return JSONResponse(status_code=400, content={"error": "empty request body"})
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, infer, data)
        except ImageDecodeError as exc:
            return JSONResponse(status_code=415, content={"error": str(exc)})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_baseline(model_path: Path, temperature: float, items, args) -> list[dict]:
    port = _free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-server", str(model_path),
           "--baseline-temperature", str(temperature), "--baseline-port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 300.0, proc)  # a busy machine imports torch slowly
        say(f"baseline FastAPI app (pid {proc.pid}) on 127.0.0.1:{port}: {model_path.name}, T={temperature:g}")
        return measure(BASELINE, f"http://127.0.0.1:{port}", ["full"], items, args)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------ Ray Serve
def run_serve(config: dict, items, args) -> tuple[list[dict], dict]:
    setup_environment()
    import ray
    from ray import serve

    from components.serve.config import deploy_config

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # log_to_driver=False: replicas still log (access log included) to their files, not one line per request here
    ray.init(**RAY_INIT, resources={"edge": 1, "cloud": 1}, dashboard_port=_free_port(),
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        deploy_config(config, base_dir=ROOT, host="127.0.0.1", port=port)
        wait_healthy(base, 120.0)
        say(f"Serve app healthy on {base} after {time.perf_counter() - t0:.0f} s")
        models = httpx.get(f"{base}/models", timeout=10.0, trust_env=False).json()
        return measure(RAY_SERVE, base, args.modes, items, args), models
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ------------------------------------------------------------------------------ output
def _f(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def verdict(rows: list[dict]) -> list[dict]:
    """Cascade against cloud-only at each concurrency where both ran."""
    out = []
    cell = {(r["system"], r["mode"], r["concurrency"]): r for r in rows}
    for c in sorted({r["concurrency"] for r in rows}):
        cas, cloud = cell.get((RAY_SERVE, "cascade", c)), cell.get((RAY_SERVE, "cloud", c))
        if not (cas and cloud and cas["ok"] and cloud["ok"]):
            continue
        v = {"concurrency": c, "accuracy_gap_points": 100 * (cas["accuracy"] - cloud["accuracy"]),
             "edge_share": cas["edge_share"],
             "mean_latency_ratio": cas["latency_ms"]["mean"] / cloud["latency_ms"]["mean"],
             "cascade_mean_ms": cas["latency_ms"]["mean"], "cloud_mean_ms": cloud["latency_ms"]["mean"]}
        v["meets_goal"] = bool(v["accuracy_gap_points"] >= GOAL["accuracy_gap_points"] and
                               v["edge_share"] > GOAL["edge_share"] and
                               v["mean_latency_ratio"] < GOAL["mean_latency_ratio"])
        out.append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="models/serve/serve_config.yaml")
    ap.add_argument("--data", default="data/prepared", help="prepared data directory (its shards' test split)")
    ap.add_argument("--concurrency", type=lambda s: parse_ints(s, "--concurrency"), default=[1, 8, 32])
    ap.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=list(MODES))
    ap.add_argument("--requests", type=int, default=None, help="per cell (default: every test image once)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop sending in a cell after this long")
    ap.add_argument("--warmup", type=int, default=16, help="unmeasured requests per mode before measuring")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    ap.add_argument("--baseline-server", metavar="MODEL", help=argparse.SUPPRESS)  # internal: the subprocess
    ap.add_argument("--baseline-temperature", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        return baseline_server(args.baseline_server, args.baseline_temperature, args.baseline_port, threads=2)
    if bad := [m for m in args.modes if m not in MODES]:
        ap.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")

    from components.serve.config import load_serve_config

    t_start = time.perf_counter()
    env = environment_info()
    config_path = (ROOT / args.config).resolve()
    config = load_serve_config(config_path)
    app_args = config["applications"][0]["args"]
    items = elpv_test_images(ROOT / args.data)
    args.requests = args.requests or len(items)
    say(f"{len(items)} test images from {args.data}; {args.requests} requests per cell, modes {args.modes}, "
        f"concurrency {args.concurrency}")

    rows, models = [], None
    if not args.no_baseline:  # before Ray: the two never share the cores
        temperature = float((app_args.get("temperatures") or {}).get("cloud", 1.0))
        rows += run_baseline(ROOT / app_args["cloud_model"], temperature, items, args)
    serve_rows, models = run_serve(config, items, args)
    rows += serve_rows
    checks = verdict(rows)

    env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env["load_average_at_end"] = os.getloadavg()
    env["wall_seconds"] = time.perf_counter() - t_start
    headers = ["system", "mode", "concurrency", "n", "errors", "accuracy", "edge share", "mean ms", "p50 ms",
               "p95 ms", "p99 ms", "req/s"]
    table = [[r["system"], r["mode"], r["concurrency"],
              f"{r['ok']}" + (f" ({r['not_sent']} not sent)" if r["not_sent"] else ""), r["errors"],
              _f(r["accuracy"]), _f(r["edge_share"], 2), *(_f(r["latency_ms"][k], 1) for k in ("mean", "p50", "p95",
                                                                                                  "p99")),
              _f(r["throughput_rps"], 1)] for r in rows]
    tiers = {t: models[t] for t in ("edge", "cloud")} if models else {}
    print(f"\nELPV test split, {len(items)} images sent as PNG bodies over HTTP to 127.0.0.1; model version "
          f"{app_args.get('model_version')}; edge {tiers.get('edge', {}).get('backend')} "
          f"({tiers.get('edge', {}).get('model_name')}), cloud {tiers.get('cloud', {}).get('backend')}; cascade "
          f"threshold {app_args.get('threshold'):.3f}. Closed loop, {args.requests} requests per cell after "
          f"{args.warmup} warm-up requests per mode; latency client-side over successful answers; n = successful "
          f"answers. {env['cpus']} CPUs, load average {env['load_average_at_start'][0]:.2f} at start, "
          f"{env['load_average_at_end'][0]:.2f} at end, {env['wall_seconds']:.0f} s.\n")
    print(markdown_table(headers, table))
    print(f"\nCascade vs cloud-only (goal: accuracy within {-GOAL['accuracy_gap_points']:g} point, most requests at the "
          f"edge, lower mean latency):")
    for v in checks:
        print(f"- c={v['concurrency']}: accuracy {v['accuracy_gap_points']:+.1f} points, edge share "
              f"{100 * v['edge_share']:.0f} %, mean latency {v['cascade_mean_ms']:.1f} vs {v['cloud_mean_ms']:.1f} ms "
              f"(ratio {v['mean_latency_ratio']:.2f}) -> {'meets' if v['meets_goal'] else 'does not meet'} the goal")
    if not checks:
        print("- not measured (needs both the cascade and the cloud mode)")

    write_json(args.out, {
        "benchmark": "serve", "config": str(config_path), "data": str(args.data), "test_images": len(items),
        "settings": {"modes": args.modes, "concurrency": args.concurrency, "requests_per_cell": args.requests,
                     "max_seconds_per_cell": args.max_seconds, "warmup_per_mode": args.warmup,
                     "timeout_s": args.timeout, "shuffle_seed": 0, "baseline": not args.no_baseline,
                     "ray_init": {**RAY_INIT, "resources": {"edge": 1, "cloud": 1}, "log_to_driver": False},
                     "baseline_server": "FastAPI + uvicorn, 1 process, 1 worker thread, unbatched torch, 2 threads"},
        "app": {k: app_args.get(k) for k in ("model_version", "threshold", "temperatures", "default_mode",
                                             "cloud_model", "edge_model", "edge_onnx", "edge", "cloud", "router")},
        "tiers": tiers, "environment": env, "results": rows, "verdict": checks, "goal": GOAL,
    })


if __name__ == "__main__":
    main()
