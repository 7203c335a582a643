"""``resops feedback export``: the feedback store as a ``<class>/<image>`` tree a person can correct.

Each record's image goes to ``<to>/<class>/<sha256[:16]><ext>``, the class being the cloud tier's
answer when the cloud answered it, else the edge's (``label_source``: ``model:cloud`` /
``model:edge``). ``manifest.csv`` lists every exported image with its provenance (sha256, reason,
source, model versions, received at, both tiers' labels). Correcting a label is moving the file
to another class folder, or a CSV of ``sha256,label`` rows given to ``--corrections`` (the label
source is then ``person``). ``dvc add <to>`` versions the result; ``data.extra: [<to>]`` in params.yaml
adds it to the training split (components.data.extra).
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from components.feedback.store import FeedbackStore

MANIFEST = "manifest.csv"
COLUMNS = ["file", "label", "label_source", "sha256", "reason", "source", "received_at", "edge_label", "cloud_label",
           "model_versions"]
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}  # what the folder dataset reads


def image_suffix(data: bytes) -> str:
    """The file suffix of an encoded image, from the format Pillow identifies (without decoding the pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        fmt = Image.open(io.BytesIO(data)).format
    except UnidentifiedImageError:
        fmt = None
    if fmt not in _SUFFIX:
        raise ValueError(f"not a PNG, JPEG, BMP or TIFF image ({fmt or 'unidentified'})")
    return _SUFFIX[fmt]


def read_corrections(path: str | Path | None) -> dict[str, str]:
    """``sha256,label`` rows (a header line naming them is allowed): sha256 (or a unique prefix of 12+) -> label."""
    if not path:
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().lower() == "sha256":
                continue
            if len(row) < 2 or len(row[0].strip()) < 12:
                raise ValueError(f"{path}: a correction row is `sha256,label`, got {row}")
            out[row[0].strip().lower()] = row[1].strip()
    return out


def export(location: str, to: str | Path, *, corrections: str | Path | None = None,
           class_names: list[str] | None = None) -> dict:
    """Write the store's records under ``to`` (see the module docstring); return counts.

    ``class_names``: the classes a label must be one of (the served model's); a record or correction
    naming another class is refused. Images already exported (same sha256) are not written twice.
    """
    store = FeedbackStore(location, max_bytes=1 << 62)
    to = Path(to)
    fixes = read_corrections(corrections)
    known = set(class_names) if class_names else None
    rows, seen, skipped = [], set(), 0
    for name in store.names():
        try:
            record, image = store.read(name)
        except FileNotFoundError:  # evicted while exporting
            continue
        sha = record["sha256"]
        if sha in seen:
            continue
        seen.add(sha)
        try:
            suffix = image_suffix(image)
        except ValueError:
            skipped += 1  # an upload the model could not read either is not training data
            continue
        cloud, edge = record.get("cloud") or {}, record.get("edge") or {}
        label, source = (cloud["label"], "model:cloud") if cloud.get("label") else (record["answer"]["label"], "model:edge")
        fix = next((v for k, v in fixes.items() if sha.startswith(k)), None)
        if fix is not None:
            label, source = fix, "person"
        if known is not None and label not in known:
            raise ValueError(f"record {sha[:12]}: label {label!r} is not one of the model's classes {sorted(known)}")
        rel = f"{label}/{sha[:16]}{suffix}"
        (to / label).mkdir(parents=True, exist_ok=True)
        (to / rel).write_bytes(image)
        rows.append({"file": rel, "label": label, "label_source": source, "sha256": sha, "reason": record["reason"],
                     "source": record["source"], "received_at": record["received_at"], "edge_label": edge.get("label"),
                     "cloud_label": cloud.get("label"), "model_versions": json.dumps(record.get("model_versions", {}),
                                                                                     sort_keys=True)})
    to.mkdir(parents=True, exist_ok=True)
    with open(to / MANIFEST, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return {"exported": len(rows), "skipped_unreadable": skipped, "corrected": sum(r["label_source"] == "person" for r in rows),
            "by_class": dict(sorted(Counter(r["label"] for r in rows).items())), "to": str(to)}
