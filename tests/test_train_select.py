"""Ray Train recipe options end to end: best-checkpoint export (``select_by``) with the automatic
precision, on tiny synthetic data (one fit, 32 px, batch 16, one thread). The training-time budget,
the schedule and weight EMA are tested on the training loop itself in test_recipe.py.

Best-checkpoint selection is made deterministic by validating on labels flipped for the val rows
(the model trains on the true labels of every row): the better the model fits, the lower its
validation accuracy, so the last epoch is not the best one.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from components.data.prepare import prepare_dataset
from components.data.shards import read_shards, write_shards
from components.data.sources import get_source
from components.train import fit
from components.train.loop import MODEL_FILE, STATE_FILE
from components.train.precision import cpu_has_native_bf16, resolve_precision
from components.train.settings import RECIPE_OFF

LR = 1e-3


def _config(class_names: list[str], **overrides) -> dict:
    cfg = RECIPE_OFF | dict(
        schedule="cosine", max_pixels=50_000_000, model_name="resnet18", num_classes=len(class_names),
        class_names=class_names, in_chans=1, image_size=32, epochs=5, batch_size=16, lr=LR, weight_decay=0.05,
        label_smoothing=0.0, shuffle_buffer=0, class_weights=None, threads_per_worker=1, seed=0, data_cache="memory",
        precision="fp32", wandb={"mode": "disabled"}, run_name=f"test-{uuid.uuid4().hex[:10]}")
    return cfg | overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(root, class_names, the prepared shards, a copy whose val rows have their labels flipped)."""
    root = tmp_path_factory.mktemp("select")
    get_source("synthetic").ingest(root / "raw", num_images=320, image_size=32, num_classes=2, seed=1)
    res = prepare_dataset(root / "raw", root / "prepared", "synthetic", "multiclass", seed=1)
    shards = root / "prepared" / "shards"
    df = read_shards(shards)
    val = df["split"] == "val"
    assert val.sum() >= 16 and df.loc[val, "label"].nunique() == 2
    flipped = df.copy()
    flipped.loc[val, "label"] = 1 - flipped.loc[val, "label"]
    write_shards(flipped, root / "flipped")
    check = read_shards(root / "flipped", split="val").sort_values("path")
    orig = df[val].sort_values("path")
    assert np.array_equal(check["label"].to_numpy(), 1 - orig["label"].to_numpy())
    return root, res.report["class_names"], shards, root / "flipped"


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_select_by_exports_the_best_epoch_not_the_last(ray_address, data, monkeypatch):
    root, class_names, shards, flipped = data
    monkeypatch.chdir(root)
    cfg = _config(class_names, epochs=5, precision="auto")
    storage = root / "ckpt-select"
    res = fit(cfg, shards, flipped, storage, root / "best.pt", num_workers=1, cpus_per_worker=1, data_cpus=0.5,
              max_failures=0, keep_checkpoints=10, online_policy=None, select_by="val_accuracy", use_gpu=False)
    history = res.history
    accs = [h["val_accuracy"] for h in history]
    print("val_accuracy per epoch:", accs, "train_accuracy:", [h["train_accuracy"] for h in history])
    assert [h["epoch"] for h in history] == list(range(1, 6))
    expected = resolve_precision("auto", "cpu")  # bf16 autocast only where the CPU has native bf16
    assert expected == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert {h["precision"] for h in history} == {expected}
    assert accs[-1] < max(accs), accs  # learning the true labels hurts on the flipped ones
    best = 1 + int(np.argmax(accs))  # the first epoch with the highest accuracy
    assert res.selected_epoch == best and res.selected_epoch != len(history), (res.selected_epoch, accs)
    run_dir = Path(res.run_dir)
    assert run_dir == storage.resolve() / cfg["run_name"]
    kept = sorted(p.name for p in run_dir.glob("epoch_*"))
    assert kept == [f"epoch_{e:04d}" for e in range(1, 6)], kept  # keep_checkpoints=10 keeps them all
    exported = _state(res.model_path)
    assert _same(exported, _state(run_dir / f"epoch_{best:04d}" / MODEL_FILE))
    assert not _same(exported, _state(run_dir / f"epoch_{len(history):04d}" / MODEL_FILE))
    # the chosen checkpoint's own history ends at that epoch, with the metric it was chosen by
    chosen = torch.load(run_dir / f"epoch_{best:04d}" / STATE_FILE, map_location="cpu", weights_only=True)
    assert json.loads(chosen["history"])[-1]["val_accuracy"] == max(accs)
    assert torch.load(res.model_path, map_location="cpu", weights_only=True)["meta"]["class_names"] == class_names
