"""The detection pipeline end to end: `dvc repro` of pipelines/detect/dvc.yaml (a DVC subrepo, so the
root pipeline's `dvc repro` never runs it) in a fresh git + DVC project on tiny synthetic scenes:
scenes -> shards -> Ray Train -> pruning -> mAP -> promoted models and a Serve config for POST /detect."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.test_pipeline_e2e import ROOT, _run, _set

# Small, but enough scenes and epochs that the detector learns the two kinds of lumps (the floor below).
NUM_IMAGES, EPOCHS = 96, 20
# Test mAP@0.5 of this tiny run (15 test images) moved between 0.020 and 0.103 over four runs of 20 epochs; the
# same network untrained (re-initialised, three seeds) scores 0.00003-0.001 on that test split. The floor
# sits 10x above the untrained scores and below every trained one seen.
MAP_50_FLOOR = 0.01
TINY = {"data.synthetic": {"num_images": NUM_IMAGES, "scene_size": 96, "min_objects": 2, "max_objects": 4},
        "model.image_size": 64, "model.width": 0.5, "train.epochs": EPOCHS, "train.batch_size": 8, "train.warmup_steps": 4,
        "train.threads_per_worker": 2, "wandb.mode": "disabled", "prune.finetune_epochs": 1,
        "evaluate.latency_runs": 3}
STAGES = ["ingest", "prepare", "train", "prune", "evaluate", "promote"]


def test_detection_pipeline_runs_with_dvc_repro(tmp_path, ray_address):
    proj = tmp_path / "proj"
    proj.mkdir()
    for item in ("components", "pipelines"):
        shutil.copytree(ROOT / item, proj / item,
                        ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local"))
    shutil.copytree(ROOT / ".dvc", proj / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    work = proj / "pipelines" / "detect"
    for produced in ("data", "models", "metrics", "plots", "reports", "dvc.lock"):  # a local run's outputs
        target = work / produced
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    tree = yaml.safe_load((ROOT / "pipelines/detect/params.yaml").read_text())
    for k, v in TINY.items():
        _set(tree, k, v)
    (work / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    env = dict(os.environ, RAY_ADDRESS=ray_address, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    _run(["git", "init", "-q"], proj, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init", "--allow-empty"], proj, env)
    (proj / ".gitignore").write_text("/pipelines/detect/models/train/checkpoints/\n")
    out = _run(["dvc", "repro"], work, env)
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == STAGES, out[-3000:]
    prep = json.loads((work / "data/prepared/report.json").read_text())
    assert prep["task"] == "detect" and prep["num_prepared"] == NUM_IMAGES and prep["class_names"] == ["coal", "gangue"]
    train = json.loads((work / "metrics/train.json").read_text())
    assert train["epochs_run"] == EPOCHS and 0 <= train["val_map_50"] <= 1
    assert train["anchors"]["source"] == "kmeans" and train["anchors"]["fitness"] > train["anchors"]["fitness_yolov3_default"]
    prune = json.loads((work / "metrics/prune.json").read_text())
    assert prune["method"] == "unstructured" and abs(prune["sparsity"]["target_sparsity_measured"] - 0.5) < 0.01
    assert prune["file_bytes_edge"] < prune["file_bytes_full"]
    ev = json.loads((work / "metrics/evaluate.json").read_text())
    assert set(ev) == {"full", "pruned"} and ev["full"]["num_images"] == prep["images"]["test"]
    print("detection e2e mAP@0.5:", {name: round(ev[name]["map_50"], 3) for name in ev})
    assert ev["full"]["map_50"] >= MAP_50_FLOOR, ev["full"]
    for name in ("full", "pruned"):
        assert 0 <= ev[name]["map_50_95"] <= ev[name]["map_50"] + 1e-9 <= 1 + 1e-9 and ev[name]["ms_per_frame_median"] > 0
        assert (work / f"reports/evaluation/pr_{name}.png").stat().st_size > 0
        assert (work / f"reports/evaluation/predictions_{name}.png").stat().st_size > 0
    assert sorted(p.name for p in (work / "models/promoted").iterdir()) == ["edge.npz", "full.pt", "model.json"]
    config = yaml.safe_load((work / "models/serve/serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    assert args["edge_model"].endswith("edge.npz") and args["detection"]["score_threshold"] == 0.25
    status = subprocess.run(["dvc", "status"], cwd=work, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    # The root project's pipeline does not include the detection stages.
    root = subprocess.run(["dvc", "stage", "list"], cwd=proj, env=env, capture_output=True, text=True)
    assert "promote" not in root.stdout and "ingest" not in root.stdout, root.stdout + root.stderr
