"""The cloud-edge Serve app end to end: real Ray, real model files (the edge one int8 ONNX), deployed from
a generated Serve config exactly as `resops serve` and the RayService do, real HTTP through Serve's proxy."""
from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from ray import serve

from components.augment.operator import AugmentOperator
from components.data.images import encode_png
from components.evaluate.calibration import softmax
from components.models import CheckpointError, create_model, load_model, save_model
from components.prune import OnnxClassifier, export_onnx, quantize_onnx
from components.serve.app import build_app
from components.serve.config import (IMPORT_PATH, build_serve_config, deploy_config, load_serve_config,
                                     write_serve_config)
from conftest import free_port, png_header_only, wait_healthy

CLASSES = ["ok", "crack", "finger"]
VERSION = "v-test-7"
MAX_BODY = 300_000
MAX_PIXELS = 1_000_000
TEMPS = {"edge": 0.5, "cloud": 2.0}
TOKEN = "s3cret-token"
# The app also serves signals (as if its models were trained on EEG scalograms of these settings).
SIGNAL = {"fs": 173.61, "window": 512, "overlap": 0, "cwt": {"wavelet": "cmor1.5-1.0", "freqs": [0.5, 40.0],
                                                             "num_scales": 16, "out_size": [32, 32], "log": True}}


def _png(seed: int, shape=(48, 40)) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8))


def _tensors(images: list[bytes], image_size: int = 32) -> np.ndarray:
    op = AugmentOperator(policy=None, output="tensor", image_size=image_size, in_chans=1)
    return op({"image": np.array(images, dtype=object), "label": np.zeros(len(images), dtype=np.int64)})["image"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A full (cloud) model, a different edge model and its int8 ONNX export, like models/promoted/."""
    root = tmp_path_factory.mktemp("promoted")
    meta = {"model_name": "resnet18", "num_classes": 3, "in_chans": 1, "image_size": 32, "class_names": CLASSES}
    torch.manual_seed(0)
    save_model(root / "full.pt", create_model("resnet18", num_classes=3, in_chans=1), meta)
    torch.manual_seed(1)
    edge = create_model("resnet18", num_classes=3, in_chans=1).eval()
    save_model(root / "edge.pt", edge, meta)
    export_onnx(edge, root / "edge.onnx", 32, 1)
    calib = _tensors([_png(900 + i) for i in range(16)])
    quantize_onnx(root / "edge.onnx", root / "edge_int8.onnx", [calib], max_images=16)
    return root


FEEDBACK_CAP = 12_000  # bytes: room for a few records of these ~2 kB images


def _args(files, **extra) -> dict:
    return {"cloud_model": "full.pt", "edge_model": "edge.pt", "edge_onnx": "edge_int8.onnx",
            "model_version": VERSION, "temperatures": dict(TEMPS), "threshold": 0.4, "default_mode": "cascade",
            "max_body_bytes": MAX_BODY, "max_image_pixels": MAX_PIXELS, "min_image_side": 8, "max_batch_images": 16,
            "edge": {"num_replicas": 2, "max_batch_size": 4, "batch_wait_timeout_s": 0.01, "threads": 1,
                     "num_cpus": 0.1, "resources": {"edge": 0.01}},
            "cloud": {"num_replicas": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "threads": 1,
                      "num_cpus": 0.2, "resources": {"cloud": 0.01}},
            "router": {"num_cpus": 0.05}, "base_dir": str(files), "signal": dict(SIGNAL), **extra}


@pytest.fixture(scope="module")
def server(ray_address, files, tmp_path_factory):
    """The app deployed from a written-then-read Serve config on a free loopback port."""
    import ray

    serve.shutdown()  # a Serve left by an earlier module would keep its own HTTP port
    port = free_port()
    feedback = tmp_path_factory.mktemp("feedback")
    args = _args(files, feedback={"enabled": True, "location": str(feedback), "rate": 0.0, "max_bytes": FEEDBACK_CAP})
    path = write_serve_config(tmp_path_factory.mktemp("cfg") / "serve_config.yaml",
                              build_serve_config(args, host="127.0.0.1", port=port))
    before = ray.available_resources()
    config = load_serve_config(path)
    deploy_config(config, base_dir=files)
    used = {r: before.get(r, 0.0) - ray.available_resources().get(r, 0.0) for r in ("edge", "cloud")}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
        wait_healthy(client, "serve app")  # the app runs; the proxy may need a moment longer to route to it
        client.resources_used = used
        client.port, client.config, client.feedback = port, config, feedback
        yield client
    serve.shutdown()


def _local_probs(files, images: list[bytes]) -> dict[str, np.ndarray]:
    """What each tier should answer, computed in this process: torch full model, ORT int8 edge model."""
    x = _tensors(images)
    model, _ = load_model(files / "full.pt")
    with torch.inference_mode():
        cloud = softmax(model(torch.from_numpy(x)).numpy(), TEMPS["cloud"])
    edge = softmax(OnnxClassifier(files / "edge_int8.onnx").logits(x), TEMPS["edge"])
    return {"edge": edge, "cloud": cloud}


def _probs(answer: dict) -> np.ndarray:
    return np.array([answer["probabilities"][c] for c in CLASSES])


# ---------------------------------------------------------------------------- the config file
def test_generated_config_is_what_serve_deploys(files):
    config = build_serve_config(_args(files), port=8123)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == IMPORT_PATH and config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    module, attr = IMPORT_PATH.split(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    deps = {d["name"]: d for d in app["deployments"]}
    # The int8 ONNX edge model runs in the ingress (placement auto): the Router takes the edge's replicas,
    # CPUs (on top of its own) and resources.
    assert set(deps) == {"Router", "CloudClassifier"}
    assert deps["Router"]["ray_actor_options"] == {"num_cpus": pytest.approx(0.15), "resources": {"edge": 0.01}}
    assert deps["Router"]["num_replicas"] == 2
    assert deps["Router"]["user_config"] == {"threshold": 0.4, "default_mode": "cascade",
                                             "edge_temperature": TEMPS["edge"]}
    assert deps["CloudClassifier"]["ray_actor_options"]["resources"] == {"cloud": 0.01}
    assert deps["CloudClassifier"]["max_ongoing_requests"] >= 8  # >= max_batch_size: batches can fill
    own = build_serve_config(_args(files, edge={**_args(files)["edge"], "placement": "replica"}))
    deps = {d["name"]: d for d in own["applications"][0]["deployments"]}
    assert set(deps) == {"Router", "EdgeClassifier", "CloudClassifier"}
    assert deps["EdgeClassifier"]["ray_actor_options"]["resources"] == {"edge": 0.01}
    assert deps["EdgeClassifier"]["num_replicas"] == 2 and "resources" not in deps["Router"]["ray_actor_options"]
    with pytest.raises(ValueError, match="placement: ingress needs the int8 ONNX edge model"):
        build_app("full.pt", "edge.pt", base_dir=str(files), edge={"placement": "ingress"})
    auto = build_serve_config(_args(files, cloud={**_args(files)["cloud"], "autoscaling_config": {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}}))
    cloud = {d["name"]: d for d in auto["applications"][0]["deployments"]}["CloudClassifier"]
    assert cloud["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in cloud
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        build_serve_config(_args(files, cloud={**_args(files)["cloud"], "max_ongoing_requests": 2}))


def test_no_private_serve_api_in_the_code():
    """Deploying uses Serve's public interfaces only: private modules change without notice between Ray releases."""
    root = Path(__file__).resolve().parents[1]
    users = [str(f.relative_to(root)) for d in ("components", "pipelines") for f in (root / d).rglob("*.py")
             if "ray.serve._private" in f.read_text()]
    assert users == []


def test_missing_model_file_fails_when_building(files):
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        build_app("missing.pt", base_dir=str(files))
    with pytest.raises(CheckpointError, match="nope.onnx does not exist"):
        build_app("full.pt", "edge.pt", edge_onnx="nope.onnx", base_dir=str(files))
    with pytest.raises(ValueError, match="mode must be one of"):
        build_app("full.pt", base_dir=str(files), default_mode="fastest")


def test_invalid_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="bad.yaml is not a valid Serve deploy config"):
        load_serve_config(bad)
    with pytest.raises(FileNotFoundError, match="calibrate stage"):
        load_serve_config(tmp_path / "absent.yaml")


# ---------------------------------------------------------------------------- serving
def test_healthz_models_and_docs(server):
    h = server.get("/healthz")
    assert h.status_code == 200
    assert h.json() == {"status": "ok", "default_mode": "cascade", "model_versions": {"edge": VERSION, "cloud": VERSION}}
    m = server.get("/models").json()
    assert m["default_mode"] == "cascade" and m["threshold"] == 0.4
    assert m["edge"]["backend"] == "onnxruntime" and set(m["edge"]["files"]) == {"edge.pt", "edge_int8.onnx"}
    assert m["edge"]["placement"] == "ingress" and m["cloud"]["placement"] == "replica"
    assert m["cloud"]["backend"] == "torch" and set(m["cloud"]["files"]) == {"full.pt"}
    assert m["edge"]["temperature"] == TEMPS["edge"] and m["cloud"]["class_names"] == CLASSES
    spec = server.get("/openapi.json").json()
    post = spec["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "application/octet-stream", "application/json"} <= set(post["requestBody"]["content"])
    assert {"400", "401", "413", "415", "422"} <= set(post["responses"])
    assert {p["name"] for p in post["parameters"]} == {"mode", "threshold"}
    assert server.get("/docs").status_code == 200
    from netutil import assert_docs_are_local

    assert_docs_are_local(server)  # Swagger UI and ReDoc from the package: they render on an offline network


def test_tiers_hold_their_custom_resources(server):
    """Two edge replicas hold 0.01 `edge` each, the cloud replica 0.01 `cloud`: on a cluster they land on
    the worker groups that carry those resources."""
    assert server.resources_used["edge"] == pytest.approx(0.02, abs=1e-6)
    assert server.resources_used["cloud"] == pytest.approx(0.01, abs=1e-6)


def test_each_mode_answers_with_the_right_tier(server, files):
    img = _png(1)
    expected = _local_probs(files, [img])
    edge = server.post("/predict", params={"mode": "edge"}, content=img, headers={"content-type": "image/png"})
    assert edge.status_code == 200, edge.text
    e = edge.json()
    assert e["tier"] == "edge" and e["mode"] == "edge" and not e["escalated"] and e["threshold"] is None
    assert set(e["model_versions"]) == {"edge"} and set(e["latency_ms"]) == {"edge", "total"}
    np.testing.assert_allclose(_probs(e), expected["edge"][0], atol=1e-4)
    assert e["edge_confidence"] == pytest.approx(expected["edge"][0].max(), abs=1e-4)
    assert e["label"] == CLASSES[e["label_index"]] == CLASSES[int(np.argmax(expected["edge"][0]))]

    cloud = server.post("/predict", params={"mode": "cloud"}, files={"file": ("a.png", img, "image/png")}).json()
    assert cloud["tier"] == "cloud" and cloud["edge_confidence"] is None and set(cloud["model_versions"]) == {"cloud"}
    np.testing.assert_allclose(_probs(cloud), expected["cloud"][0], atol=1e-5)
    assert sum(cloud["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    cascade = server.post("/predict", content=img).json()  # the default mode
    assert cascade["mode"] == "cascade" and cascade["threshold"] == 0.4
    assert cascade["escalated"] == (cascade["edge_confidence"] < 0.4)
    assert cascade["tier"] == ("cloud" if cascade["escalated"] else "edge")


def test_cascade_escalates_exactly_the_inputs_below_the_threshold(server, files):
    images = [_png(200 + i, shape=(40 + i, 44)) for i in range(16)]
    conf = _local_probs(files, images)["edge"].max(1)
    middle = float(np.median(conf))
    for threshold, expect in ((0.0, np.zeros(16, bool)), (1.0, np.ones(16, bool)), (middle, conf < middle)):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: server.post("/predict", content=b, params={
                "mode": "cascade", "threshold": threshold}).json(), images))
        escalated = np.array([a["escalated"] for a in answers])
        got_conf = np.array([a["edge_confidence"] for a in answers])
        np.testing.assert_allclose(got_conf, conf, atol=1e-4)
        assert (escalated == (got_conf < threshold)).all()
        assert (escalated == expect).all(), (threshold, escalated, expect)
        assert all(a["tier"] == ("cloud" if x else "edge") for a, x in zip(answers, escalated))
        assert all(("cloud" in a["latency_ms"]) == x for a, x in zip(answers, escalated))
    assert 0 < (conf < middle).sum() < 16  # the middle threshold splits the set


def test_served_cascade_agrees_with_the_offline_replay(server, files):
    """The calibrate stage's replay (components.evaluate.replay) predicts every served cascade answer: the
    same class from the same tier, for the same model files, temperatures and threshold."""
    from components.evaluate.replay import agreement, replay_cascade

    images = [_png(1200 + i, shape=(36 + i % 9, 40)) for i in range(24)]
    conf = _local_probs(files, images)["edge"].max(1)
    threshold = float(np.median(conf))
    replay = replay_cascade(images, np.zeros(len(images), dtype=np.int64), cloud_model=files / "full.pt",
                            edge_model=files / "edge.pt", edge_onnx=files / "edge_int8.onnx", temperatures=TEMPS,
                            threshold=threshold, class_names=CLASSES, model_version=VERSION, threads=1,
                            max_pixels=MAX_PIXELS)
    tiers = [a["tier"] for a in replay["answers"].values()]
    assert 0 < tiers.count("cloud") < len(images)  # both tiers answer some: the check covers both paths
    served = [(b, server.post("/predict", content=b, params={"mode": "cascade", "threshold": threshold}).json())
              for b in images]
    out = agreement(replay, served)
    assert out["n"] == len(images)
    assert out["label_agreement"] == 1.0 and out["tier_agreement"] == 1.0, out["disagreements"]
    # and it notices a served answer that differs
    wrong = [(served[0][0], {**served[0][1], "label_index": (served[0][1]["label_index"] + 1) % 3}), *served[1:]]
    assert agreement(replay, wrong)["label_agreement"] == pytest.approx(1 - 1 / len(images))


def test_json_batch_matches_single_requests_and_is_batched(server, files):
    images = [_png(300 + i) for i in range(8)]
    encoded = [base64.b64encode(b).decode() for b in images]
    encoded[3] = "data:image/png;base64," + encoded[3]
    r = server.post("/predict", json={"images": encoded, "mode": "cloud"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 8 and all(p["tier"] == "cloud" for p in preds)
    np.testing.assert_allclose(np.array([_probs(p) for p in preds]), _local_probs(files, images)["cloud"], atol=1e-5)
    # The router sends the 8 images to the cloud tier at once: they share forward passes (max_batch_size 8).
    assert max(p["batch_size"]["cloud"] for p in preds) > 1, [p["batch_size"] for p in preds]
    before = serve.get_deployment_handle("CloudClassifier", app_name="resops").stats.remote().result()
    assert before["images"] > before["batches"]


def test_concurrent_http_requests_share_cloud_batches(server, files):
    images = [_png(400 + i, shape=(32 + i, 36)) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: server.post("/predict", content=b, params={"mode": "cloud"}), images))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    np.testing.assert_allclose(np.array([_probs(a.json()) for a in answers]), _local_probs(files, images)["cloud"],
                               atol=1e-5)  # batching never mixes answers up
    assert max(a.json()["batch_size"]["cloud"] for a in answers) > 1


def _chunks(total: int, size: int = 65_536):
    for i in range(0, total, size):
        yield b"\0" * min(size, total - i)


def _truncated_png() -> bytes:
    png = _png(7, shape=(64, 64))
    return png[: len(png) // 2]


BAD_REQUESTS = {
    "empty body": (dict(content=b""), 400, "empty"),
    "random bytes": (dict(content=np.random.default_rng(5).bytes(2000)), 415, "not a readable image"),
    "content-length over limit": (dict(content=b"\0" * (MAX_BODY + 1)), 413, f"limit of {MAX_BODY}"),
    "chunked body over limit": (dict(content=_chunks(MAX_BODY + 100_000)), 413, f"limit of {MAX_BODY}"),
    "not an image": (dict(content=b"this is plain text, not an image"), 415, "not a readable image"),
    "truncated png": (dict(content=_truncated_png()), 415, "truncated"),
    "1x1 image": (dict(content=encode_png(np.zeros((1, 1), np.uint8))), 422, "1x1 pixels"),
    "too many pixels": (dict(content=encode_png(np.zeros((1000, 1001), np.uint8))), 413,
                        f"above the limit of {MAX_PIXELS}"),
    "decompression bomb header": (dict(content=png_header_only(100_000, 100_000)), 413, "too large"),
    "wrong content type": (dict(content=_png(3), headers={"content-type": "text/plain"}), 415,
                           "unsupported content type 'text/plain'"),
    "multipart without file": (dict(files={"image": ("x.png", _png(3), "image/png")}), 422, "'file'"),
    "multipart empty file": (dict(files={"file": ("x.png", b"", "image/png")}), 400, "empty"),
    "multipart text field": (dict(data={"file": "abc"}, files={"other": ("y.png", b"1")}), 422, "file upload"),
    "malformed multipart": (dict(content=b"--nope\r\n", headers={"content-type": "multipart/form-data"}), 400,
                            "multipart"),
    "bad base64": (dict(json={"images": [base64.b64encode(_png(3)).decode(), "%%%not base64%%%"]}), 400,
                   "images[1] is not valid base64"),
    "base64 of a non-image": (dict(json={"images": [base64.b64encode(b"hello").decode()]}), 415,
                              "images[0]: not a readable image"),
    "malformed json": (dict(content=b"{\"images\": [", headers={"content-type": "application/json"}), 400,
                       "malformed JSON"),
    "json without images": (dict(json={"image": "abc"}), 422, '{"images"'),
    "too many images": (dict(json={"images": [base64.b64encode(_png(3)).decode()] * 17}), 413, "limit of 16"),
    "bad mode": (dict(content=_png(3), params={"mode": "fastest"}), 422, "mode must be one of"),
    "bad threshold": (dict(content=_png(3), params={"threshold": "1.5"}), 422, "threshold must be a number"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_input_gets_json_error_and_server_stays_up(server, case):
    kwargs, status, words = BAD_REQUESTS[case]
    r = server.post("/predict", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert words.lower() in r.json()["error"].lower(), r.json()
    assert server.get("/healthz").json()["status"] == "ok"
    assert server.post("/predict", content=_png(11)).status_code == 200


def test_healthz_reports_a_dead_tier(server):
    """Killing the cloud replica makes /healthz answer 503 naming the tier (asked on every call, never
    cached) until Serve has replaced the replica; then it is 200 again."""
    import ray
    from ray.util.state import list_actors

    cloud = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
             if a.class_name == "ServeReplica:resops:CloudClassifier"]
    assert len(cloud) == 1
    assert server.get("/healthz").status_code == 200
    ray.kill(ray.get_actor(cloud[0].name, namespace="serve"), no_restart=True)
    down = _wait_for(lambda: (r := server.get("/healthz")).status_code == 503 and r, "/healthz never saw the dead tier")
    assert "cloud tier did not answer" in down.json()["error"]
    _wait_for(lambda: server.get("/healthz").status_code == 200, "Serve did not replace the cloud replica", timeout=120)
    assert server.post("/predict", content=_png(12), params={"mode": "cloud"}).status_code == 200


def test_explain_answers_the_cloud_label_and_a_grad_cam_png(server, files, tmp_path, capsys):
    """POST /explain: the cloud tier's answer and a heat map PNG over the image as sent (base64 in JSON,
    or the PNG itself with Accept: image/png); `resops predict --explain` saves it."""
    import io

    from PIL import Image

    png = _png(21, shape=(48, 40))
    cloud = server.post("/predict", content=png, params={"mode": "cloud"}).json()
    r = server.post("/explain", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == cloud["label"] and body["model_version"] == VERSION and body["method"] == "grad-cam"
    assert np.allclose([body["probabilities"][c] for c in CLASSES], _probs(cloud), atol=1e-5)
    with Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (40, 48) == tuple(body["heatmap_size"][::-1])
    r = server.post("/explain", files={"file": ("cell.png", png, "image/png")}, headers={"accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["x-label"] == cloud["label"]
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (40, 48)
    from pipelines.cli import main

    img, out = tmp_path / "cell.png", tmp_path / "heat.png"
    img.write_bytes(png)
    assert main(["predict", str(img), "--explain", "-o", str(out), "--url", f"http://127.0.0.1:{server.port}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["label"] == cloud["label"] and printed["heatmap_file"] == str(out)
    with Image.open(out) as im:
        assert im.size == (40, 48)


EXPLAIN_BAD = [c for c in BAD_REQUESTS if c not in ("bad mode", "bad threshold")]  # /explain has no mode


@pytest.mark.parametrize("case", EXPLAIN_BAD)
def test_explain_refuses_bad_input_as_predict_does(server, case):
    kwargs, status, words = BAD_REQUESTS[case]
    if case == "chunked body over limit":  # a generator: the /predict test consumed that one
        kwargs = dict(content=_chunks(MAX_BODY + 100_000))
    r = server.post("/explain", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert words.lower() in r.json()["error"].lower(), r.json()


def test_explain_takes_one_image(server):
    image = base64.b64encode(_png(3)).decode()
    r = server.post("/explain", json={"images": [image, image]})
    assert r.status_code == 422 and "one image" in r.json()["error"]
    assert server.post("/explain", json={"images": [image]}).status_code == 200


def test_unknown_route_is_json_404(server):
    r = server.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_bearer_token_from_the_environment(server, files):
    """A second app whose router's environment holds the token (as a Kubernetes Secret would). Its edge model
    has its own deployment (placement: replica), so that path answers over HTTP too."""
    config = build_serve_config({**_args(files), "auth_token_env": "RESOPS_API_TOKEN",
                                 "edge": {**_args(files)["edge"], "num_replicas": 1, "placement": "replica"}},
                                port=server.port)
    app = config["applications"][0]
    app.update(name="secure", route_prefix="/secure", runtime_env={"env_vars": {"RESOPS_API_TOKEN": TOKEN}})
    # A deploy config is declarative: it lists every application that should run, the open one too.
    deploy_config({**server.config, "applications": [*server.config["applications"], app]})
    try:
        img = _png(21)
        missing = server.post("/secure/predict", content=img)
        assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = server.post("/secure/predict", content=img, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert server.get("/secure/models").status_code == 401
        ok = server.post("/secure/predict", content=img, headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["label"] in CLASSES
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert server.get("/secure/models", headers=auth).json()["edge"]["placement"] == "replica"
        edge = server.post("/secure/predict", content=img, params={"mode": "edge"}, headers=auth).json()
        assert edge["tier"] == "edge"
        np.testing.assert_allclose(_probs(edge), _local_probs(files, [img])["edge"][0], atol=1e-4)
        assert server.get("/secure/healthz").status_code == 200  # probes need no token
        assert server.post("/predict", content=img).status_code == 200  # the open app stays open
    finally:
        serve.delete("secure")


def test_model_file_changed_after_build_fails_at_deploy(server, files, tmp_path):
    """A replica that finds another file than the config was built from refuses to start, naming it."""
    for name in ("full.pt", "edge.pt", "edge_int8.onnx"):
        (tmp_path / name).write_bytes((files / name).read_bytes())
    config = build_serve_config({**_args(tmp_path), "edge": {**_args(files)["edge"], "num_replicas": 1}})
    broken = config["applications"][0]
    broken.update(name="broken", route_prefix="/broken")
    (tmp_path / "full.pt").write_bytes((files / "edge.pt").read_bytes())  # replaced after the build
    with pytest.raises(CheckpointError, match=r"full\.pt has sha256 \w+, not \w+ as recorded in the Serve config"):
        deploy_config({**server.config, "applications": [*server.config["applications"], broken]})
    assert "broken" not in serve.status().applications
    assert server.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------- signals (EEG)
def _eeg(n: int, seed: int = 0) -> np.ndarray:
    from components.data.eeg import synthetic_eeg

    return synthetic_eeg(1, length=n, fs=SIGNAL["fs"], seed=seed).signals[2].astype(np.float64)  # an ictal one


def test_signal_is_cut_into_windows_and_classified_as_scalograms(server, files):
    from components.serve.signal import check_settings, signal_images

    x = _eeg(1300)  # two whole windows of 512; the tail of 276 samples is dropped, as in prepare
    images = signal_images(x, check_settings(SIGNAL))
    expected = _local_probs(files, images)["cloud"]
    r = server.post("/predict_signal", json={"signal": x.tolist(), "mode": "cloud", "fs": 173.61})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["num_windows"] == 2 and body["window_seconds"] == pytest.approx(512 / 173.61)
    for got, want in zip(body["windows"], expected):
        assert got["tier"] == "cloud"
        np.testing.assert_allclose(_probs(got), want, atol=1e-5)
    np.testing.assert_allclose(_probs(body), expected.mean(0), atol=1e-5)
    assert body["label"] == CLASSES[int(np.argmax(expected.mean(0)))]
    # The same signal as a Bonn-style text file and as a .npy array gets the same answer.
    text = "\n".join(f"{v:.9g}" for v in x).encode()
    as_text = server.post("/predict_signal", content=text, params={"mode": "cloud"},
                          headers={"content-type": "text/plain"}).json()
    buf = __import__("io").BytesIO()
    np.save(buf, x)
    as_npy = server.post("/predict_signal", content=buf.getvalue(), params={"mode": "cloud"},
                         headers={"content-type": "application/x-npy"}).json()
    for other in (as_text, as_npy):
        np.testing.assert_allclose(_probs(other), _probs(body), atol=1e-4)
    cascade = server.post("/predict_signal", json={"signal": x.tolist()}).json()  # the default mode
    assert cascade["num_windows"] == 2 and all(w["mode"] == "cascade" for w in cascade["windows"])


BAD_SIGNALS = {
    "not a number": (dict(content=b"1.0\n2.0\nabc\n", headers={"content-type": "text/plain"}), 422,
                     "request body: line 3: not a number"),
    "nan in json": (dict(content=b'{"signal": [1.0, NaN, 2.0]}', headers={"content-type": "application/json"}), 422,
                    "non-finite"),
    "text in json": (dict(json={"signal": [1.0, "x"]}), 422, "signal[1] is not a number"),
    "too short": (dict(json={"signal": [0.5] * 100}), 422, "at least one window of 512"),
    "empty list": (dict(json={"signal": []}), 422, "empty"),
    "empty body": (dict(content=b"", headers={"content-type": "text/plain"}), 400, "empty request body"),
    "wrong rate": (dict(json={"signal": [0.5] * 600, "fs": 256}), 422, "resample"),
    "empty npy": (dict(content=b"", headers={"content-type": "application/x-npy"}), 400, "empty"),
    "not npy": (dict(content=b"\x00\x01garbage", headers={"content-type": "application/x-npy"}), 415, ".npy"),
    "image type": (dict(content=b"abc", headers={"content-type": "image/png"}), 415, "unsupported content type"),
}


@pytest.mark.parametrize("case", list(BAD_SIGNALS))
def test_malformed_signals_get_a_clear_error(server, case):
    kwargs, status, words = BAD_SIGNALS[case]
    r = server.post("/predict_signal", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert words.lower() in r.json()["error"].lower(), r.json()


def test_two_dimensional_npy_is_refused(server):
    buf = __import__("io").BytesIO()
    np.save(buf, np.zeros((2, 600)))
    r = server.post("/predict_signal", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
    assert r.status_code == 422 and "1-D" in r.json()["error"]


# ---------------------------------------------------------------------------- `resops edge` in front of this app
@pytest.fixture()
def edge_bundle(files, tmp_path):
    """The edge bundle of these promoted files, as the calibrate stage writes it."""
    from components.edge.bundle import write_bundle

    write_bundle(tmp_path / "bundle", files / "edge_int8.onnx", model_name="resnet18", model_version=VERSION,
                 class_names=CLASSES, image_size=32, in_chans=1, temperature=TEMPS["edge"], threshold=0.4,
                 max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS, min_image_side=8, max_batch_images=16)
    return tmp_path / "bundle"


def _edge_app(bundle, url, tmp_path, **kw):
    from components.edge.app import create_app

    return create_app(bundle, cloud_url=url, cloud_token_env=None, outbox_dir=tmp_path / "outbox",
                      resend_interval_s=0.2, **kw)


def test_edge_runtime_escalates_to_the_cloud_app(server, files, edge_bundle, tmp_path):
    from netutil import uvicorn_server

    images = [_png(700 + i) for i in range(6)]
    cloud = [server.post("/predict", content=b, params={"mode": "cloud"}).json() for b in images]
    edge_tier = [server.post("/predict", content=b, params={"mode": "edge"}).json() for b in images]
    with uvicorn_server(_edge_app(edge_bundle, f"http://127.0.0.1:{server.port}", tmp_path)) as url, \
            httpx.Client(base_url=url, timeout=30.0) as client:
        for b, want, want_edge in zip(images, cloud, edge_tier):
            up = client.post("/predict", content=b, params={"threshold": 1.0}).json()  # below 1: always escalates
            assert up["tier"] == "cloud" and up["escalated"] is True and up["degraded"] is False
            assert up["label"] == want["label"]
            np.testing.assert_allclose(_probs(up), _probs(want), atol=1e-5)
            assert up["model_versions"] == {"edge": VERSION, "cloud": VERSION}
            local = client.post("/predict", content=b, params={"threshold": 0.0}).json()  # never escalates
            assert local["tier"] == "edge" and local["escalated"] is False
            # The device's Pillow preprocessing and Serve's OpenCV one give the same int8 model's answer.
            np.testing.assert_allclose(_probs(local), _probs(want_edge), atol=0.02)
            assert local["edge_confidence"] == pytest.approx(max(_probs(local)))
        cloud_mode = client.post("/predict", content=images[0], params={"mode": "cloud"}).json()
        assert cloud_mode["tier"] == "cloud" and cloud_mode["edge_confidence"] is None
        health = client.get("/healthz").json()
        assert health["cloud"]["available"] is True and health["outbox"]["pending"] == 0


def _wait_for(predicate, what: str, timeout: float = 30.0):
    import time

    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.1)
    return value


def test_edge_runtime_degrades_queues_and_resends_when_the_cloud_is_down(server, edge_bundle, tmp_path):
    """The cloud goes away (its address refuses connections, as when its process is killed), then hangs
    (accepts, never answers), then comes back: every request is answered, nothing queued is lost."""
    from netutil import TcpRelay, uvicorn_server

    relay = TcpRelay(server.port)
    images = [_png(800 + i) for i in range(5)]
    truth = [server.post("/predict", content=b, params={"mode": "cloud"}).json()["label"] for b in images]
    app = _edge_app(edge_bundle, relay.url, tmp_path, timeout_s=1.0)
    try:
        with uvicorn_server(app) as url, httpx.Client(base_url=url, timeout=30.0) as client:
            assert client.post("/predict", content=images[0], params={"threshold": 1.0}).json()["tier"] == "cloud"
            relay.cut()
            answers = [client.post("/predict", content=b, params={"threshold": 1.0}) for b in images]
            assert [a.status_code for a in answers] == [200] * len(images)
            first = answers[0].json()
            assert first["degraded"] is True and first["tier"] == "edge" and first["escalated"] is False
            assert "unreachable" in first["degraded_reason"]
            # Once the cloud has failed, later escalations answer at once instead of retrying every request.
            assert all("unavailable since the last failure" in a.json()["degraded_reason"] for a in answers[1:])
            assert client.post("/predict", content=b"garbage").status_code == 415  # bad input is still bad input
            assert client.post("/predict", content=images[0], params={"mode": "edge"}).json()["degraded"] is False
            box = client.get("/outbox").json()
            assert box["pending"] == len(images) and box["queued"] == len(images)
            assert client.get("/healthz").json()["cloud"]["available"] is False
            relay.restore()
            box = _wait_for(lambda: (b := client.get("/outbox", params={"recent": 10}).json())["pending"] == 0 and b,
                            "the outbox was not resent after the cloud came back")
            assert box["resent"] == len(images) and box["dropped"] == 0
            assert [r["cloud_label"] for r in box["recent"]] == truth  # oldest first, the cloud's own answers
            assert client.post("/predict", content=images[1], params={"threshold": 1.0}).json()["tier"] == "cloud"
            relay.hang = True  # a cloud that accepts and never answers: the timeout bounds the wait
            slow = client.post("/predict", content=images[2], params={"threshold": 1.0}).json()
            assert slow["degraded"] is True and "did not answer within 1 s" in slow["degraded_reason"]
            assert slow["latency_ms"]["cloud"] < 5000
            relay.hang = False
            _wait_for(lambda: client.get("/outbox").json()["pending"] == 0, "the slow cloud's input was not resent")
    finally:
        relay.close()


def test_user_config_reconfigures_threshold_mode_and_temperature_without_restarting_replicas(server, files):
    """The Serve config's user_config is live: a changed threshold, default mode or temperature takes effect on
    the running replicas (Serve's lightweight update), which keep their actors."""
    import copy

    from ray.util.state import list_actors

    def replicas() -> list[str]:
        return sorted(a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
                      if a.class_name.startswith("ServeReplica:resops:"))

    before = replicas()
    assert len(before) == 3  # 2 routers (with the edge model), 1 cloud
    config = copy.deepcopy(server.config)
    deps = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deps["Router"]["user_config"] == {"threshold": 0.4, "default_mode": "cascade",
                                             "edge_temperature": TEMPS["edge"]}
    deps["Router"]["user_config"] = {"threshold": 0.9, "default_mode": "cloud", "edge_temperature": 2.0}
    deps["CloudClassifier"]["user_config"] = {"temperature": 3.0}
    try:
        deploy_config(config)
        models = _wait_for(lambda: (m := server.get("/models").json())["threshold"] == 0.9
                           and m["cloud"]["temperature"] == 3.0 and m, "the new user_config was not applied")
        assert models["default_mode"] == "cloud" and models["edge"]["temperature"] == 2.0
        answer = server.post("/predict", content=_png(31)).json()
        assert answer["mode"] == "cloud" and answer["tier"] == "cloud"
        x = _tensors([_png(31)])
        model, _ = load_model(files / "full.pt")
        with torch.inference_mode():
            want = softmax(model(torch.from_numpy(x)).numpy(), 3.0)[0]
        np.testing.assert_allclose(_probs(answer), want, atol=1e-4)  # the cloud tier uses the new temperature
        # The ingress edge model uses the new temperature too, whichever router replica answers.
        for _ in range(6):
            edge = server.post("/predict", content=_png(31), params={"mode": "edge"}).json()
            np.testing.assert_allclose(_probs(edge), softmax(OnnxClassifier(files / "edge_int8.onnx").logits(x), 2.0)[0],
                                       atol=1e-4)
        assert replicas() == before  # reconfigured in place, not restarted
    finally:
        deploy_config(server.config)
    _wait_for(lambda: server.get("/models").json()["threshold"] == 0.4, "the original user_config was not restored")


def test_application_metrics_on_rays_metrics_endpoint(server):
    """Requests by tier and mode, escalations, the edge-confidence histogram, errors by reason and latency
    per tier, scraped from the node's Prometheus endpoint as a monitoring stack would."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    for i in range(4):
        assert server.post("/predict", content=_png(40 + i), params={"threshold": 1.0}).json()["escalated"]
    assert server.post("/predict", content=b"not an image").status_code == 415
    assert server.post("/predict", content=b"").status_code == 400
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])

    def samples():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
        found = {}
        for family in text_string_to_metric_families(text):
            if "resops_" in family.name:
                for sample in family.samples:
                    found.setdefault(sample.name.removeprefix("ray_"), []).append(sample)
        ready = (sum(s.value for s in found.get("resops_escalations_total", [])) >= 4
                 and any(s.labels.get("reason") == "http_400" for s in found.get("resops_errors_total", [])))
        return found if ready else None

    found = _wait_for(samples, "the resops metrics did not reach Ray's metrics endpoint", timeout=60.0)
    cascade_cloud = [s for s in found["resops_requests_total"] if s.labels.get("tier") == "cloud"
                     and s.labels.get("mode") == "cascade"]
    assert sum(s.value for s in cascade_cloud) >= 4
    assert any(s.labels.get("reason") == "undecodable" and s.value >= 1 for s in found["resops_errors_total"])
    assert sum(s.value for s in found["resops_edge_confidence_count"]) >= 4
    assert {s.labels.get("tier") for s in found["resops_tier_latency_ms_count"]} >= {"edge", "cloud", "total"}


def _stored(server) -> dict[str, tuple[dict, bytes]]:
    from components.feedback import FeedbackStore

    store = FeedbackStore(str(server.feedback), 10**9)
    out = {}
    for name in store.names():
        try:
            record, image = store.read(name)
        except FileNotFoundError:  # evicted between the listing and the read
            continue
        out[record["sha256"]] = (record, image)
    return out


def _wait_stored(server, sha: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while sha not in (stored := _stored(server)):
        assert time.monotonic() < deadline, f"no feedback record of {sha[:12]} after {timeout:g} s"
        time.sleep(0.05)
    return stored


def test_feedback_keeps_escalated_requests_within_its_bound(server, files):
    """serve.feedback over real HTTP: every escalated request is stored (image, both tiers' probabilities, the
    answer, versions); confident ones are not (rate 0); the store stays under max_bytes, oldest evicted first."""
    import hashlib

    images = [_png(1200 + i) for i in range(8)]
    sent = []
    for data in images:  # threshold 1.0: every cascade request escalates; one at a time, so one writer at a time
        body = server.post("/predict", content=data, params={"mode": "cascade", "threshold": 1.0}).json()
        assert body["escalated"] is True, body
        sha = hashlib.sha256(data).hexdigest()
        stored = _wait_stored(server, sha)
        record, image = stored[sha]
        assert image == data and record["reason"] == "escalated" and record["source"] == "serve"
        assert record["answer"]["label"] == body["label"] and record["answer"]["tier"] == "cloud"
        assert set(record["edge"]["probabilities"]) == set(record["cloud"]["probabilities"]) == set(CLASSES)
        assert record["model_versions"] == body["model_versions"] and record["threshold"] == 1.0
        sent.append(sha)
    confident = _png(1299)
    assert server.post("/predict", content=confident, params={"mode": "cascade", "threshold": 0.0}).json()["escalated"] is False
    stored = _stored(server)  # the router chose before it answered: a confident request is never queued
    assert hashlib.sha256(confident).hexdigest() not in stored
    size = sum(p.stat().st_size for p in server.feedback.iterdir() if p.is_file())
    assert size <= FEEDBACK_CAP, size
    kept = [s for s in sent if s in stored]
    assert 2 <= len(kept) < len(sent) and kept == sent[-len(kept):]  # the newest kept, the oldest evicted
    stats = server.get("/feedback").json()  # one replica's counters
    assert stats["enabled"] is True and stats["dropped"] == 0 and stats["max_bytes"] == FEEDBACK_CAP
