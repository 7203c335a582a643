"""The drift watch in the servers (serve.drift): a reference built from real ELPV images with a tiny model,
then 200 other ELPV images keep ``GET /drift`` quiet and 200 shifted inputs (brightness and contrast
changed; handwritten digits) raise it, over real HTTP through Serve's proxy and through the edge runtime.
The statistics themselves: tests/test_drift.py."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from ray import serve

from components.augment.operator import AugmentOperator
from components.data.images import decode_image, encode_png
from components.data.sources import _elpv_package_dir
from components.edge.app import create_app
from components.edge.bundle import load_bundle, write_bundle
from components.feedback.drift import input_histograms, load_reference
from components.feedback.reference import EmbeddingTap, drift_reference
from components.models import create_model, save_model
from components.prune import export_onnx, quantize_onnx
from components.serve.config import build_serve_config, deploy_config, load_serve_config, write_serve_config
from conftest import free_port, wait_healthy
from netutil import uvicorn_server

SIZE, CLASSES, THRESHOLD, WINDOW = 32, ["functional", "possibly_defective", "likely_defective", "defective"], 3.0, 200


def _tensors(images: list[bytes]) -> np.ndarray:
    op = AugmentOperator(policy=None, output="tensor", image_size=SIZE, in_chans=1)
    return op({"image": np.array(images, dtype=object), "label": np.zeros(len(images), dtype=np.int64)})["image"]


def _batches(images: list[bytes], n: int = 50):
    for i in range(0, len(images), n):
        yield {"image": torch.from_numpy(_tensors(images[i:i + n]))}


@pytest.fixture(scope="module")
def elpv():
    """Real EL images of solar cells: 300 for the reference's training split, 150 for its null levels,
    200 unseen ones (disjoint), and 200 shifted inputs of each kind."""
    paths = sorted((_elpv_package_dir() / "images").glob("*.png"))
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(paths))[:850]
    data = [paths[i].read_bytes() for i in pick]
    train, val, unseen, base = data[:300], data[300:450], data[450:650], data[650:850]
    # a new scanner: brighter, lower contrast; same cells
    brighter = [encode_png(np.clip(0.5 * decode_image(b, 1)[..., 0].astype(float) + 110, 0, 255).astype(np.uint8))
                for b in base]
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits().images[:200]
    digits = [encode_png(np.kron(d * 255 / 16, np.ones((8, 8))).astype(np.uint8)) for d in digits]
    return {"train": train, "val": val, "unseen": unseen, "brighter": brighter, "digits": digits}


@pytest.fixture(scope="module")
def files(tmp_path_factory, elpv):
    """A tiny model (promoted as cloud and, int8, as edge), its drift reference and its edge bundle."""
    root = tmp_path_factory.mktemp("promoted")
    meta = {"model_name": "resnet18", "num_classes": 4, "in_chans": 1, "image_size": SIZE, "class_names": CLASSES}
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, in_chans=1).eval()
    save_model(root / "full.pt", model, meta)
    export_onnx(model, root / "edge.onnx", SIZE, 1)
    quantize_onnx(root / "edge.onnx", root / "edge_int8.onnx", [_tensors(elpv["val"][:16])], max_images=16)
    ref = drift_reference(model, _batches(elpv["train"]), _batches(elpv["val"]), window=WINDOW, components=8)
    (root / "drift_reference.json").write_text(json.dumps(ref))
    write_bundle(root / "edge", root / "edge_int8.onnx", drift_reference=root / "drift_reference.json",
                 drift_threshold=THRESHOLD, drift_check_every=20, model_name="resnet18", model_version="v-drift",
                 class_names=CLASSES, image_size=SIZE, in_chans=1, temperature=1.0, threshold=0.4)
    return root


def test_reference_holds_training_statistics_and_null_levels(files, elpv):
    ref = load_reference(files / "drift_reference.json")
    assert ref["train_images"] == 300 and ref["val_images"] == 150 and ref["window"] == WINDOW
    assert ref["embedding_dim"] == 512 and np.asarray(ref["embedding"]["basis"]).shape == (8, 512)
    hist = input_histograms(_tensors(elpv["train"]), ref["bins"]).mean(0)
    assert np.allclose(hist, ref["intensity"]) and ref["intensity_null95"] > 0 and ref["embedding_null95"] > 0


def test_the_cloud_tier_forward_returns_the_heads_input_as_embedding(files, elpv):
    from components.serve.tiers import Tier

    tier = Tier(str(files / "full.pt"), max_batch_size=4, threads=1)
    x = _tensors(elpv["unseen"][:3])
    probs, emb = tier.forward(x)
    tap = EmbeddingTap(tier.model)
    with torch.inference_mode():
        logits = tier.model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    tap.remove()
    assert emb.shape == (3, 512) and np.allclose(emb, tap.last, atol=1e-4)
    assert np.allclose(probs, torch.softmax(logits, 1).numpy(), atol=1e-5)


def _post(client, images: list[bytes], mode: str) -> None:
    for i in range(0, len(images), 16):
        r = client.post("/predict", json={"images": [base64.b64encode(b).decode() for b in images[i:i + 16]],
                                          "mode": mode})
        assert r.status_code == 200, r.text
        assert all("embedding" not in a and "input_histogram" not in a for a in r.json()["predictions"])


def _drift_once(client, embedded: int, timeout: float = 60.0) -> dict:
    """GET /drift once the sampled cloud embeddings (sent in the background) have all been observed."""
    deadline = time.monotonic() + timeout
    while (d := client.get("/drift").json())["embedded"] < embedded:
        assert time.monotonic() < deadline, f"only {d['embedded']} of {embedded} embeddings observed: {d}"
        time.sleep(0.1)
    return d


@pytest.fixture(scope="module")
def serve_port(ray_address):
    """One Serve instance for both placements (the second deployment updates the first in place)."""
    serve.shutdown()
    yield free_port()
    serve.shutdown()


@pytest.fixture(scope="module", params=["ingress", "replica"])
def server(request, serve_port, files, tmp_path_factory):
    """ingress: the router decodes and computes the histograms (the default for an int8 edge model);
    replica: the edge tier's deployment returns them, the cloud's embeddings come from the bytes."""
    port = serve_port
    for name in serve.status().applications:  # the other placement's app: gone before this one deploys
        serve.delete(name)
    args = {"cloud_model": "full.pt", "edge_model": "full.pt", "edge_onnx": "edge_int8.onnx", "model_version": "v-drift",
            "threshold": 0.4, "default_mode": "cascade",
            "edge": {"num_replicas": 1, "threads": 1, "num_cpus": 0.1, "placement": request.param},  # one window
            "cloud": {"num_replicas": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "threads": 1, "num_cpus": 0.2},
            "router": {"num_cpus": 0.05}, "base_dir": str(files),
            "drift": {"reference": "drift_reference.json", "threshold": THRESHOLD, "embed_rate": 1.0, "check_every": 20}}
    path = write_serve_config(tmp_path_factory.mktemp("cfg") / "serve_config.yaml",
                              build_serve_config(args, host="127.0.0.1", port=port))
    deploy_config(load_serve_config(path), base_dir=files)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
        wait_healthy(client, "serve app")
        yield client


def test_serve_drift_is_quiet_on_elpv_and_speaks_on_shifted_inputs(server, elpv):
    d = server.get("/drift").json()
    assert d["enabled"] and d["inputs_seen"] == 0 and d["score"] is None and not d["drifted"]
    # cascade: the histogram of every input, and (embed_rate 1) the cloud embedding of every one, escalated or not
    _post(server, elpv["unseen"], "cascade")
    d = _drift_once(server, WINDOW)
    assert d["inputs_seen"] == WINDOW and d["intensity"]["full"] and d["embedding"]["full"], d
    assert not d["drifted"] and d["score"] < THRESHOLD, d
    _post(server, elpv["brighter"], "cloud")  # the window now holds only shifted inputs
    d = _drift_once(server, 2 * WINDOW)
    assert d["drifted"] and d["intensity"]["score"] > THRESHOLD, d
    _post(server, elpv["digits"], "edge")  # edge mode: nothing escalates, the embeddings are sampled anyway
    d = _drift_once(server, 3 * WINDOW)
    assert d["drifted"] and d["embedding"]["score"] > THRESHOLD and d["intensity"]["score"] > THRESHOLD, d


def test_edge_runtime_drift_over_http(files, elpv):
    bundle, _ = load_bundle(files / "edge")
    assert bundle.drift_reference == "drift_reference.json" and (files / "edge" / "drift_reference.json").exists()
    with uvicorn_server(create_app(files / "edge")) as url, httpx.Client(base_url=url, timeout=30.0) as client:
        _post(client, elpv["unseen"], "edge")
        d = client.get("/drift").json()
        assert d["inputs_seen"] == WINDOW and d["embedding"] is None, d  # the device has no cloud embeddings
        assert not d["drifted"] and d["score"] < THRESHOLD, d
        _post(client, elpv["brighter"], "edge")
        d = client.get("/drift").json()
        assert d["drifted"] and d["score"] > THRESHOLD, d


def test_a_missing_reference_fails_the_deployment_not_a_replica(files):
    from components.serve.app import plan_app

    with pytest.raises(FileNotFoundError, match="drift reference .*missing.json does not exist"):
        plan_app("full.pt", base_dir=str(files), drift={"reference": "missing.json", "threshold": 3.0,
                                                        "embed_rate": 0.1, "check_every": 20})
