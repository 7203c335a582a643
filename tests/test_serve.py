"""The Serve app end to end: real Ray, a real model file, real HTTP through Serve's proxy."""
from __future__ import annotations

import logging
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from components.augment.operator import AugmentOperator
from components.data.images import encode_png
from components.models import CheckpointError, create_model, load_model, predict_proba, save_model
from components.serve.app import build_app, deploy, run

CLASSES = ["ok", "crack"]
VERSION = "v-test-7"
MAX_BODY = 300_000
MAX_PIXELS = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int, shape=(48, 40)) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8))


def _local_probs(model_path, images: list[bytes]) -> np.ndarray:
    """What training's validation path computes for these images, in this process."""
    model, meta = load_model(model_path)
    op = AugmentOperator(policy=None, output="tensor", image_size=meta["image_size"], in_chans=meta["in_chans"])
    batch = op({"image": np.array(images, dtype=object), "label": np.zeros(len(images), dtype=np.int64)})
    import torch

    return predict_proba(model, torch.from_numpy(batch["image"])).numpy()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = create_model("resnet18", num_classes=2, in_chans=1)
    path = tmp_path_factory.mktemp("serve") / "full.pt"
    save_model(path, model, {"model_name": "resnet18", "num_classes": 2, "in_chans": 1, "image_size": 32,
                             "class_names": CLASSES})
    return str(path)


@pytest.fixture(scope="module")
def server(model_path):
    """Ray (reused if a session fixture already started it), Serve on a free loopback port, the app."""
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, resources={"cloud": 1}, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
    else:
        serve.shutdown()  # a Serve left by an earlier module would keep its own HTTP port
    port = _free_port()
    run(model_path, host="127.0.0.1", port=port, blocking=False, model_version=VERSION, max_body_bytes=MAX_BODY,
        max_image_pixels=MAX_PIXELS, max_batch_size=4, batch_wait_timeout_s=0.02, threads=1)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30.0) as client:
        deadline = time.monotonic() + 60
        while True:  # serve.run returns once replicas are up; the proxy may need a moment longer
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve app did not answer /healthz within 60 s"
            time.sleep(0.2)
        yield client
    serve.shutdown()
    if started_ray:
        ray.shutdown()


def test_healthz_models_and_docs(server):
    h = server.get("/healthz")
    assert h.status_code == 200
    assert h.json() == {"status": "ok", "model_version": VERSION, "model_name": "resnet18"}
    m = server.get("/models").json()
    assert m == {"model_name": "resnet18", "model_version": VERSION, "class_names": CLASSES, "num_classes": 2,
                 "image_size": 32, "in_chans": 1}
    spec = server.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/octet-stream" in body
    assert {"400", "413", "415", "422"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    assert server.get("/docs").status_code == 200


def test_predict_raw_and_multipart_match_local_forward(server, model_path):
    img = _png(1)
    raw = server.post("/predict", content=img, headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    r = raw.json()
    assert set(r) == {"label", "label_index", "probabilities", "model_version", "model_name", "latency_ms"}
    assert list(r["probabilities"]) == CLASSES
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert r["label"] in CLASSES and r["label"] == CLASSES[r["label_index"]]
    assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert r["model_version"] == VERSION and r["model_name"] == "resnet18" and r["latency_ms"] > 0

    octet = server.post("/predict", content=img, headers={"content-type": "application/octet-stream"}).json()
    multi = server.post("/predict", files={"file": ("part.png", img, "image/png")})
    assert multi.status_code == 200, multi.text
    expected = _local_probs(model_path, [img])[0]
    for answer in (r, octet, multi.json()):
        np.testing.assert_allclose([answer["probabilities"][c] for c in CLASSES], expected, atol=1e-5)
        assert answer["label_index"] == int(np.argmax(expected))


def test_concurrent_requests_are_batched_without_mixing_answers(server, model_path):
    images = [_png(100 + i, shape=(32 + i, 36)) for i in range(12)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: server.post("/predict", content=b), images))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    got = np.array([[a.json()["probabilities"][c] for c in CLASSES] for a in answers])
    np.testing.assert_allclose(got, _local_probs(model_path, images), atol=1e-5)

    # Requests in flight together share forward passes (max_batch_size=4 in this app).
    classifier = serve.get_deployment_handle("Classifier", app_name="default")
    before = classifier.stats.remote().result()
    responses = [classifier.predict.remote(b) for b in images[:8]]
    direct = np.array([[r.result()["probabilities"][c] for c in CLASSES] for r in responses])
    np.testing.assert_allclose(direct, got[:8], atol=1e-5)
    after = classifier.stats.remote().result()
    assert after["images"] - before["images"] == 8
    assert after["batches"] - before["batches"] < 8 and 1 < after["max_batch_size"] <= 4, (before, after)


def _chunks(total: int, size: int = 65_536):
    for i in range(0, total, size):
        yield b"\0" * min(size, total - i)


def _truncated_png() -> bytes:
    png = _png(7, shape=(64, 64))
    return png[: len(png) // 2]


BAD_REQUESTS = {
    "empty body": (dict(content=b""), 400, "empty"),
    "content-length over limit": (dict(content=b"\0" * (MAX_BODY + 1)), 413, f"limit of {MAX_BODY}"),
    "chunked body over limit": (dict(content=_chunks(MAX_BODY + 100_000)), 413, f"limit of {MAX_BODY}"),
    "not an image": (dict(content=b"this is plain text, not an image"), 415, "not a readable image"),
    "truncated png": (dict(content=_truncated_png()), 415, "truncated"),
    "too many pixels": (dict(content=encode_png(np.zeros((1000, 1001), np.uint8))), 413,
                        f"above the limit of {MAX_PIXELS}"),
    "decompression bomb header": (dict(content=_png_header_only(100_000, 100_000)), 413, "too large"),
    "multipart without file": (dict(files={"image": ("x.png", _png(3), "image/png")}), 422, "'file'"),
    "multipart empty file": (dict(files={"file": ("x.png", b"", "image/png")}), 400, "empty"),
    "multipart text field": (dict(data={"file": "abc"}, files={"other": ("y.png", b"1")}), 422, "file upload"),
    "malformed multipart": (dict(content=b"--nope\r\n", headers={"content-type": "multipart/form-data"}), 400,
                            "multipart"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_input_gets_json_error_and_server_stays_up(server, case):
    kwargs, status, words = BAD_REQUESTS[case]
    r = server.post("/predict", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert words.lower() in r.json()["error"].lower(), r.json()
    assert server.get("/healthz").json()["status"] == "ok"


def test_unknown_route_is_json_404(server):
    r = server.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_missing_or_malformed_model_file_fails_at_build(tmp_path, server):
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        build_app(str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt cannot be read"):
        run(str(garbage), port=_free_port(), blocking=False)
    assert server.get("/healthz").status_code == 200  # the running app is untouched


def test_model_file_changed_after_build_fails_at_deploy(tmp_path, server, model_path):
    """A replica that cannot load the model fails the deploy with the replica's own CheckpointError."""
    path = tmp_path / "swapped.pt"
    path.write_bytes(open(model_path, "rb").read())
    app = build_app(str(path), num_cpus=0.25, threads=1)
    path.write_bytes(b"replaced after build_app")
    with pytest.raises(CheckpointError, match=r"swapped\.pt on this node has sha256"):
        deploy(app, name="broken", route_prefix="/broken")
    assert "broken" not in serve.status().applications
    assert server.get("/healthz").status_code == 200


def test_custom_resources_place_the_classifier(server, model_path):
    """`resources` reaches the classifier replica: it holds a share of the node's `cloud` resource."""
    if "cloud" not in ray.cluster_resources():
        pytest.skip("this Ray instance has no 'cloud' resource")
    app = build_app(model_path, model_version="placed", resources={"cloud": 0.25}, num_cpus=0.25, threads=1)
    serve.run(app, name="placed", route_prefix="/placed", blocking=False)
    try:
        r = server.post("/placed/predict", content=_png(5))
        assert r.status_code == 200 and r.json()["model_version"] == "placed"
        deadline = time.monotonic() + 20
        while ray.cluster_resources()["cloud"] - ray.available_resources().get("cloud", 0.0) < 0.25 - 1e-6:
            assert time.monotonic() < deadline, "classifier replica does not hold the 'cloud' resource"
            time.sleep(0.2)
    finally:
        serve.delete("placed")
    assert server.get("/healthz").status_code == 200
