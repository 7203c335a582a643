"""Serving benchmark: the cloud-edge Serve app and the ``resops edge`` device runtime under load over
real HTTP, against two plain FastAPI baselines, side by side in one run.

Systems (each measured with the same requests, one after the other, never two at once):

* ``fastapi-full``: the full (cloud) model in a plain single-process FastAPI app under uvicorn (a
  subprocess): decode and preprocess like the tiers (``AugmentOperator(policy=None,
  output="tensor")``), the torch model unbatched, one request at a time in one worker thread,
  ``torch.set_num_threads(2)``, the cloud temperature. What a user writes without resops.
* ``fastapi-edge``: the same app running the int8 ONNX edge model in ONNX Runtime (1 thread).
* ``ray-serve``: the app ``resops serve`` deploys, from the Serve config the ``calibrate`` stage
  writes (``--config``), deployed with ``components.serve.config.deploy_config`` (Serve's REST API)
  on a local Ray started here (2 CPUs, the ``edge``/``cloud`` resources, the environment of
  params.yaml ``ray.env`` as ``resops serve`` gives it, plus ``--serve-env``), modes edge, cloud, cascade.
* ``resops-edge``: the device runtime (``resops-edge`` subprocess, the calibrate stage's bundle
  ``models/serve/edge``) with the Serve app as its cloud (``--cloud-url``), modes edge, cloud, cascade.

Requests are the ELPV test images of the prepared data (``--data``: split ``test`` of its shards,
656 images), shuffled once (seed 0), sent as-is (the PNG as the raw body) to ``POST /predict?mode=``.
Per cell (system, mode, concurrency C in ``--concurrency``, default 1,8,32) a closed-loop load
generator (asyncio + httpx, C workers pulling from one queue) sends ``--requests`` requests (default:
every test image once) after ``--warmup`` unmeasured ones per mode, for at most ``--max-seconds``.
Reported per cell: errors (non-200 or exceptions), 5xx, accuracy against the true label, share
answered at the edge, degraded answers, client latency mean / p50 / p95 / p99, throughput, and the
per-hop breakdown: the server's own ``latency_ms`` (edge, cloud, total inside the ingress) and what
lies outside it (client - total: HTTP, proxy, queueing before the ingress).

Then, with the Serve app still up:

* soak: ``--soak-seconds`` (default 60) of cascade at 32 clients against ray-serve: 5xx count, p99;
* outage: ``resops-edge`` in cascade mode at 8 clients while the cloud goes away: after a third of the
  requests the cloud's front door is killed (SIGKILL: Serve's proxy actor, and with HAProxy ingress the
  HAProxy manager and its haproxy processes; Serve starts them again). Every answer must
  be a 200 (degraded while the cloud is away) or a 4xx; afterwards the outbox must drain: every queued
  input resent (counted from ``GET /outbox``).

The acceptance of issue 16 is checked against the baselines of the same run and printed.

    python benchmarks/serve.py [--config models/serve/serve_config.yaml] [--bundle models/serve/edge]
        [--data data/prepared] [--concurrency 1,8,32] [--requests N] [--soak-seconds 60]
        [--systems fastapi-full,fastapi-edge,ray-serve,resops-edge] [--out FILE]

Prints Markdown tables and writes benchmarks/results/serve.json.
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
                    setup_environment, wait_healthy, write_json)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402  module level: the baseline's annotations resolve here
from fastapi.responses import JSONResponse  # noqa: E402

MODES = ("edge", "cloud", "cascade")
FULL, EDGE_BASE, RAY_SERVE, EDGE_RT = "fastapi-full", "fastapi-edge", "ray-serve", "resops-edge"
SYSTEMS = (FULL, EDGE_BASE, RAY_SERVE, EDGE_RT)


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
async def _load(url: str, items: list[tuple[bytes, str]], n: int | None, concurrency: int, max_seconds: float,
                timeout: float, events: list | None = None) -> tuple[list[dict], int, float]:
    """``n`` requests (cycling through ``items``; None: until ``max_seconds``) by ``concurrency``
    closed-loop workers. ``events``: ``(after_n_sent, callable)`` run once (in a thread) when that many
    requests have been sent, e.g. killing a process mid-run.

    Returns (one record per request sent, number not sent because ``max_seconds`` ran out, wall seconds).
    """
    counter = {"next": 0}
    records: list[dict] = []
    pending = sorted(events or [], key=lambda e: e[0])
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    deadline = start + max_seconds
    fired: list[asyncio.Task] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            i = counter["next"]
            if n is not None and i >= n:
                return
            counter["next"] += 1
            while pending and i >= pending[0][0]:
                fired.append(asyncio.create_task(asyncio.to_thread(pending.pop(0)[1])))
            data, truth = items[i % len(items)]
            rec = {"truth": truth, "status": None, "tier": None, "label": None, "error": None, "degraded": False,
                   "server_ms": None}
            t0 = time.perf_counter()
            try:
                resp = await client.post(url, content=data, headers={"content-type": "image/png"})
                rec["status"] = resp.status_code
                body = resp.json()
                if resp.status_code == 200:
                    rec["tier"], rec["label"] = body.get("tier"), body.get("label")
                    rec["degraded"] = bool(body.get("degraded"))
                    rec["server_ms"] = body.get("latency_ms")
                else:
                    rec["error"] = f"HTTP {resp.status_code}: {str(body.get('error', body))[:200]}"
            except Exception as exc:  # timeouts, refused connections, bad JSON: an error, never a crash
                rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rec["latency_ms"] = (time.perf_counter() - t0) * 1000.0
            records.append(rec)

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    await asyncio.gather(*fired)
    not_sent = max(0, (n or 0) - counter["next"])
    return records, not_sent, time.perf_counter() - start


def _hops(ok: list[dict]) -> dict | None:
    """Mean per-hop time of the answers: the server's own latency_ms keys, and client - server total."""
    timed = [r for r in ok if isinstance(r["server_ms"], dict) and "total" in r["server_ms"]]
    if not timed:
        return None
    keys = sorted({k for r in timed for k in r["server_ms"]})
    out = {f"{k}_ms": float(np.mean([r["server_ms"][k] for r in timed if k in r["server_ms"]])) for k in keys}
    out["outside_ms"] = float(np.mean([r["latency_ms"] - r["server_ms"]["total"] for r in timed]))
    return out


def run_cell(url: str, items, n: int | None, concurrency: int, max_seconds: float, timeout: float,
             events: list | None = None) -> dict:
    """One (system, mode, concurrency) cell: the load, then its summary."""
    load_before = os.getloadavg()[0]
    records, not_sent, wall = asyncio.run(_load(url, items, n, concurrency, max_seconds, timeout, events))
    ok = [r for r in records if r["status"] == 200 and r["error"] is None]
    errors = [r for r in records if r not in ok]
    lat = np.array([r["latency_ms"] for r in ok])
    stat = lambda f: float(f(lat)) if ok else None  # noqa: E731
    statuses: dict[str, int] = {}
    for r in records:
        key = str(r["status"]) if r["status"] is not None else "no answer"
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "concurrency": concurrency, "requests_planned": n, "sent": len(records), "not_sent": not_sent,
        "ok": len(ok), "errors": len(errors), "error_samples": sorted({r["error"] for r in errors})[:5],
        "status_counts": statuses, "http_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "no_answer": statuses.get("no answer", 0), "degraded": sum(r["degraded"] for r in ok),
        "accuracy": float(np.mean([r["label"] == r["truth"] for r in ok])) if ok else None,
        "edge_share": float(np.mean([r["tier"] == "edge" for r in ok])) if ok else None,
        "latency_ms": {"mean": stat(np.mean), **{f"p{q}": stat(lambda a, q=q: np.percentile(a, q))
                                                 for q in (50, 95, 99)}, "max": stat(np.max)},
        "hops_ms": _hops(ok), "throughput_rps": len(ok) / wall if wall > 0 else None, "wall_seconds": wall,
        "load_average_before": load_before,
    }


def measure(system: str, base: str, modes, items, args) -> list[dict]:
    rows = []
    for mode in modes:
        url = f"{base}/predict" + ("" if system in (FULL, EDGE_BASE) else f"?mode={mode}")
        if args.warmup:
            run_cell(url, items, args.warmup, min(4, args.warmup), args.max_seconds, args.timeout)
        for c in args.concurrency:
            row = {"system": system, "mode": mode, **run_cell(url, items, args.requests, c, args.max_seconds,
                                                               args.timeout)}
            say(f"{system} {mode} c={c}: {row['ok']}/{row['requests_planned']} ok, {row['errors']} errors, "
                f"accuracy {_f(row['accuracy'])}, p50 {_f(row['latency_ms']['p50'], 1)} ms, mean "
                f"{_f(row['latency_ms']['mean'], 1)} ms, {_f(row['throughput_rps'], 1)} req/s")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ baselines
def baseline_server(kind: str, model_path: str, onnx_path: str | None, temperature: float, port: int,
                    threads: int) -> None:
    """A plain baseline: one process, one worker thread, the model unbatched (torch, or ORT for the edge)."""
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
    if kind == "edge":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])
        inp, out = session.get_inputs()[0].name, session.get_outputs()[0].name

        def logits_of(x: np.ndarray) -> np.ndarray:
            return session.run([out], {inp: x})[0]
    else:
        def logits_of(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float().numpy()
    names = [str(n) for n in meta["class_names"]]
    op = AugmentOperator(policy=None, output="tensor", image_size=int(meta["image_size"]),
                         in_chans=int(meta["in_chans"]))
    pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,))

    def infer(data: bytes) -> dict:
        x = op({"image": np.array([data], dtype=object), "label": np.array([0])})["image"]
        probs = softmax(logits_of(x), temperature)[0]
        i = int(np.argmax(probs))
        return {"label": names[i], "label_index": i, "confidence": float(probs[i]), "tier": "baseline"}

    app = FastAPI(title=f"resops plain baseline ({kind})")

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


def run_baseline(system: str, model_path: Path, onnx_path: Path | None, temperature: float, items, args) -> list[dict]:
    port = _free_port()
    kind = "edge" if system == EDGE_BASE else "full"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-server", kind, "--baseline-model",
           str(model_path), "--baseline-temperature", str(temperature), "--baseline-port", str(port),
           "--baseline-threads", "1" if kind == "edge" else "2"]
    if onnx_path is not None:
        cmd += ["--baseline-onnx", str(onnx_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 300.0, proc)  # a busy machine imports torch slowly
        say(f"{system} (pid {proc.pid}) on 127.0.0.1:{port}: {(onnx_path or model_path).name}, T={temperature:g}")
        return measure(system, f"http://127.0.0.1:{port}", [kind], items, args)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


# ------------------------------------------------------------------------------ Ray Serve + resops edge
FRONT_DOORS = ("ProxyActor", "HAProxyManager")  # Serve's HTTP proxy actor, or the manager of its HAProxy


def kill_serve_proxy() -> dict:
    """SIGKILL the cloud's front door: Serve's HTTP proxy process, or with ``RAY_SERVE_ENABLE_HA_PROXY``
    the HAProxy manager and the haproxy processes it runs. Serve's controller starts a new one."""
    import signal

    import psutil
    from ray.util.state import list_actors

    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000) if a.class_name in FRONT_DOORS]
    pids = []
    for a in actors:
        try:
            children = psutil.Process(int(a.pid)).children(recursive=True)  # haproxy under its manager
        except psutil.NoSuchProcess:
            children = []
        pids += [int(a.pid), *(c.pid for c in children)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    say(f"outage: killed the Serve front door ({', '.join(sorted({a.class_name for a in actors}))}): pids {pids}")
    return {"killed": sorted({a.class_name for a in actors}), "killed_pids": pids, "at_perf_counter": time.perf_counter()}


def outbox_state(base: str) -> dict:
    return httpx.get(f"{base}/outbox", params={"recent": 0}, timeout=10.0, trust_env=False).json()


def run_outage(edge_base: str, items, args) -> dict:
    """resops-edge in cascade at 8 clients; the cloud's proxy is killed after a third of the requests."""
    n = args.outage_requests
    before = outbox_state(edge_base)
    killed: dict = {}
    row = run_cell(f"{edge_base}/predict?mode=cascade", items, n, 8, args.max_seconds, args.timeout,
                   events=[(n // 3, lambda: killed.update(kill_serve_proxy()))])
    t0 = time.perf_counter()
    deadline = t0 + args.drain_seconds
    while outbox_state(edge_base)["pending"] > 0 and time.perf_counter() < deadline:
        time.sleep(0.5)
    after = outbox_state(edge_base)
    bad = {k: v for k, v in row["status_counts"].items() if not (k == "200" or k.startswith("4"))}
    out = {**row, "killed": killed, "outbox_before": before, "outbox_after": after,
           "queued_during_run": after["queued"] - before["queued"],
           "resent_after": after["resent"] - before["resent"], "dropped": after["dropped"] - before["dropped"],
           "drain_seconds": time.perf_counter() - t0, "answers_not_200_or_4xx": sum(bad.values())}
    out["all_answered"] = out["answers_not_200_or_4xx"] == 0
    out["all_resent"] = after["pending"] == 0 and out["dropped"] == 0 and out["resent_after"] == out["queued_during_run"]
    say(f"outage: {row['status_counts']} statuses, {row['degraded']} degraded, {out['queued_during_run']} queued, "
        f"{out['resent_after']} resent in {out['drain_seconds']:.1f} s, {out['dropped']} dropped")
    return out


def start_edge_runtime(bundle: Path, cloud_url: str, outbox: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "components.edge.cli", "--bundle", str(bundle), "--cloud-url", cloud_url,
           "--port", str(port), "--outbox", str(outbox), "--resend-interval", "1", "--timeout", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, 120.0, proc)
    return proc, base


def replay_check(base: str, items, replay_file: Path, timeout: float) -> dict | None:
    """Every test image once, in cascade mode at the replayed threshold, against the calibrate stage's
    offline replay of the same model version (components.evaluate.replay): the agreement rates."""
    import json

    from components.evaluate.replay import agreement

    if not replay_file.exists():
        say(f"no offline replay at {replay_file} (run the calibrate stage): agreement not measured")
        return None
    replay = json.loads(replay_file.read_text())
    served = []
    with httpx.Client(base_url=base, timeout=timeout, trust_env=False) as client:
        for data, _ in items:
            r = client.post("/predict", params={"mode": "cascade", "threshold": replay["threshold"]}, content=data,
                            headers={"content-type": "image/png"})
            served.append((data, r.json() if r.status_code == 200 else {"status": r.status_code}))
    out = agreement(replay, served)
    versions = {v for _, got in served for v in (got.get("model_versions") or {}).values()}
    out["served_model_versions"] = sorted(versions)
    out["same_version"] = versions == {replay["model_version"]}
    say(f"offline replay agreement over {out['n']} test images: label {out['label_agreement']:.2%}, tier "
        f"{out['tier_agreement']:.2%} (replayed version {replay['model_version']}, served {sorted(versions)})")
    return out


def run_serve(config: dict, items, args) -> tuple[list[dict], dict, dict | None, dict | None, dict | None]:
    setup_environment()
    import tempfile

    import ray
    from ray import serve

    from components.serve.config import deploy_config

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # The dashboard carries Serve's REST API (deploy_config). log_to_driver=False: replicas still log
    # (access log included) to their files, not one line per request here.
    context = ray.init(**{**RAY_INIT, "include_dashboard": True}, resources={"edge": 1, "cloud": 1},
                       dashboard_port=_free_port(), logging_level=logging.WARNING, log_to_driver=False)
    rows, soak, outage = [], None, None
    try:
        t0 = time.perf_counter()
        deploy_config(config, base_dir=ROOT, host="127.0.0.1", port=port, dashboard=context.dashboard_url)
        wait_healthy(base, 120.0)
        say(f"Serve app healthy on {base} after {time.perf_counter() - t0:.0f} s")
        models = httpx.get(f"{base}/models", timeout=10.0, trust_env=False).json()
        replay = replay_check(base, items, ROOT / args.replay, args.timeout) if RAY_SERVE in args.systems else None
        if RAY_SERVE in args.systems:
            rows += measure(RAY_SERVE, base, MODES, items, args)
        if EDGE_RT in args.systems:
            with tempfile.TemporaryDirectory(prefix="resops-edge-outbox-") as outbox:
                proc, edge_base = start_edge_runtime(ROOT / args.bundle, base, Path(outbox))
                try:
                    say(f"resops-edge (pid {proc.pid}) on {edge_base}, cloud {base}")
                    rows += measure(EDGE_RT, edge_base, MODES, items, args)
                    if args.soak_seconds:
                        soak = {"system": RAY_SERVE, "mode": "cascade",
                                **run_cell(f"{base}/predict?mode=cascade", items, None, 32, args.soak_seconds,
                                           args.timeout)}
                        say(f"soak {args.soak_seconds:g} s at 32 clients: {soak['ok']} ok, {soak['http_5xx']} 5xx, "
                            f"p99 {_f(soak['latency_ms']['p99'], 1)} ms")
                    if args.outage_requests:
                        outage = run_outage(edge_base, items, args)
                finally:
                    _stop(proc)
        return rows, models, soak, outage, replay
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ------------------------------------------------------------------------------ output
def _f(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def acceptance(rows: list[dict], soak: dict | None, outage: dict | None) -> list[dict]:
    """Issue 16's figures, each against the baseline of this run (None where a cell did not run)."""
    cell = {(r["system"], r["mode"], r["concurrency"]): r for r in rows}

    def get(system, mode, c, *path):
        r = cell.get((system, mode, c))
        for key in path:
            r = None if r is None else r.get(key)
        return r

    checks = []

    def check(name, value, limit, ok):
        checks.append({"check": name, "value": value, "limit": limit,
                       "passed": None if value is None or limit is None else bool(ok(value, limit))})

    full_p50, edge_p50 = get(FULL, "full", 1, "latency_ms", "p50"), get(EDGE_BASE, "edge", 1, "latency_ms", "p50")
    full_mean, full_rps8 = get(FULL, "full", 1, "latency_ms", "mean"), get(FULL, "full", 8, "throughput_rps")
    for system in (RAY_SERVE, EDGE_RT):
        check(f"{system} edge p50 at c=1 <= fastapi-edge p50 + 3 ms", get(system, "edge", 1, "latency_ms", "p50"),
              None if edge_p50 is None else edge_p50 + 3.0, lambda v, lim: v <= lim)
        check(f"{system} cloud p50 at c=1 <= fastapi-full p50 + 5 ms", get(system, "cloud", 1, "latency_ms", "p50"),
              None if full_p50 is None else full_p50 + 5.0, lambda v, lim: v <= lim)
        check(f"{system} cascade mean at c=1 <= 0.7 x fastapi-full mean", get(system, "cascade", 1, "latency_ms",
                                                                              "mean"),
              None if full_mean is None else 0.7 * full_mean, lambda v, lim: v <= lim)
        check(f"{system} cascade req/s at c=8 >= 1.5 x fastapi-full", get(system, "cascade", 8, "throughput_rps"),
              None if full_rps8 is None else 1.5 * full_rps8, lambda v, lim: v >= lim)
        cas, cloud = get(system, "cascade", 1, "accuracy"), get(system, "cloud", 1, "accuracy")
        check(f"{system} cascade accuracy at c=1 >= cloud-only - 1 point", cas,
              None if cloud is None else cloud - 0.01, lambda v, lim: v >= lim)
    if soak is not None:
        check(f"soak {soak['wall_seconds']:.0f} s at 32 clients: 5xx", soak["http_5xx"], 0, lambda v, lim: v <= lim)
        check("soak: requests without an answer", soak["no_answer"], 0, lambda v, lim: v <= lim)
    if outage is not None:
        check("outage: answers that are neither 200 nor 4xx", outage["answers_not_200_or_4xx"], 0,
              lambda v, lim: v <= lim)
        check("outage: queued inputs not resent", outage["queued_during_run"] - outage["resent_after"]
              + outage["outbox_after"]["pending"], 0, lambda v, lim: v <= lim)
    return checks


def print_report(rows: list[dict], checks: list[dict], tiers: dict, app_args: dict, items, args, env: dict) -> None:
    headers = ["system", "mode", "c", "n", "errors", "accuracy", "edge share", "mean ms", "p50 ms", "p95 ms",
               "p99 ms", "req/s", "in ingress ms", "outside ms"]
    table = [[r["system"], r["mode"], r["concurrency"],
              f"{r['ok']}" + (f" ({r['not_sent']} not sent)" if r["not_sent"] else ""), r["errors"],
              _f(r["accuracy"]), _f(r["edge_share"], 2), *(_f(r["latency_ms"][k], 1) for k in ("mean", "p50", "p95",
                                                                                                  "p99")),
              _f(r["throughput_rps"], 1), _f((r["hops_ms"] or {}).get("total_ms"), 1),
              _f((r["hops_ms"] or {}).get("outside_ms"), 1)] for r in rows]
    print(f"\nELPV test split, {len(items)} images sent as PNG bodies over HTTP to 127.0.0.1; model version "
          f"{app_args.get('model_version')}; edge {tiers.get('edge', {}).get('backend')} "
          f"({tiers.get('edge', {}).get('placement')}), cloud {tiers.get('cloud', {}).get('backend')}; cascade "
          f"threshold {app_args.get('threshold'):.3f}. Closed loop, {args.requests} requests per cell after "
          f"{args.warmup} warm-up requests per mode; latency client-side over successful answers. {env['cpus']} "
          f"CPUs, load average {env['load_average_at_start'][0]:.2f} at start, "
          f"{env['load_average_at_end'][0]:.2f} at end, {env['wall_seconds']:.0f} s.\n")
    print(markdown_table(headers, table))
    print("\nAcceptance (issue 16), against this run's baselines:")
    for c in checks:
        verdict = {True: "passes", False: "FAILS", None: "not measured"}[c["passed"]]
        value = c["value"] if not isinstance(c["value"], float) else round(c["value"], 3)
        limit = c["limit"] if not isinstance(c["limit"], float) else round(c["limit"], 3)
        print(f"- {c['check']}: {value} (limit {limit}) -> {verdict}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="models/serve/serve_config.yaml")
    ap.add_argument("--bundle", default="models/serve/edge", help="the edge bundle resops-edge runs")
    ap.add_argument("--data", default="data/prepared", help="prepared data directory (its shards' test split)")
    ap.add_argument("--replay", default="models/serve/replay.json",
                    help="the calibrate stage's offline replay of the cascade on the test split: every served answer "
                         "is compared with it")
    ap.add_argument("--systems", type=lambda s: [m for m in s.split(",") if m], default=list(SYSTEMS))
    ap.add_argument("--concurrency", type=lambda s: parse_ints(s, "--concurrency"), default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=None, help="per cell (default: every test image once)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop sending in a cell after this long")
    ap.add_argument("--warmup", type=int, default=16, help="unmeasured requests per mode before measuring")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    ap.add_argument("--soak-seconds", type=float, default=60.0, help="0: no soak")
    ap.add_argument("--outage-requests", type=int, default=600, help="0: no outage run")
    ap.add_argument("--drain-seconds", type=float, default=120.0, help="how long the outbox may take to drain")
    ap.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the Ray started for Serve, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (repeatable)")
    ap.add_argument("--no-params-env", action="store_true",
                    help="do not apply params.yaml ray.env (Serve's HAProxy ingress) to the Ray started for Serve")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    ap.add_argument("--baseline-server", choices=["full", "edge"], help=argparse.SUPPRESS)  # internal: subprocess
    ap.add_argument("--baseline-model", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-onnx", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-temperature", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-threads", type=int, default=2, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    if args.baseline_server:
        return baseline_server(args.baseline_server, args.baseline_model, args.baseline_onnx,
                               args.baseline_temperature, args.baseline_port, threads=args.baseline_threads)
    if bad := [m for m in args.systems if m not in SYSTEMS]:
        ap.error(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}")

    from components.serve.config import load_serve_config

    t_start = time.perf_counter()
    env = environment_info()
    config_path = (ROOT / args.config).resolve()
    config = load_serve_config(config_path)
    app_args = config["applications"][0]["args"]
    items = elpv_test_images(ROOT / args.data)
    args.requests = args.requests or len(items)
    say(f"{len(items)} test images from {args.data}; {args.requests} requests per cell, systems {args.systems}, "
        f"concurrency {args.concurrency}")

    rows = []
    temps = app_args.get("temperatures") or {}
    # Baselines before Ray: they never share the cores with it.
    if FULL in args.systems:
        rows += run_baseline(FULL, ROOT / app_args["cloud_model"], None, float(temps.get("cloud", 1.0)), items, args)
    if EDGE_BASE in args.systems and app_args.get("edge_onnx"):
        rows += run_baseline(EDGE_BASE, ROOT / app_args["edge_model"], ROOT / app_args["edge_onnx"],
                             float(temps.get("edge", 1.0)), items, args)
    models, soak, outage, replay = None, None, None, None
    if {RAY_SERVE, EDGE_RT} & set(args.systems):
        # The environment `resops serve` gives its local Ray (params.yaml ray.env: Serve's HAProxy
        # ingress), then --serve-env on top; read by Serve's processes when they start: before ray.init.
        import yaml

        env_items = [] if args.no_params_env else [
            f"{k}={v}" for k, v in (yaml.safe_load((ROOT / "params.yaml").read_text())["ray"].get("env") or {}).items()]
        for item in env_items + args.serve_env:
            key, _, value = item.partition("=")
            os.environ[key] = value
        args.serve_env = env_items + args.serve_env
        serve_rows, models, soak, outage, replay = run_serve(config, items, args)
        rows += serve_rows
    checks = acceptance(rows, soak, outage)

    env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env["load_average_at_end"] = os.getloadavg()
    env["wall_seconds"] = time.perf_counter() - t_start
    tiers = {t: models[t] for t in ("edge", "cloud")} if models else {}
    print_report(rows, checks, tiers, app_args, items, args, env)

    write_json(args.out, {
        "benchmark": "serve", "config": str(config_path), "data": str(args.data), "test_images": len(items),
        "settings": {"systems": args.systems, "concurrency": args.concurrency, "requests_per_cell": args.requests,
                     "max_seconds_per_cell": args.max_seconds, "warmup_per_mode": args.warmup,
                     "timeout_s": args.timeout, "shuffle_seed": 0, "soak_seconds": args.soak_seconds,
                     "outage_requests": args.outage_requests, "serve_env": args.serve_env,
                     "ray_init": {**RAY_INIT, "include_dashboard": True, "resources": {"edge": 1, "cloud": 1},
                                  "log_to_driver": False},
                     "baselines": "FastAPI + uvicorn, 1 process, 1 worker thread, unbatched; full: torch 2 threads; "
                                  "edge: ONNX Runtime 1 thread"},
        "app": {k: app_args.get(k) for k in ("model_version", "threshold", "temperatures", "default_mode",
                                             "cloud_model", "edge_model", "edge_onnx", "edge", "cloud", "router")},
        "tiers": tiers, "environment": env, "results": rows, "soak": soak, "outage": outage, "acceptance": checks,
        "replay_agreement": replay,
    })


if __name__ == "__main__":
    main()
