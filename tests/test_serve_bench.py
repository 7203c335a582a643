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


def test_baseline_under_load(tmp_path):
    meta = {"model_name": "resnet18", "num_classes": 3, "in_chans": 1, "image_size": 32, "class_names": CLASSES}
    torch.manual_seed(0)
    model = save_model(tmp_path / "full.pt", create_model("resnet18", num_classes=3, in_chans=1), meta)
    items = _items(9) + [(b"not an image", "ok")]
    args = Namespace(warmup=2, concurrency=[1, 4], requests=12, max_seconds=60.0, timeout=30.0)
    rows = bench.run_baseline(model, 2.0, items, args)
    assert [(r["system"], r["concurrency"]) for r in rows] == [(bench.BASELINE, 1), (bench.BASELINE, 4)]
    for r in rows:
        # 12 requests cycle through 10 items: the undecodable one (the last) is sent once -> one 415 answer
        assert (r["sent"], r["not_sent"], r["ok"], r["errors"]) == (12, 0, 11, 1)
        assert r["error_samples"] and r["error_samples"][0].startswith("HTTP 415")
        assert 0.0 <= r["accuracy"] <= 1.0 and r["edge_share"] == 0.0
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] and r["throughput_rps"] > 0


def test_cell_cap_and_refused_connections():
    url = f"http://127.0.0.1:{free_port()}/predict"  # nothing listens there
    capped = bench.run_cell(url, _items(3), 5, 2, max_seconds=0.0, timeout=2.0)
    assert (capped["sent"], capped["not_sent"], capped["errors"]) == (0, 5, 0)
    refused = bench.run_cell(url, _items(3), 5, 2, max_seconds=30.0, timeout=2.0)
    assert (refused["sent"], refused["ok"], refused["errors"]) == (5, 0, 5)
    assert refused["accuracy"] is None and refused["latency_ms"]["mean"] is None


def test_verdict():
    def row(mode, c, acc, edge, mean):
        return {"system": bench.RAY_SERVE, "mode": mode, "concurrency": c, "ok": 10, "accuracy": acc,
                "edge_share": edge, "latency_ms": {"mean": mean}}

    rows = [row("cloud", 1, 0.80, 0.0, 20.0), row("cascade", 1, 0.795, 0.7, 10.0),
            row("cloud", 8, 0.80, 0.0, 20.0), row("cascade", 8, 0.78, 0.7, 10.0), row("edge", 32, 0.7, 1.0, 5.0)]
    v = {x["concurrency"]: x for x in bench.verdict(rows)}
    assert set(v) == {1, 8}
    assert v[1]["meets_goal"] and abs(v[1]["accuracy_gap_points"] + 0.5) < 1e-9 and v[1]["mean_latency_ratio"] == 0.5
    assert not v[8]["meets_goal"]  # 2 points below cloud
