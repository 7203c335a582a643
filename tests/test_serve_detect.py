"""POST /detect over real HTTP: a detection app (edge and cloud detectors) deployed from a generated
Serve config on a loopback port; answers compared with the same detector run in this process."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch
from ray import serve

from components.augment.detection import detection_batch
from components.data.detection import synthetic_conveyor
from components.data.images import encode_png
from components.models import create_model, load_model, save_model
from components.models.detector import detect, scale_boxes
from components.serve.config import build_serve_config, deploy_config, load_serve_config, write_serve_config
from conftest import free_port, wait_healthy

CLASSES = ["coal", "gangue"]
SIZE = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("det-promoted")
    meta = {"model_name": "resnet18_yolo", "num_classes": 2, "in_chans": 3, "image_size": SIZE,
            "class_names": CLASSES, "model_kwargs": {"width": 0.25}}
    for name, seed in (("full.pt", 0), ("edge.pt", 1)):
        torch.manual_seed(seed)
        save_model(root / name, create_model("resnet18_yolo", 2, 3, width=0.25), meta)
    return root


@pytest.fixture(scope="module")
def client(ray_address, files, tmp_path_factory):
    serve.shutdown()
    port = free_port()
    args = {"cloud_model": "full.pt", "edge_model": "edge.pt", "model_version": "det-v1", "threshold": 0.5,
            "default_mode": "edge", "min_image_side": 8, "max_batch_images": 4, "base_dir": str(files),
            "detection": {"score_threshold": 0.0, "iou_threshold": 0.45, "max_detections": 20},
            "edge": {"num_replicas": 1, "max_batch_size": 4, "threads": 1, "num_cpus": 0.1},
            "cloud": {"num_replicas": 1, "max_batch_size": 4, "threads": 1, "num_cpus": 0.1},
            "router": {"num_cpus": 0.05}}
    path = write_serve_config(tmp_path_factory.mktemp("cfg") / "serve_config.yaml",
                              build_serve_config(args, host="127.0.0.1", port=port))
    deploy_config(load_serve_config(path), base_dir=files)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as c:
        wait_healthy(c, "detection app")  # the app runs; the proxy may need a moment longer to route to it
        yield c
    serve.shutdown()


def _scene(seed: int) -> bytes:
    images, _ = synthetic_conveyor(1, 96, seed=seed)
    return encode_png(images[0][:80])  # 80 x 96 (h x w): not the model's square input


def _local(files, name: str, data: bytes, score: float, iou: float, max_det: int = 20) -> dict:
    model, _ = load_model(files / name)
    out = detection_batch({"image": np.array([data], dtype=object), "boxes": np.array(["[]"], dtype=object)},
                          image_size=SIZE, in_chans=3)
    det = detect(model, torch.from_numpy(out["image"]), score_threshold=score, iou_threshold=iou,
                 max_detections=max_det)[0]
    return {"boxes": scale_boxes(det["boxes"], (SIZE, SIZE), (80, 96)).numpy(), "scores": det["scores"].numpy(),
            "labels": det["labels"].numpy()}


def test_detect_answers_boxes_in_the_posted_images_pixels(client, files):
    data = _scene(1)
    r = client.post("/detect", content=data, headers={"content-type": "image/png"},
                    params={"score_threshold": 1e-4, "iou_threshold": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tier"] == "edge" and body["image_size"] == [80, 96] and body["model_name"] == "resnet18_yolo"
    local = _local(files, "edge.pt", data, 1e-4, 0.5)  # an untrained detector: low scores
    got = body["detections"]
    assert len(got) == len(local["scores"]) > 0
    np.testing.assert_allclose([d["box"] for d in got], local["boxes"], atol=0.02)
    np.testing.assert_allclose([d["score"] for d in got], local["scores"], atol=1e-6)
    assert [d["label"] for d in got] == [CLASSES[i] for i in local["labels"]]
    assert all(0 <= d["box"][0] <= d["box"][2] <= 96 and 0 <= d["box"][1] <= d["box"][3] <= 80 for d in got)


def test_detect_cascade_and_json_batch(client, files):
    a, b = _scene(2), _scene(3)
    # threshold 1.0: every edge box is "uncertain", so the cloud detector answers.
    r = client.post("/detect", json={"images": [base64.b64encode(a).decode(), base64.b64encode(b).decode()],
                                     "mode": "cascade", "threshold": 1.0, "score_threshold": 1e-4})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["tier"] for p in preds] == ["cloud", "cloud"] and all(p["escalated"] for p in preds)
    local = _local(files, "full.pt", b, 1e-4, 0.45)
    assert len(local["scores"]) > 0
    np.testing.assert_allclose([d["score"] for d in preds[1]["detections"]], local["scores"], atol=1e-6)
    # threshold 0: no edge box is below it, the edge answers.
    r = client.post("/detect", content=a, params={"mode": "cascade", "threshold": 0.0})
    assert r.status_code == 200 and r.json()["tier"] == "edge" and not r.json()["escalated"]


def test_detect_refuses_malformed_input_like_predict(client):
    assert client.post("/detect", content=b"not an image", headers={"content-type": "image/png"}).status_code == 415
    assert client.post("/detect", content=b"").status_code == 400
    r = client.post("/detect", content=_scene(4), params={"score_threshold": "high"})
    assert r.status_code == 422 and "score_threshold" in r.json()["error"]
    r = client.post("/detect", json={"images": [base64.b64encode(_scene(4)).decode()], "labels": 1})
    assert r.status_code == 422 and "unknown JSON fields ['labels']" in r.json()["error"]
    r = client.post("/predict", content=_scene(4))
    assert r.status_code == 404 and "POST /detect" in r.json()["error"]
    assert client.get("/models").json()["cloud"]["task"] == "detect"


def test_resops_predict_detect_posts_to_detect(client, tmp_path):
    import json
    import subprocess
    import sys

    image = tmp_path / "scene.png"
    image.write_bytes(_scene(5))
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", str(image), "--detect", "--url",
                          str(client.base_url), "--score-threshold", "0.0001", "--mode", "cloud"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    answer = json.loads(out.stdout)
    assert answer["tier"] == "cloud" and answer["score_threshold"] == 0.0001 and answer["image_size"] == [80, 96]
