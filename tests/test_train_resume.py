"""Ray Train fault tolerance: a killed worker resumes from the last checkpoint, not from epoch 0."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from components.data.prepare import prepare_dataset
from components.data.sources import get_source
from components.train import fit

EPOCHS = 5


def _config(num_classes: int, class_names: list[str]) -> dict:
    return dict(model_name="resnet18", num_classes=num_classes, class_names=class_names, in_chans=1, image_size=32,
                epochs=EPOCHS, batch_size=16, lr=1e-3, weight_decay=0.05, label_smoothing=0.0, shuffle_buffer=0,
                class_weights=None, threads_per_worker=1, seed=0, wandb={"mode": "offline", "dir": "wandb"})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    get_source("synthetic").ingest(root / "raw", num_images=160, image_size=32, num_classes=2, seed=1)
    res = prepare_dataset(root / "raw", root / "prepared", "synthetic", "multiclass", seed=1)
    return root, res.report


def _train_worker_pids(address: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def test_killed_worker_resumes_from_last_checkpoint(ray_address, tiny_data, monkeypatch):
    root, report = tiny_data
    monkeypatch.chdir(root)
    storage = root / "checkpoints"
    cfg = _config(len(report["class_names"]), report["class_names"])
    result: dict = {}

    def run():
        try:
            result["res"] = fit(cfg, root / "prepared" / "shards", root / "prepared" / "shards", storage,
                                root / "model.pt", num_workers=1, cpus_per_worker=1, data_cpus=0.5, max_failures=2,
                                online_policy="light", data_digest=report["data_digest"])
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Wait (bounded) until epoch 2 has started writing its checkpoint: by then epoch 1's checkpoint
    # is registered with Ray Train (report() is a barrier), so a restart must resume from it.
    deadline = time.monotonic() + 300
    first = None
    while time.monotonic() < deadline and thread.is_alive():
        found = sorted(storage.glob("*/epoch_0002"))
        if found:
            first = found[0]
            break
        time.sleep(0.2)
    assert first is not None, f"no checkpoint appeared: {result.get('error')}"
    assert not (first.parent / f"epoch_{EPOCHS:04d}").exists(), "training finished before the kill: make epochs longer"
    pids = _train_worker_pids(ray_address)
    assert pids, "no live Ray Train worker to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in result, f"training failed instead of recovering: {result.get('error')!r}"
    history = result["res"].history
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))  # every epoch once
    restarts = sorted({h["start_epoch"] for h in history})
    assert restarts[0] == 0 and len(restarts) == 2 and restarts[1] >= 1, restarts  # resumed, not from scratch
    assert Path(root / "model.pt").exists()
