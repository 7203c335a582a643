"""`resops edge`, the device runtime, without a cloud: its preprocessing against training's, its bundle,
its outbox, its imports, and its HTTP API over real HTTP (uvicorn on 127.0.0.1). The runtime in front
of the real cloud app (escalation, degraded answers, resend) is tested in test_serve.py."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from components.augment.operator import AugmentOperator
from components.data.images import encode_png
from components.edge.app import create_app
from components.edge.bundle import BundleError, load_bundle, write_bundle
from components.edge.model import EdgeModel, preprocess_array, softmax
from components.edge.outbox import Outbox
from components.models import create_model
from components.prune import OnnxClassifier, export_onnx, quantize_onnx
from conftest import png_header_only
from netutil import assert_docs_are_local, uvicorn_server

CLASSES = ["ok", "crack", "finger"]
SIZE = 32


def _png(seed: int, shape=(48, 40)) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8))


def _training_tensors(images: list[bytes], image_size: int = SIZE, in_chans: int = 1) -> np.ndarray:
    op = AugmentOperator(policy=None, output="tensor", image_size=image_size, in_chans=in_chans)
    return op({"image": np.array(images, dtype=object), "label": np.zeros(len(images), dtype=np.int64)})["image"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """An int8 ONNX edge model of a small ResNet18 and its bundle, as the calibrate stage writes it."""
    root = tmp_path_factory.mktemp("edge")
    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=3, in_chans=1).eval()
    export_onnx(model, root / "edge.onnx", SIZE, 1)
    quantize_onnx(root / "edge.onnx", root / "edge_int8.onnx", [_training_tensors([_png(900 + i) for i in range(16)])],
                  max_images=16)
    write_bundle(root / "bundle", root / "edge_int8.onnx", model_name="resnet18", model_version="v-edge-3",
                 class_names=CLASSES, image_size=SIZE, in_chans=1, temperature=0.5, threshold=0.4,
                 max_body_bytes=300_000, max_image_pixels=1_000_000, min_image_side=8, max_batch_images=4)
    return root / "bundle"


# ---------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [32, 64, 128])
def test_pillow_preprocessing_matches_trainings_opencv_one(size):
    """The device has no OpenCV: its Pillow resize must give the inputs training's validation transform gives."""
    from components.data.images import decode_image

    # Every shape shrinks (an image smaller than the input is enlarged bilinearly, not as OpenCV does).
    shapes = [(300, 300), (301, 257), (2 * size, 2 * size), (2 * size + 1, 3 * size), (size + 8, size + 3)]
    images = [_png(i, shape) for i, shape in enumerate(shapes)]
    expected = _training_tensors(images, size)
    got = np.stack([preprocess_array(decode_image(b, 1), size) for b in images])
    grey_levels = np.abs(got - expected) * 63.75  # back to 0..255 units
    assert got.shape == expected.shape and got.dtype == np.float32
    assert grey_levels.max() <= 1.0 + 1e-4, grey_levels.max()
    assert grey_levels.mean() < 0.25  # off by one grey level (rounding) on at most a quarter of the pixels


def test_pillow_preprocessing_of_real_el_images_keeps_the_models_answers(bundle_dir):
    from components.data.sources import _elpv_package_dir

    paths = sorted((_elpv_package_dir() / "images").glob("*.png"))
    images = [p.read_bytes() for p in paths[:: len(paths) // 24][:24]]  # 300x300 EL cells, as cameras send them
    bundle, onnx = load_bundle(bundle_dir)
    model = EdgeModel(bundle, onnx)
    ours = model.probabilities(np.stack([model.preprocess(b) for b in images]))
    theirs = softmax(OnnxClassifier(onnx).logits(_training_tensors(images)), 0.5)
    assert np.abs(ours - theirs).max() < 0.05
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9


# ---------------------------------------------------------------------------- the bundle
def test_bundle_records_and_checks_its_file(bundle_dir, tmp_path):
    bundle, onnx = load_bundle(bundle_dir)
    assert bundle.class_names == CLASSES and bundle.temperature == 0.5 and onnx.parent == bundle_dir
    with pytest.raises(BundleError, match="does not exist: run `dvc repro`"):
        load_bundle(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "edge.json").write_text((bundle_dir / "edge.json").read_text())
    (copy / onnx.name).write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="sha256 .* the file was replaced"):
        load_bundle(copy)
    doc = json.loads((bundle_dir / "edge.json").read_text())
    (copy / "edge.json").write_text(json.dumps({**doc, "in_chans": 2}))
    with pytest.raises(BundleError, match="in_chans must be 1 or 3"):
        load_bundle(copy)


def test_edge_runtime_imports_no_ray_torch_opencv_or_pandas():
    code = ("import sys; import components.edge.app, components.edge.cli; "
            "print([m for m in ('torch', 'ray', 'cv2', 'pandas', 'sklearn', 'albumentations') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # `resops edge` goes straight to it, before the pipeline CLI imports anything heavy.
    code = ("import sys; from pipelines.cli import main; rc = 0\n"
            "try: main(['edge', '--help'])\nexcept SystemExit as e: rc = e.code\n"
            "print(rc, [m for m in ('torch', 'ray', 'pandas') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"


# ---------------------------------------------------------------------------- the outbox
def test_outbox_is_bounded_drops_the_oldest_and_survives_a_restart(tmp_path):
    box = Outbox(tmp_path / "box", max_items=3, max_bytes=10_000_000)
    ids = [box.put(bytes([i]) * 1000, {"label": f"l{i}"}) for i in range(5)]
    assert len(box) == 3 and box.counts["dropped"] == 2 and box.counts["queued"] == 5
    assert box.peek()["id"] == ids[2]  # the two oldest went
    box.close()
    box = Outbox(tmp_path / "box", max_items=3, max_bytes=10_000_000)
    assert len(box) == 3 and box.peek()["data"] == bytes([2]) * 1000
    item = box.peek()
    box.done(item, {"label": "cloud-label", "probabilities": {}}, 200)
    assert len(box) == 2 and box.counts["resent"] == 1
    assert box.stats(recent=5)["recent"][-1]["cloud_label"] == "cloud-label"
    small = Outbox(tmp_path / "bytes", max_items=100, max_bytes=200_000)
    for i in range(10):
        small.put(bytes([i]) * 50_000, {"label": "x"})
    assert small.bytes() <= 200_000 + 100_000 and small.counts["dropped"] >= 5  # volume() counts SQLite pages too


# ---------------------------------------------------------------------------- over HTTP, no cloud
@pytest.fixture(scope="module")
def standalone(bundle_dir, tmp_path_factory):
    app = create_app(bundle_dir, cloud_url=None, cloud_token_env=None)
    with uvicorn_server(app) as url, httpx.Client(base_url=url, timeout=30.0) as client:
        yield client


def test_standalone_answers_what_the_model_computes(standalone, bundle_dir):
    images = [_png(i) for i in range(6)]
    bundle, onnx = load_bundle(bundle_dir)
    model = EdgeModel(bundle, onnx)
    expected = model.probabilities(np.stack([model.preprocess(b) for b in images]))
    for data, probs in zip(images, expected):
        r = standalone.post("/predict", content=data, params={"mode": "edge"},
                            headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tier"] == "edge" and body["degraded"] is False and body["model_versions"] == {"edge": "v-edge-3"}
        np.testing.assert_allclose([body["probabilities"][c] for c in CLASSES], probs, atol=1e-6)
        assert body["label"] == CLASSES[int(np.argmax(probs))]
    # Cascade with nothing to escalate to: below the threshold it answers locally, degraded, and says why.
    r = standalone.post("/predict", content=images[0], params={"mode": "cascade", "threshold": 1.0})
    assert r.status_code == 200 and r.json()["degraded"] is True
    assert "no cloud configured" in r.json()["degraded_reason"]
    h = standalone.get("/healthz").json()
    assert h["status"] == "ok" and h["cloud"]["url"] is None and h["outbox"] is None


@pytest.mark.parametrize("case, kwargs, status, message", [
    ("empty", {"content": b""}, 400, "empty request body"),
    ("content type", {"content": b"x", "headers": {"content-type": "text/csv"}}, 415, "unsupported content type"),
    ("not an image", {"content": b"not an image at all"}, 415, "not a readable image"),
    ("bomb", {"content": png_header_only(5000, 5000)}, 413, "above the limit of 1000000"),
    ("tiny", {"content": encode_png(np.zeros((4, 4), np.uint8))}, 422, "at least 8"),
    ("bad mode", {"content": b"x", "params": {"mode": "fog"}}, 422, "mode must be one of"),
    ("too big", {"content": b"\0" * 300_001}, 413, "above the limit of 300000 bytes"),
    ("no file field", {"files": {"other": ("a.png", b"x")}}, 422, "no 'file' field"),
    ("bad base64", {"json": {"images": ["***"]}}, 400, "not valid base64"),
    ("batch too large", {"json": {"images": ["aGk="] * 5}}, 413, "above the limit of 4"),
])
def test_malformed_input_is_refused_like_the_serve_app(standalone, case, kwargs, status, message):
    r = standalone.post("/predict", **kwargs)
    assert r.status_code == status, (case, r.text)
    assert message in r.json()["error"]


def test_json_batch_and_own_token(bundle_dir, monkeypatch):
    monkeypatch.setenv("EDGE_TEST_TOKEN", "t0ken")
    app = create_app(bundle_dir, auth_token_env="EDGE_TEST_TOKEN", cloud_token_env=None)
    import base64

    images = [base64.b64encode(_png(i)).decode() for i in range(3)]
    with uvicorn_server(app) as url, httpx.Client(base_url=url, timeout=30.0) as client:
        assert client.post("/predict", json={"images": images, "mode": "edge"}).status_code == 401
        r = client.post("/predict", json={"images": images, "mode": "edge"}, headers={"authorization": "Bearer t0ken"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 3
        assert client.get("/healthz").status_code == 200  # probes need no token


def test_docs_render_without_internet(standalone):
    assert_docs_are_local(standalone)


def test_edge_lock_pins_the_versions_of_the_full_lock():
    """requirements-edge.lock (the device install) must not drift from what the suite tests."""
    from pathlib import Path

    def pins(name):
        text = (Path(__file__).resolve().parent.parent / name).read_text()
        return {ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1]
                for ln in text.splitlines() if "==" in ln and not ln.startswith("#")}

    edge, full = pins("requirements-edge.lock"), pins("requirements.lock")
    assert {"onnxruntime", "numpy", "pillow", "fastapi", "uvicorn", "httpx", "diskcache"} <= set(edge)
    assert not {"torch", "ray", "opencv-python-headless", "pandas"} & set(edge)
    assert {k: v for k, v in edge.items() if full.get(k) != v} == {}


def test_feedback_over_http_keeps_unsure_inputs_and_a_broken_store_fails_nothing(bundle_dir, tmp_path):
    """--feedback: inputs answered below the threshold are kept (image, answer, versions); a store that cannot
    be written drops them, counted, and every request still gets its answer."""
    from components.feedback import FeedbackStore

    images = [_png(300 + i) for i in range(4)]
    app = create_app(bundle_dir, cloud_url=None, cloud_token_env=None,
                     feedback={"enabled": True, "location": str(tmp_path / "fb"), "max_bytes": 10**7})
    with uvicorn_server(app) as url, httpx.Client(base_url=url, timeout=30.0) as client:
        for data in images:  # threshold 1.0: nothing is confident, and with no cloud each answer is degraded
            assert client.post("/predict", content=data, params={"threshold": 1.0}).json()["degraded"] is True
        confident = client.post("/predict", content=_png(399), params={"mode": "edge", "threshold": 0.0})
        assert confident.status_code == 200
        assert app.state.runtime.feedback.flush(timeout=30)
        stats = client.get("/feedback").json()
    assert stats["offered"] == 5 and stats["recorded"] == 4 and stats["dropped"] == 0
    store = FeedbackStore(str(tmp_path / "fb"), 10**7)
    records = [store.read(n) for n in store.names()]
    assert sorted(img for _, img in records) == sorted(images)  # the confident one was not kept
    for record, image in records:
        assert record["reason"] == "degraded" and record["source"] == "edge"
        assert record["answer"]["tier"] == "edge" and record["model_versions"] == {"edge": "v-edge-3"}
        assert set(record["edge"]["probabilities"]) == set(CLASSES) and record["cloud"] is None

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    broken = create_app(bundle_dir, cloud_url=None, cloud_token_env=None,
                        feedback={"enabled": True, "location": str(blocker / "fb")})
    with uvicorn_server(broken) as url, httpx.Client(base_url=url, timeout=30.0) as client:
        for data in images:
            assert client.post("/predict", content=data, params={"threshold": 1.0}).status_code == 200
        assert broken.state.runtime.feedback.flush(timeout=30)
        stats = client.get("/feedback").json()
    assert stats["recorded"] == 0 and stats["dropped"] == 4 and stats["last_error"]
