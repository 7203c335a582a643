"""Ray Train with two workers (DDP over gloo, 2 x 1 CPU) through resops' training loop: the model learns
the easy synthetic classes to the same floor as one worker must, and the workers' weights agree after
every epoch (the loop records their spread; DDP all-reduces the gradients, so it must be 0)."""
from __future__ import annotations

import uuid

import torch

from components.data.prepare import prepare_dataset
from components.data.sources import get_source
from components.evaluate.metrics import classification_metrics
from components.evaluate.report import predict_dataset
from components.models import load_model
from components.train import fit, image_dataset
from components.train.settings import RECIPE_OFF

BALANCED_ACCURACY_FLOOR = 0.8  # chance: 0.5 (two classes)


def test_two_workers_train_in_sync_to_the_learning_floor(ray_address, tmp_path, monkeypatch):
    import ray

    assert ray.cluster_resources().get("CPU", 0) >= 2, "two workers of one CPU each"
    monkeypatch.chdir(tmp_path)
    get_source("synthetic").ingest(tmp_path / "raw", num_images=480, image_size=32, num_classes=2, seed=3,
                                   imbalance=0.7)
    res = prepare_dataset(tmp_path / "raw", tmp_path / "prepared", "synthetic", "multiclass", seed=3)
    names, shards = res.report["class_names"], tmp_path / "prepared" / "shards"
    cfg = RECIPE_OFF | dict(
        schedule="cosine", max_pixels=50_000_000, model_name="resnet18", num_classes=2, class_names=names,
        in_chans=1, image_size=32, epochs=8, batch_size=16, lr=2e-3, weight_decay=0.05, label_smoothing=0.0,
        shuffle_buffer=0, class_weights=None, threads_per_worker=1, seed=0, data_cache="memory", precision="fp32",
        wandb={"mode": "disabled"}, run_name=f"test-ddp-{uuid.uuid4().hex[:10]}")
    out = fit(cfg, shards, shards, tmp_path / "ckpt", tmp_path / "model.pt", num_workers=2, cpus_per_worker=1,
              data_cpus=0.0, max_failures=0, keep_checkpoints=1, online_policy=None, use_gpu=False,
              select_by="last")
    spreads = [h["weights_spread_across_workers"] for h in out.history]
    print("weights spread per epoch:", spreads, "val balanced accuracy:",
          [round(h["val_balanced_accuracy"], 3) for h in out.history])
    assert len(spreads) == 8 and all(s == 0.0 for s in spreads), spreads

    model, meta = load_model(tmp_path / "model.pt")
    ds = image_dataset(shards, "test", policy=None, image_size=32, in_chans=1, seed=None, cpus_per_task=0.25,
                       batch_size=64)
    y, proba = predict_dataset(model, ds.iter_torch_batches(batch_size=64, dtypes={"image": torch.float32,
                                                                                   "label": torch.int64}))
    test = classification_metrics(y, proba, names)
    print("test:", {k: round(test[k], 3) for k in ("accuracy", "balanced_accuracy", "macro_f1")})
    assert test["balanced_accuracy"] >= BALANCED_ACCURACY_FLOOR, test
