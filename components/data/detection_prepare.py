"""Prepare for detection: a :class:`~components.data.detection.DetectionSet` -> train/val/test split
-> sharded Parquet rows (the image bytes plus their boxes), a manifest and a report, as
:func:`components.data.prepare.prepare_dataset` does for classification.

Rows: ``image`` (the original encoded bytes, re-encoded as PNG only when they are not PNG/JPEG),
``path``, ``boxes`` (JSON ``[[class, cx, cy, w, h], ...]`` normalised), ``num_boxes``, ``label``
(the image's most frequent class, -1 without objects: the split's stratification key), ``split``,
``group``, ``sha256``, ``width``, ``height``, ``source``, ``attrs``. Unreadable images are listed
in the report (``corrupt``) and left out when ``skip_corrupt``, an error otherwise.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.detection import DetectionSet, boxes_from_json
from components.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from components.data.prepare import SPLITS, PrepareResult, split_by_group, write_prepared

COLUMNS = ["image", "path", "boxes", "num_boxes", "label", "split", "group", "sha256", "width", "height", "source",
           "attrs"]


def _main_class(text: str) -> int:
    b = boxes_from_json(text)
    if not len(b):
        return -1
    values, counts = np.unique(b[:, 0].astype(int), return_counts=True)
    return int(values[np.argmax(counts)])


def prepare_detection(ds: DetectionSet, out_dir: str | Path, *, dataset: str, in_chans: int = 3,
                      test_size: float = 0.2, val_size: float = 0.15, seed: int = 42, rows_per_shard: int = 256,
                      skip_corrupt: bool = False, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> PrepareResult:
    """Write ``out_dir/shards``, ``manifest.parquet`` and ``report.json`` for ``ds``."""
    if ds.root is None:
        raise ValueError("the DetectionSet has no root folder to read its images from")
    out_dir = Path(out_dir)
    rows, corrupt = [], []
    for rec in ds.frame.itertuples(index=False):
        data = (Path(ds.root) / rec.path).read_bytes()
        try:
            img = decode_image(data, in_chans, max_image_pixels)
        except ImageDecodeError as exc:
            corrupt.append({"path": rec.path, "reason": str(exc)})
            continue
        if img.shape[0] != rec.height or img.shape[1] != rec.width:
            corrupt.append({"path": rec.path, "reason": f"image is {img.shape[1]}x{img.shape[0]} but its labels say "
                                                         f"{rec.width}x{rec.height}"})
            continue
        rows.append({"image": data, "path": rec.path, "boxes": rec.boxes, "num_boxes": len(boxes_from_json(rec.boxes)),
                     "label": _main_class(rec.boxes), "group": rec.group, "sha256": hashlib.sha256(data).hexdigest(),
                     "width": int(rec.width), "height": int(rec.height), "source": "real", "attrs": rec.attrs})
    if corrupt and not skip_corrupt:
        listing = "; ".join(f"{c['path']}: {c['reason']}" for c in corrupt[:10])
        raise ImageDecodeError(f"{len(corrupt)} image(s) cannot be used: {listing}. Fix or remove them, or set "
                               f"data.skip_corrupt: true to leave them out (they are listed in the report).")
    if not rows:
        raise ValueError(f"no usable image in dataset {dataset!r}")
    frame = pd.DataFrame(rows)
    frame["split"] = split_by_group(frame.assign(stratify=frame["label"]), test_size, val_size, seed)
    frame = frame[COLUMNS].sort_values(["split", "path"], kind="stable").reset_index(drop=True)
    manifest, shards = write_prepared(frame, out_dir, rows_per_shard)
    names = list(ds.class_names)
    box_counts = {}
    for s in SPLITS:
        sub = manifest[manifest.split == s]
        cls = np.concatenate([boxes_from_json(b)[:, 0] for b in sub["boxes"]]) if len(sub) else np.zeros(0)
        box_counts[s] = {names[k]: int((cls == k).sum()) for k in range(len(names))}
    report = {"dataset": dataset, "task": "detect", "modality": "detection", "class_names": names,
              "in_chans": in_chans, "num_prepared": len(manifest),
              "images": {s: int((manifest.split == s).sum()) for s in SPLITS}, "boxes": box_counts,
              "shards": shards, "corrupt": corrupt,
              "data_digest": hashlib.sha256("".join(manifest["sha256"] + manifest["split"] + manifest["boxes"])
                                            .encode()).hexdigest()}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return PrepareResult(manifest, report)
