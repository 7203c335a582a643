"""Prepare for EEG: recordings -> split by recording -> windows -> (train) reassembly -> CWT scalograms
as the same sharded image data the image pipeline uses.

The split is made over recordings, before segmentation, so windows of one recording never sit on
both sides (overlapping windows would otherwise leak the test set into training). Reassembly
(Dubey et al.) adds new training windows made of same-class sub-segments, marked
``source=reassembled``; validation and test hold real windows only. Scalograms are computed on
Ray Data (``map_batches`` of :func:`components.data.cwt.scalogram_batch`) when Ray is running,
in-process otherwise; rows are then exactly what :func:`components.data.prepare.prepare_dataset`
writes (image PNG, path, label, label_name, split, group, sha256, width, height, source, attrs),
so augment/rebalance/train/prune/evaluate/serve need nothing EEG-specific.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.cwt import cwt_kwargs, save_example_scalograms, scalogram_batch
from components.data.digest import manifest_digest
from components.data.eeg_base import EEGDataset
from components.data.eeg_segments import reassemble_by_class, segment
from components.data.prepare import SPLITS, PrepareResult, split_by_group, write_prepared

COLUMNS = ["image", "path", "label", "label_name", "split", "group", "sha256", "width", "height", "source", "attrs"]


def window_rows(ds: EEGDataset, split: np.ndarray, window: int, overlap: int) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per window of every recording (its split inherited); returns (rows, signals)."""
    rows, signals = [], []
    for i in range(len(ds)):
        segs = segment(ds.signals[i], window, overlap)
        rec = ds.records.iloc[i]
        for k in range(len(segs)):
            rows.append({"path": f"{rec['path']}@{k}", "label": int(ds.labels[i]), "split": split[i],
                         "group": rec["group"], "source": "real",
                         "attrs": json.dumps({"recording": rec["path"], "window": k, "start": k * (window - overlap),
                                              "fs": ds.fs})})
        signals.append(segs)
    return pd.DataFrame(rows), np.concatenate(signals)


def scalograms(frame: pd.DataFrame, signals: np.ndarray, fs: float, cwt: dict, *, use_ray: bool,
               cpus_per_task: float = 0.5, batch_size: int = 32) -> pd.DataFrame:
    """``frame`` with an ``image`` column of PNG scalograms (rows in the same order)."""
    kwargs = dict(fs=fs, **cwt_kwargs(cwt))
    batch = {"row": np.arange(len(frame)), "signal": signals.astype(np.float32)}
    if use_ray:
        import ray.data

        ds = ray.data.from_items([{"row": int(i), "signal": s} for i, s in zip(batch["row"], batch["signal"])])
        out = ds.map_batches(scalogram_batch, batch_format="numpy", batch_size=batch_size, num_cpus=cpus_per_task,
                             fn_kwargs=kwargs).to_pandas()
        images = out.sort_values("row")["image"].tolist()
    else:
        images = list(scalogram_batch(batch, **kwargs)["image"])
    frame = frame.copy()
    frame["image"] = images
    return frame


def prepare_eeg(ds: EEGDataset, out_dir: str | Path, *, dataset: str, task: str, window: int, overlap: int = 0,
                reassemble_per_class: int = 0, parts: int = 4, cwt: dict | None = None, test_size: float = 0.25,
                val_size: float = 0.15, seed: int = 42, rows_per_shard: int = 512, use_ray: bool = False,
                cpus_per_task: float = 0.5, examples_per_class: int = 3) -> PrepareResult:
    """Write ``out_dir/shards``, ``manifest.parquet``, ``report.json`` and ``samples.png`` for ``ds``."""
    cwt = dict(cwt or {})
    out_dir = Path(out_dir)
    split = split_by_group(ds.records, test_size, val_size, seed)  # by recording, before windowing
    frame, signals = window_rows(ds, split, window, overlap)
    added = {}
    if reassemble_per_class:
        train = (frame["split"] == "train").to_numpy()
        new, new_labels = reassemble_by_class(signals[train], frame.loc[train, "label"].to_numpy(),
                                              int(reassemble_per_class), parts, seed=seed)
        extra = pd.DataFrame({"path": [f"reassembled/{ds.class_names[y]}/{i}" for i, y in enumerate(new_labels)],
                              "label": new_labels.astype(int), "split": "train", "group": "reassembled",
                              "source": "reassembled",
                              "attrs": [json.dumps({"parts": parts, "seed": seed, "fs": ds.fs})] * len(new_labels)})
        frame = pd.concat([frame, extra], ignore_index=True)
        signals = np.concatenate([signals, new])
        added = {ds.class_names[k]: int((new_labels == k).sum()) for k in range(len(ds.class_names))}
    frame = scalograms(frame, signals, ds.fs, cwt, use_ray=use_ray, cpus_per_task=cpus_per_task)
    height, width = tuple(cwt.get("out_size", (64, 64)))
    frame["sha256"] = [hashlib.sha256(b).hexdigest() for b in frame["image"]]
    frame["width"], frame["height"] = int(width), int(height)
    frame["label"] = frame["label"].astype("int64")
    frame["label_name"] = [ds.class_names[i] for i in frame["label"]]
    frame = frame[COLUMNS].sort_values(["split", "path"], kind="stable").reset_index(drop=True)
    manifest, shards = write_prepared(frame, out_dir, rows_per_shard)
    real = ds.signals
    examples = save_example_scalograms({name: real[ds.labels == k][:examples_per_class]
                                        for k, name in enumerate(ds.class_names) if (ds.labels == k).any()},
                                       ds.fs, out_dir / "samples.png", title=f"{dataset} ({task})",
                                       **{k: v for k, v in cwt_kwargs(cwt).items() if k != "out_size"})
    counts = {s: {ds.class_names[k]: int(v) for k, v in sorted(manifest.loc[manifest.split == s, "label"].value_counts().items())}
              for s in SPLITS}
    recordings = {s: int(len(set(manifest.loc[(manifest.split == s) & (manifest.source == "real"), "group"])))
                  for s in SPLITS}
    report = {"dataset": dataset, "task": task, "modality": "eeg", "class_names": list(ds.class_names),
              "fs": ds.fs, "num_recordings": len(ds), "recordings": recordings, "window": int(window),
              "overlap": int(overlap), "reassembled": added, "parts": int(parts), "cwt": cwt,
              "num_prepared": len(manifest), "counts": counts, "shards": shards, "corrupt": ds.skipped,
              "examples": str(examples),
              "data_digest": manifest_digest(manifest)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return PrepareResult(manifest, report)
