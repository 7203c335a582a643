"""Detector training through Ray Train (components.train.fit picks the detection loop): synthetic
conveyor scenes in YOLO format -> prepared shards -> epochs with checkpoints -> resume."""
from __future__ import annotations

import json

import pytest
import torch

from components.data.detection import read_yolo, synthetic_conveyor, write_yolo
from components.data.detection_prepare import prepare_detection
from components.models import load_model
from components.models.detector import ResNetYOLO, detect
from components.train import fit


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    images, boxes = synthetic_conveyor(40, 64, seed=7, max_objects=3, min_radius=0.1, max_radius=0.2)
    write_yolo(root / "raw", images, boxes, ["coal", "gangue"])
    res = prepare_detection(read_yolo(root / "raw"), root / "prepared", dataset="synthetic_conveyor", seed=1)
    return root, res


def test_prepare_writes_boxes_and_a_split_by_image(prepared):
    root, res = prepared
    m = res.manifest
    assert set(m["split"]) == {"train", "val", "test"} and len(m) == 40
    assert res.report["task"] == "detect" and res.report["class_names"] == ["coal", "gangue"]
    total = sum(sum(v.values()) for v in res.report["boxes"].values())
    assert total == int(m["num_boxes"].sum()) > 40
    raw = read_yolo(root / "raw").frame.set_index("path")
    assert all(raw.loc[p, "boxes"] == b for p, b in zip(m["path"], m["boxes"]))  # boxes kept as read


def _cfg(**over) -> dict:
    cfg = dict(model_name="resnet18_yolo", model_kwargs={"width": 0.5}, num_classes=2, class_names=["coal", "gangue"],
               in_chans=3, image_size=64, epochs=2, batch_size=8, lr=1e-3, weight_decay=0.0005, shuffle_buffer=0,
               threads_per_worker=1, seed=0, warmup_steps=5, wandb={"mode": "disabled"}, precision="fp32",
               run_name="det-test")
    cfg.update(over)
    return cfg


def test_detector_trains_with_checkpoints_and_resumes(ray_address, prepared, tmp_path):
    root, _ = prepared
    shards = root / "prepared" / "shards"
    storage = tmp_path / "runs"
    kwargs = dict(num_workers=1, cpus_per_worker=1.0, data_cpus=0.5, max_failures=0, keep_checkpoints=2,
                  online_policy="conveyor", use_gpu=False, select_by="last")
    first = fit(_cfg(epochs=1), shards, shards, storage, tmp_path / "m1.pt", **kwargs)
    assert [h["epoch"] for h in first.history] == [1]
    model, meta = load_model(tmp_path / "m1.pt")
    assert isinstance(model, ResNetYOLO) and meta["model_name"] == "resnet18_yolo"
    dets = detect(model, torch.rand(2, 3, 64, 64), score_threshold=0.0)
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 4
    # Same run name, more epochs: continues from epoch 1's checkpoint instead of starting over.
    second = fit(_cfg(epochs=3), shards, shards, storage, tmp_path / "m2.pt", **kwargs)
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert [h["start_epoch"] for h in second.history] == [0, 1, 1]
    assert json.dumps(second.history[0]) == json.dumps(first.history[0])
    for h in second.history:
        assert 0 <= h["val_map_50"] <= 1 and 0 <= h["val_map_50_95"] <= h["val_map_50"] + 1e-9
        assert h["train_loss"] > 0 and h["train_box_loss"] > 0
    assert second.history[2]["train_loss"] < second.history[0]["train_loss"]
