"""The whole path for real: `dvc repro` on a tiny synthetic set through every stage on a real Ray,
DVC's up-to-date check and partial re-runs, push/pull through the default remote, then the
promoted model served over real HTTP by `resops serve`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from components.data.images import encode_png
from tests.conftest import free_port
from tests.wandb_offline import history as wandb_history

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "prepare", "augment", "gan", "rebalance", "train", "prune", "evaluate", "promote", "calibrate",
          "report"]
AFTER_TRAIN = ["train", "prune", "evaluate", "promote", "calibrate", "report"]
# Enough images and steps that the tiny model learns the synthetic classes (the learning floor below).
NUM_IMAGES, EPOCHS = 240, 8
TINY = {
    "data.dataset": "synthetic", "data.task": "multiclass",
    "data.synthetic": {"num_images": NUM_IMAGES, "image_size": 32, "num_classes": 2, "imbalance": 0.7},
    "model.image_size": 32, "train.epochs": EPOCHS, "train.batch_size": 16, "train.threads_per_worker": 1,
    "train.shuffle_buffer": 0, "prune.finetune_max_steps": 30, "evaluate.batch_size": 32,
    "gan.image_size": 16, "gan.epochs": 2, "gan.batch_size": 16, "gan.z_dim": 16, "gan.base_channels": 8,
    "gan.threads_per_worker": 1, "gan.quality.samples_per_class": 8, "gan.quality.image_size": 16,
    "gan.quality.epochs": 2, "prune.quantize.calibration_images": 32,
    "serve.edge.num_replicas": 1, "serve.cloud.num_cpus": 0.5,
    # Promotion itself is tested in test_registry.py; here the tiny model must reach serving.
    "promote.gates": {"min_accuracy": None, "min_balanced_accuracy": None, "min_macro_f1": None,
                      "min_gain_over_majority": None, "compare_metric": "macro_f1", "max_regression": None},
}


def _set(tree: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        tree = tree[k]
    tree[last] = value


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def _digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def copy_pipeline(proj: Path, params: dict | None = None) -> None:
    """This repo's pipeline (dvc.yaml, code) into ``proj``, with params.yaml = TINY + ``params``."""
    for item in ("dvc.yaml", "components", "pipelines"):
        src = ROOT / item
        (shutil.copytree(src, proj / item,  # not the detection subrepo's DVC cache
                         ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local"))
         if src.is_dir() else shutil.copy2(src, proj / item))
    (proj / "data/extra").mkdir(parents=True, exist_ok=True)  # the prepare stage's dep (data.extra folders)
    shutil.copy2(ROOT / "data/extra/README.md", proj / "data/extra/README.md")
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    for k, v in {**TINY, **(params or {})}.items():
        _set(tree, k, v)
    (proj / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


# Balanced accuracy the tiny run must reach on its test split (chance: 0.5), for the full model and the
# pruned / int8 edge models.
LEARNING_FLOOR = {"full": 0.8, "edge": 0.7}
FEEDBACK = "data/extra/fb"  # labelled feedback the project's training split takes in (data.extra)
FEEDBACK_IMAGES = 12
SERVED: dict = {}  # what the project fixture's feedback store held (sha256s) and which file a person moved


def _feedback_store(store: Path) -> list[str]:
    """A feedback store as serving leaves it: escalated synthetic images with the cloud's (right) labels."""
    from components.data.sources import SYNTHETIC_CLASSES, synthetic_image
    from components.feedback import FeedbackRecorder

    rng = np.random.default_rng(7)
    rec = FeedbackRecorder({"enabled": True, "location": str(store)}, source="serve")
    shas = []
    for i in range(FEEDBACK_IMAGES):
        label = i % 2
        png = encode_png(synthetic_image(label, 32, rng))
        name = SYNTHETIC_CLASSES[label]
        answer = {"label": name, "label_index": label, "tier": "cloud", "mode": "cascade", "escalated": True,
                  "edge_confidence": 0.4, "model_versions": {"edge": "v1-e", "cloud": "v1-c"}}
        assert rec.offer(png, answer, threshold=0.5, edge={"label": SYNTHETIC_CLASSES[1 - label]},
                         cloud={"label": name, "probabilities": {name: 0.9}}) == "escalated"
        shas.append(hashlib.sha256(png).hexdigest())
    assert rec.flush() and rec.stats()["recorded"] == FEEDBACK_IMAGES
    rec.close()
    return shas


@pytest.fixture(scope="module")
def project(tmp_path_factory, ray_address):
    """A fresh git + DVC project holding this repo's pipeline, with tiny params, and the feedback loop's
    first three commands done: serving's feedback exported (`resops feedback export`), one label corrected
    by moving its file, the folder `dvc add`ed and named in data.extra."""
    proj = tmp_path_factory.mktemp("project")
    copy_pipeline(proj, {"data.extra": [FEEDBACK]})
    shutil.copytree(ROOT / ".dvc", proj / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    env = dict(os.environ, RAY_ADDRESS=ray_address, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    _run(["git", "init", "-q"], proj, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init", "--allow-empty"], proj, env)
    (proj / ".gitignore").write_text("/.dvcstore/\n/wandb/\n/models/train/checkpoints/\n")
    store = tmp_path_factory.mktemp("served") / "feedback"
    SERVED.update(shas=_feedback_store(store))
    out = _run([str(Path(sys.executable).parent / "resops"), "feedback", "export", "--from", str(store),
                "--to", FEEDBACK], proj, env)
    assert f"{FEEDBACK_IMAGES} images to {FEEDBACK}" in out, out
    moved = next((proj / FEEDBACK / "ok").iterdir())  # a person's correction: this one is a crack
    moved.rename(proj / FEEDBACK / "crack" / moved.name)
    _run(["dvc", "add", "-q", FEEDBACK], proj, env)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "pipeline"], proj, env)
    SERVED.update(moved=moved.name)
    return proj, env


@pytest.fixture(scope="module")
def repro(project):
    proj, env = project
    out = _run(["dvc", "repro"], proj, dict(env, RESOPS_PROGRESS="on"))  # bars as on a terminal (checked below)
    return proj, env, out


def test_repro_runs_every_stage_and_writes_outputs(repro):
    proj, env, out = repro
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, f"stage {stage} did not run:\n{out[-3000:]}"
    # RESOPS_PROGRESS=on (the repro fixture) draws into this log the bars a terminal shows: the driver's
    # bar of the Ray Train loop, and those of the loops in the stage processes
    for drawn in ("prepare: 100%|", "train: 100%|", "prune fine-tune (", "evaluate (full)", "calibrate ("):
        assert drawn in out, f"no {drawn!r} progress bar:\n{out[-3000:]}"
    report = json.loads((proj / "data/prepared/report.json").read_text())
    assert report["num_prepared"] == NUM_IMAGES + FEEDBACK_IMAGES
    assert len(list((proj / "data/prepared/shards").glob("*.parquet"))) >= 1
    train = json.loads((proj / "metrics/train.json").read_text())
    assert train["epochs_run"] == EPOCHS and train["resumed_from_epoch"] == 0
    assert len((proj / "plots/train_history.csv").read_text().strip().splitlines()) == 1 + EPOCHS
    # wandb (offline, as the fixture sets WANDB_MODE) logged every epoch's metrics: read back from its run file
    history = pd.read_csv(proj / "plots/train_history.csv")
    run_files = sorted(proj.rglob(f"run-{train['run_name']}.wandb"))
    assert run_files, f"no wandb run file for {train['run_name']} under {proj}: {sorted(proj.rglob('*.wandb'))}"
    logged = wandb_history(run_files[-1])
    assert [r["_step"] for r in logged] == list(range(1, EPOCHS + 1)), logged
    for row, (_, epoch) in zip(logged, history.iterrows()):
        for key in ("train_loss", "val_accuracy", "val_macro_f1"):
            assert row[key] == pytest.approx(epoch[key]), (key, row, dict(epoch))
    prune = json.loads((proj / "metrics/prune.json").read_text())  # the default edge model: structured + int8
    assert prune["method"] == "structured" and prune["distill"]["enabled"]
    assert abs(prune["macs_after"] / prune["macs_before"] - 0.5) < 0.05
    assert prune["file_bytes_int8"] < prune["file_bytes_onnx"] / 3
    ev = json.loads((proj / "metrics/evaluate.json").read_text())
    assert set(ev) == {"full", "pruned", "int8"}
    for model in ("full", "pruned", "int8"):
        assert ev[model]["num_samples"] == report["num_prepared"] - sum(report["counts"]["train"].values()) \
            - sum(report["counts"]["val"].values())
        assert 0.0 <= ev[model]["macro_f1"] <= 1.0
    # The synthetic classes (clean cell / cell with a dark crack line) are easy: a model that learned
    # nothing scores 0.5 balanced accuracy (chance with 2 classes), a broken loop fails here.
    print("e2e balanced accuracy:", {m: round(ev[m]["balanced_accuracy"], 3) for m in ev})
    assert ev["full"]["balanced_accuracy"] >= LEARNING_FLOOR["full"], ev["full"]
    assert min(ev["pruned"]["balanced_accuracy"], ev["int8"]["balanced_accuracy"]) >= LEARNING_FLOOR["edge"], ev
    for picture in ("gradcam_full.png", "gradcam_pruned.png"):  # Grad-CAM grids of the torch models
        assert (proj / "reports/evaluation" / picture).stat().st_size > 0
    # report: one page, every file it shows beside it, the curves drawn (SVG), the Grad-CAM grids in it.
    from tests.test_report import referenced_files

    html = (proj / "reports/report/index.html").read_text()
    refs = referenced_files(html)
    assert {"gradcam_full.png", "gradcam_pruned.png", "roc_full.svg", "pr_full.svg", "reliability.svg",
            "cascade.svg", "training.svg"} <= set(refs), refs
    assert all((proj / "reports/report" / r).stat().st_size > 0 for r in refs)
    card = json.loads((proj / "models/serve/model_card.json").read_text())
    assert card["metrics"]["accuracy"]["ci95"][0] <= card["metrics"]["accuracy"]["value"] <= \
        card["metrics"]["accuracy"]["ci95"][1]
    assert "Licence" in (proj / "models/serve/MODEL_CARD.md").read_text()
    registry = json.loads((proj / "models/registry.json").read_text())
    entry = registry["entries"][-1]
    assert registry["promoted"] == entry["version"] and entry["status"] == "promoted"
    assert entry["data_version"]["dvc_md5"], "the data version (DVC hash of data/prepared) is recorded"
    for name in ("full.pt", "edge.pt", "edge_int8.onnx"):
        assert (proj / "models/promoted" / name).exists(), name
    assert "pruned" in entry["metrics"] and "int8" in entry["metrics"]
    # calibrate: temperatures, a threshold in [0, 1] and the Serve config of the promoted models.
    serve_metrics = json.loads((proj / "metrics/serve.json").read_text())
    assert serve_metrics["edge_temperature"] > 0 and 0 <= serve_metrics["threshold"] <= 1
    assert 0 <= serve_metrics["test_escalation_rate"] <= 1
    from components.serve.config import load_serve_config

    app = load_serve_config(proj / "models/serve/serve_config.yaml")["applications"][0]
    assert app["args"]["model_version"] == entry["version"] and app["args"]["edge_onnx"].endswith("edge_int8.onnx")
    assert app["args"]["threshold"] == serve_metrics["threshold"]
    # The int8 edge model runs in the ingress (serve.edge.placement auto): two deployments.
    assert {d["name"] for d in app["deployments"]} == {"Router", "CloudClassifier"}
    # ... and the edge bundle for `resops edge` on a device: the same int8 file, temperature and threshold.
    from components.edge.bundle import load_bundle

    bundle, onnx = load_bundle(proj / "models/serve/edge")
    assert onnx.read_bytes() == (proj / "models/promoted/edge_int8.onnx").read_bytes()
    assert bundle.model_version == entry["version"] and bundle.threshold == serve_metrics["threshold"]
    assert bundle.temperature == serve_metrics["edge_temperature"] and len(bundle.class_names) == 2
    # ... and the drift reference (serve.drift): statistics of this run's training split, in the bundle too.
    ref = json.loads((proj / "models/serve/drift_reference.json").read_text())
    report = json.loads((proj / "data/prepared/report.json").read_text())
    assert ref["train_images"] == sum(report["counts"]["train"].values()) > 0, (ref["train_images"], report["counts"])
    assert ref["val_images"] == sum(report["counts"]["val"].values()) > 0
    assert app["args"]["drift"]["reference"] == "models/serve/drift_reference.json"
    assert (proj / "models/serve/edge" / bundle.drift_reference).read_bytes() == \
        (proj / "models/serve/drift_reference.json").read_bytes()
    # `dvc metrics show` reads the declared metrics files.
    shown = _run(["dvc", "metrics", "show", "--json"], proj, env)
    assert "metrics/evaluate.json" in shown and "metrics/train.json" in shown and "metrics/serve.json" in shown


def test_feedback_reaches_the_training_split_only_and_the_registry_names_its_version(repro):
    """The loop's last command (`dvc repro` with data.extra): serving's feedback, exported and corrected, is in
    the training rows and nowhere else; val and test are the real images' split as before."""

    proj, _, _ = repro
    manifest = pd.read_parquet(proj / "data/prepared/manifest.parquet")
    fb, real = manifest[manifest["source"] == "feedback"], manifest[manifest["source"] == "real"]
    assert len(fb) == FEEDBACK_IMAGES and set(fb["split"]) == {"train"} and set(fb["sha256"]) == set(SERVED["shas"])
    assert len(real) == NUM_IMAGES and set(real["split"]) == {"train", "val", "test"}
    attrs = [json.loads(a) for a in fb["attrs"]]
    assert all(a["extra_dir"] == FEEDBACK and a["reason"] == "escalated" for a in attrs)
    moved = fb[fb["path"].str.endswith(SERVED["moved"])]
    assert list(moved["label_name"]) == ["crack"] and json.loads(moved["attrs"].iloc[0])["label_source"] == "person"
    assert sorted(a["label_source"] for a in attrs) == ["model:cloud"] * (FEEDBACK_IMAGES - 1) + ["person"]
    rebalanced = pd.read_parquet(proj / "data/rebalanced/shards", columns=["sha256", "split"])
    assert set(SERVED["shas"]) <= set(rebalanced.loc[rebalanced["split"] == "train", "sha256"])
    entry = json.loads((proj / "models/registry.json").read_text())["entries"][-1]
    [extra] = entry["data_version"]["extra"]
    report = json.loads((proj / "data/prepared/report.json").read_text())
    assert extra["path"] == FEEDBACK and extra["rows"] == FEEDBACK_IMAGES and extra["version"] == report["extra"][0]["version"]
    assert extra["label_sources"] == {"model:cloud": FEEDBACK_IMAGES - 1, "person": 1}


def test_dvc_plots_show_draws_every_plot_offline(repro, tmp_path):
    """`dvc plots show` renders each plot dvc.yaml lists, into a page that loads Vega from the project."""
    proj, env, _ = repro
    _run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], proj, env)
    html = (tmp_path / "plots/index.html").read_text()
    from tests.test_report import referenced_files

    refs = referenced_files(html)  # fails on a remote script or stylesheet
    spec = yaml.safe_load((proj / "dvc.yaml").read_text())["plots"]
    titles = [next(iter(p)) for p in spec if isinstance(p, dict)]
    images = [p for p in spec if isinstance(p, str)]
    assert len(titles) == 6 and len(images) == 6  # confusion x2, Grad-CAM x2, samples per class, GAN samples
    for title in titles:
        assert json.dumps(title)[1:-1] in html, title
    assert html.count("vegaEmbed(") >= len(titles)
    for image in images:
        match = [r for r in refs if r.endswith(image.replace("/", "_"))]
        assert match and (tmp_path / "plots" / match[0]).stat().st_size > 0, (image, refs)
    assert "window.vegaEmbed" in html  # the inline bundle of .dvc/plots/offline.html


def test_second_repro_is_up_to_date(repro):
    proj, env, _ = repro
    out = _run(["dvc", "repro"], proj, env)
    assert "Running stage" not in out
    status = _run(["dvc", "status"], proj, env)
    assert "up to date" in status, status


def test_changing_a_train_knob_invalidates_train_and_later_stages_only(repro):
    """train.epochs and model.name are train-stage params: DVC finds only train changed (by those two
    params), and what a repro then re-runs is train and the stages downstream of it, never ingest..gan.
    Checked without re-running them (each stage is a process joining Ray: ~30 s on 2 cores); the
    variants themselves are built, trained, pruned and exported in tests/test_models.py and
    tests/test_compress.py, and take the whole DVC path in the slow run below."""
    proj, env, _ = repro
    params = proj / "params.yaml"
    before = params.read_text()
    tree = yaml.safe_load(before)
    tree["train"]["epochs"], tree["model"]["name"] = 2, "se_resnet18"
    params.write_text(yaml.safe_dump(tree, sort_keys=False))
    try:
        status = json.loads(_run(["dvc", "status", "--json"], proj, env))
        dry = _run(["dvc", "repro", "--dry"], proj, env)
        downstream = _run(["dvc", "repro", "--dry", "--force-downstream"], proj, env)
    finally:
        params.write_text(before)
    assert set(status) == {"train"}, status
    changed = {k for entry in status["train"] for k in entry.get("changed deps", {}).get("params.yaml", {})}
    assert changed == {"train", "model"}, status  # the stage's param groups, as DVC names them
    assert [s for s in STAGES if f"Running stage '{s}'" in dry] == ["train"], dry[-3000:]
    assert [s for s in STAGES if f"Running stage '{s}'" in downstream] == AFTER_TRAIN, downstream[-3000:]
    assert "up to date" in _run(["dvc", "status"], proj, env)  # params restored: nothing left changed


def _commit(proj: Path, env: dict) -> None:
    """The workspace as a commit: `dvc exp run` experiments start from HEAD (dvc.lock included)."""
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "repro", "--allow-empty"], proj, env)


def _check_variant(proj: Path, variant: str, epochs: int) -> None:
    train = json.loads((proj / "metrics/train.json").read_text())
    assert train["run_name"].startswith(f"train-{variant}-") and train["epochs_run"] == epochs
    from components.models import load_model

    for path in ("models/train/model.pt", "models/prune/model.pt"):  # the default edge model: structured
        model, meta = load_model(proj / path)
        assert meta["model_name"] == variant and type(model).__name__ == "ResNet"
    assert "structured" in meta  # every variant can be channel-pruned
    ev = json.loads((proj / "metrics/evaluate.json").read_text())
    assert ev["full"]["num_samples"] > 0 and 0 <= ev["pruned"]["macro_f1"] <= 1


def test_push_delete_pull_restores_prepared_data_byte_for_byte(repro):
    proj, env, _ = repro
    before = _digest(proj / "data/prepared")
    assert before
    _run(["dvc", "push"], proj, env)
    shutil.rmtree(proj / ".dvc/cache")
    shutil.rmtree(proj / "data/prepared")
    _run(["dvc", "pull", "data/prepared"], proj, env)
    assert _digest(proj / "data/prepared") == before
    # Everything else back in the cache too: an out missing from the cache makes DVC re-run its stage.
    _run(["dvc", "pull"], proj, env)
    assert "up to date" in _run(["dvc", "status"], proj, env)


def test_a_clone_keeps_the_registry_history_and_the_next_promotion_extends_it(repro, tmp_path):
    """models/registry.json is versioned in git (a cache: false out): a fresh clone has the promotion
    history, and a promotion there compares with the promoted version instead of starting again at v1."""
    proj, env, _ = repro
    _commit(proj, env)
    registry = json.loads((proj / "models/registry.json").read_text())
    assert registry["promoted"] and "models/registry.json" in _run(["git", "ls-files", "models"], proj, env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(proj), str(clone)], tmp_path, env)
    assert json.loads((clone / "models/registry.json").read_text()) == registry
    _run(["dvc", "cache", "dir", "--local", str(proj / ".dvc/cache")], clone, env)  # the outs, without a remote
    _run(["dvc", "checkout", "-q"], clone, env)
    _run(["dvc", "repro", "--force", "--single-item", "promote"], clone, env)
    after = json.loads((clone / "models/registry.json").read_text())
    assert after["entries"][:-1] == registry["entries"] and len(after["entries"]) == len(registry["entries"]) + 1
    assert after["entries"][-1]["previous"] == registry["promoted"]
    assert after["entries"][-1]["version"].startswith(f"v{len(registry['entries']) + 1}-")


def _png(size: int = 32) -> bytes:
    rng = np.random.default_rng(0)
    return encode_png(rng.integers(0, 255, (size, size), dtype=np.uint8))


def test_resops_serve_answers_over_http(repro):
    proj, env, _ = repro
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port)], cwd=proj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.monotonic() + 180, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(0.5)
        assert ready, f"server did not become healthy: {proc.poll()}"
        registry = json.loads((proj / "models/registry.json").read_text())
        r = httpx.post(f"{base}/predict", content=_png(), headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_versions"] == {"edge": registry["promoted"]} or body["escalated"]
        assert set(body["model_versions"].values()) == {registry["promoted"]} and body["mode"] == "cascade"
        assert body["label"] in {"crack", "ok"} and abs(sum(body["probabilities"].values()) - 1) < 1e-4
        card = httpx.get(f"{base}/models", timeout=30).json()["model_card"]  # the promoted version's card
        assert card["version"] == registry["promoted"] and card["dataset"]["licence"]
        assert card["metrics"]["accuracy"]["ci95"] is not None
        r = httpx.post(f"{base}/explain", content=_png(), headers={"accept": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
        for mode in ("edge", "cloud"):
            r = httpx.post(f"{base}/predict", params={"mode": mode}, content=_png(), timeout=30)
            assert r.status_code == 200 and r.json()["tier"] == mode, r.text
        r = httpx.post(f"{base}/predict", files={"file": ("cell.png", _png(), "image/png")}, timeout=30)
        assert r.status_code == 200 and r.json()["label"] in {"crack", "ok"}
        # Malformed inputs: a 4xx JSON error that names the problem, and the server stays up.
        r = httpx.post(f"{base}/predict", content=b"", headers={"content-type": "image/png"}, timeout=30)
        assert 400 <= r.status_code < 500 and "empty" in r.json()["error"].lower()
        r = httpx.post(f"{base}/predict", content=b"this is not an image", timeout=30)
        assert 400 <= r.status_code < 500 and "image" in r.json()["error"].lower()
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        drift = httpx.get(f"{base}/drift", timeout=10).json()  # the watch runs; a few inputs declare nothing
        assert drift["enabled"] and drift["inputs_seen"] >= 4 and drift["score"] is None and not drift["drifted"]
        # The CLI client prints the same answer.
        img = proj / "cell.png"
        img.write_bytes(_png())
        cli = _run([sys.executable, "-m", "pipelines.cli", "predict", str(img), "--url", base, "--mode", "cloud"],
                   proj, env)
        assert json.loads(cli)["label"] in {"crack", "ok"} and json.loads(cli)["tier"] == "cloud"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


# Every variant is built, trained, pruned and exported in tests/test_models.py and channel-pruned in
# tests/test_compress.py; the whole DVC path (dvc exp run of train and everything after it) is the
# slow run's.
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["se_resnet18", "resnet18_simam", "resnet18_k2"])
def test_every_model_variant_trains_through_dvc_exp_run(repro, variant):
    proj, env, _ = repro
    _commit(proj, env)
    out = _run(["dvc", "exp", "run", "-S", f"model.name={variant}", "-S", "train.epochs=1",
                "-S", "prune.quantize.enabled=false"], proj, env)
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == AFTER_TRAIN, out[-3000:]
    _check_variant(proj, variant, epochs=1)


# The next two re-run most stages (each a process joining Ray: ~30 s a stage on 2 cores); they run with
# `pytest -m slow`. Their parts are in CI: GAN training and GAN rows in test_gan.py/test_rebalance.py,
# sparse models in test_prune.py/test_compress.py, EEG prepare/serving in test_eeg_prepare.py/test_serve.py.
@pytest.mark.slow
def test_gan_rows_and_an_unstructured_sparse_edge_model_end_to_end(repro):
    """rebalance.strategy=gan: a generator is trained and its rows reach training only.
    prune.method=unstructured: the edge model is a sparse file at the requested sparsity, served by torch.
    (One experiment for both: each `dvc exp run` through train costs minutes on 2 cores.)"""
    proj, env, _ = repro
    _commit(proj, env)
    # RESOPS_PROGRESS=on: the GAN's Ray Train loop has its bar on the driver too
    out = _run(["dvc", "exp", "run", "-S", "model.name=resnet18", "-S", "rebalance.strategy=gan",
                "-S", "rebalance.target_ratio=1.0", "-S", "train.epochs=1", "-S", "prune.method=unstructured",
                "-S", "prune.sparsity=0.5", "-S", "prune.quantize.enabled=false"], proj, dict(env, RESOPS_PROGRESS="on"))
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == ["gan", "rebalance", *AFTER_TRAIN], out[-3000:]
    for drawn in ("gan: 100%|", "train: 100%|"):
        assert drawn in out, f"no {drawn!r} progress bar:\n{out[-3000:]}"
    gan = json.loads((proj / "metrics/gan.json").read_text())
    assert gan["enabled"] and gan["epochs"] == 2 and gan["quality"]["fd"] >= 0
    assert (proj / "reports/gan/samples.png").stat().st_size > 0

    rows = pd.read_parquet(proj / "data/rebalanced/shards")
    fake = rows[rows["source"] == "gan"]
    assert len(fake) > 0 and set(fake["split"]) == {"train"}
    assert set(fake["generator_version"] if "generator_version" in fake else
               fake["attrs"].map(lambda a: json.loads(a)["generator_version"])) == {gan["version"]}
    counts = rows["label"].value_counts()
    assert counts.min() == counts.max(), counts  # target_ratio 1.0: every class raised to the majority
    reb = json.loads((proj / "data/rebalanced/rebalance.json").read_text())
    assert reb["generator_version"] == gan["version"]
    # Synthetic rows never reach evaluation: the test split comes from data/prepared only.
    ev = json.loads((proj / "metrics/evaluate.json").read_text())
    prepared = pd.read_parquet(proj / "data/prepared/manifest.parquet")
    assert ev["full"]["num_samples"] == int((prepared["split"] == "test").sum())
    prune = json.loads((proj / "metrics/prune.json").read_text())
    assert prune["method"] == "unstructured" and abs(prune["measured_sparsity"] - 0.5) < 0.01
    assert prune["file_bytes_edge"] < prune["file_bytes_full"] and (proj / "models/prune/model.npz").exists()
    ev = json.loads((proj / "metrics/evaluate.json").read_text())
    assert set(ev) == {"full", "pruned"}
    assert (proj / "models/promoted/edge.npz").exists()
    from components.serve.config import load_serve_config

    args = load_serve_config(proj / "models/serve/serve_config.yaml")["applications"][0]["args"]
    assert args["edge_model"].endswith("edge.npz") and "edge_onnx" not in args


@pytest.mark.slow
def test_eeg_pipeline_runs_end_to_end_on_synthetic_signals(repro):
    """Signals in (a Bonn-layout folder of synthetic EEG), CWT scalograms versioned as the prepared
    data, then the same train/prune/evaluate/promote/calibrate stages as images."""
    proj, env, _ = repro
    # rebalance and prune set back: earlier experiments in this project left gan and unstructured in params.yaml.
    _commit(proj, env)
    sets = ["data.dataset=eeg_synthetic", "data.task=3class", "rebalance.strategy=random_over", "prune.method=structured",
            "data.eeg.synthetic.n_per_set=4", "data.eeg.window=1024",
            "data.eeg.overlap=0", "data.eeg.reassemble_per_class=4", "data.eeg.cwt.num_scales=16",
            "data.eeg.cwt.out_size=[32,32]", "augment.policy=none", "train.epochs=1", "prune.quantize.enabled=false"]
    out = _run(["dvc", "exp", "run", *[a for kv in sets for a in ("-S", kv)]], proj, env)
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == STAGES, out[-3000:]
    report = json.loads((proj / "data/prepared/report.json").read_text())
    assert report["modality"] == "eeg" and report["class_names"] == ["normal", "interictal", "ictal"]
    assert report["num_recordings"] == 20  # 4 per Bonn set, 5 sets
    assert report["reassembled"] == {"normal": 4, "interictal": 4, "ictal": 4}
    assert report["num_prepared"] == 20 * 4 + 12  # 4 windows of 1024 per 4097-sample recording
    assert (proj / "data/prepared/samples.png").stat().st_size > 0
    ev = json.loads((proj / "metrics/evaluate.json").read_text())
    assert ev["full"]["num_samples"] == sum(report["counts"]["test"].values())
    from components.models import load_model

    files = json.loads((proj / "models/promoted/model.json").read_text())["files"]
    model, meta = load_model(proj / files["full"])
    assert meta["num_classes"] == 3 and meta["in_chans"] == 1
