"""The artifact layout of the default pipeline (documented in the README): every stage's outputs, and the
helpers that write them. It lives here and nowhere else."""
from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
AUGMENTED = Path("data/augmented")
REBALANCED = Path("data/rebalanced")
GAN_DIR = Path("models/gan")
GAN_REPORTS = Path("reports/gan")
TRAIN_MODEL = Path("models/train/model.pt")
PRUNE_DIR = Path("models/prune")
REGISTRY = Path("models/registry.json")
PROMOTED = Path("models/promoted")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports/evaluation")
REPORT_DIR = Path("reports/report")
SERVE_DIR = Path("models/serve")
EXTRA = Path("data/extra")  # labelled folders (data.extra), added to the training split
EEG_DATASETS = ("bonn_eeg", "eeg_synthetic", "eeg_edf")


def read_json(path: Path) -> dict | None:
    """A stage output's JSON, or None when the pipeline did not write it."""
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def say(msg: str) -> None:
    print(f"[resops] {msg}", flush=True)


def record_training(res, t0: float, **extra) -> dict:
    """metrics/train.json (the last epoch, epochs run, the epoch resumed from, wall time, run name and
    ``extra``) and plots/train_history.csv (one row per epoch) of a ``fit`` result; returns the summary."""
    summary = {**{k: v for k, v in res.history[-1].items() if k != "start_epoch"}, "epochs_run": len(res.history),
               "resumed_from_epoch": max(h["start_epoch"] for h in res.history), "wall_seconds": time.time() - t0,
               "run_name": PurePosixPath(str(res.run_dir)).name, **extra}
    write_json(METRICS / "train.json", summary)
    PLOTS.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(res.history).to_csv(PLOTS / "train_history.csv", index=False)
    return summary
