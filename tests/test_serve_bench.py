"""benchmarks/serve.py without Ray: the load generator, the plain FastAPI baseline and the verdict."""
from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from components.data.images import encode_png
from components.models import create_model, save_model
from conftest import free_port

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # `import common` of the benchmark
_spec = importlib.util.spec_from_file_location("serve_bench", BENCH / "serve.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

CLASSES = ["ok", "crack", "finger"]


def _items(n: int) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(0)
    return [(encode_png(rng.integers(0, 256, size=(40, 48), dtype=np.uint8)), CLASSES[i % 3]) for i in range(n)]


def test_baselines_under_load(tmp_path):
    """The two plain FastAPI baselines (torch full model; int8-free ONNX here, same code path) answer under load."""
    from components.prune import export_onnx

    meta = {"model_name": "resnet18", "num_classes": 3, "in_chans": 1, "image_size": 32, "class_names": CLASSES}
    torch.manual_seed(0)
    net = create_model("resnet18", num_classes=3, in_chans=1).eval()
    model = save_model(tmp_path / "full.pt", net, meta)
    onnx = tmp_path / "edge.onnx"
    export_onnx(net, onnx, 32, 1)
    items = _items(9) + [(b"not an image", "ok")]
    args = Namespace(warmup=2, concurrency=[1, 4], requests=12, max_seconds=60.0, timeout=30.0)
    rows = bench.run_baseline(bench.FULL, model, None, 2.0, items, args)
    rows += bench.run_baseline(bench.EDGE_BASE, model, onnx, 2.0, items, args)
    assert [(r["system"], r["concurrency"]) for r in rows] == [(bench.FULL, 1), (bench.FULL, 4), (bench.EDGE_BASE, 1),
                                                              (bench.EDGE_BASE, 4)]
    labels = {}
    for r in rows:
        # 12 requests cycle through 10 items: the undecodable one (the last) is sent once -> one 415 answer
        assert (r["sent"], r["not_sent"], r["ok"], r["errors"]) == (12, 0, 11, 1)
        assert r["status_counts"] == {"200": 11, "415": 1} and r["http_5xx"] == 0
        assert r["error_samples"] and r["error_samples"][0].startswith("HTTP 415")
        assert 0.0 <= r["accuracy"] <= 1.0 and r["edge_share"] == 0.0
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] and r["throughput_rps"] > 0
        labels.setdefault(r["system"], r["accuracy"])
    assert labels[bench.FULL] == labels[bench.EDGE_BASE]  # the same weights in torch and in ONNX Runtime


def test_cell_cap_refused_connections_and_events():
    url = f"http://127.0.0.1:{free_port()}/predict"  # nothing listens there
    capped = bench.run_cell(url, _items(3), 5, 2, max_seconds=0.0, timeout=2.0)
    assert (capped["sent"], capped["not_sent"], capped["errors"]) == (0, 5, 0)
    calls = []
    refused = bench.run_cell(url, _items(3), 5, 2, max_seconds=30.0, timeout=2.0,
                             events=[(2, lambda: calls.append("fired"))])
    assert (refused["sent"], refused["ok"], refused["errors"], refused["no_answer"]) == (5, 0, 5, 5)
    assert refused["accuracy"] is None and refused["latency_ms"]["mean"] is None and refused["hops_ms"] is None
    assert calls == ["fired"]  # once, mid-run


def test_acceptance_checks_against_the_baselines():
    def row(system, mode, c, p50=10.0, mean=10.0, rps=100.0, acc=0.8):
        return {"system": system, "mode": mode, "concurrency": c, "ok": 10, "accuracy": acc,
                "latency_ms": {"p50": p50, "mean": mean}, "throughput_rps": rps}

    rows = [row(bench.FULL, "full", 1, p50=10.0, mean=10.0), row(bench.FULL, "full", 8, rps=100.0),
            row(bench.EDGE_BASE, "edge", 1, p50=2.0),
            row(bench.RAY_SERVE, "edge", 1, p50=4.9), row(bench.RAY_SERVE, "cloud", 1, p50=15.5),
            row(bench.RAY_SERVE, "cascade", 1, mean=6.0, acc=0.795), row(bench.RAY_SERVE, "cascade", 8, rps=140.0)]
    soak = {"wall_seconds": 60.0, "http_5xx": 0, "no_answer": 0}
    outage = {"answers_not_200_or_4xx": 0, "queued_during_run": 7, "resent_after": 7, "outbox_after": {"pending": 0}}
    got = {c["check"]: c["passed"] for c in bench.acceptance(rows, soak, outage)}
    serve = {k.split(" ", 1)[1]: v for k, v in got.items() if k.startswith(bench.RAY_SERVE)}
    assert serve == {"edge p50 at c=1 <= fastapi-edge p50 + 3 ms": True,
                     "cloud p50 at c=1 <= fastapi-full p50 + 5 ms": False,  # 15.5 > 15
                     "cascade mean at c=1 <= 0.7 x fastapi-full mean": True,
                     "cascade req/s at c=8 >= 1.5 x fastapi-full": False,  # 140 < 150
                     "cascade accuracy at c=1 >= cloud-only - 1 point": True}
    assert all(v is None for k, v in got.items() if k.startswith(bench.EDGE_RT))  # not run: not measured
    assert got["soak 60 s at 32 clients: 5xx"] and got["outage: queued inputs not resent"]
    outage["resent_after"] = 6
    assert not {c["check"]: c["passed"] for c in bench.acceptance(rows, soak, outage)}["outage: queued inputs not resent"]
