"""``data.extra``: labelled folders (``resops feedback export``, corrected by a person) added to training.

Each folder is a ``<class>/<image>`` tree whose classes are the dataset's. Its rows join the
**training split only** (``source=feedback``), after the fixed split of the dataset itself, so the
validation and test splits, and every figure measured on them, stay what they were. An image whose
bytes (sha256) are already in the dataset is left out and counted: an input served from the test
split must never come back as training data.

Provenance per row (``attrs``): the folder, the label's source (``model:cloud`` / ``model:edge`` from
the export's ``manifest.csv``, ``person`` when the file was moved to another class folder, listed in
corrections, or added by hand), the reason it was kept and the model versions that answered it. The
folder's own version is the digest of its (sha256, label) pairs, recorded in the prepare report.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pandas as pd

from components.data.sources import IMAGE_SUFFIXES

SOURCE = "feedback"


def _manifest(folder: Path) -> dict[str, dict]:
    path = folder / "manifest.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def list_extra(folder: str | Path, class_names: list[str]) -> pd.DataFrame:
    """The images of one extra folder: ``path`` (``folder/<class>/<file>``), ``label``, ``attrs``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.extra: {folder} is not a directory (`dvc pull` it, or drop it from data.extra)")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name not in index)
    if unknown:
        raise ValueError(f"data.extra: {folder} has class folders {unknown} that are not the dataset's classes "
                         f"{class_names}")
    manifest = _manifest(folder)
    rows = []
    for name in class_names:
        for f in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = f.relative_to(folder).as_posix()
            entry = manifest.get(rel) or next((m for m in manifest.values() if Path(m["file"]).name == f.name), None)
            if entry is None:
                label_source = "person"  # added by hand
            elif entry["label"] != name:
                label_source = "person"  # moved to another class folder: the correction
            else:
                label_source = entry["label_source"]
            attrs = {"extra_dir": folder.as_posix(), "label_source": label_source,
                     **({"reason": entry["reason"], "received_at": entry["received_at"],
                         "model_versions": json.loads(entry["model_versions"] or "{}"),
                         "model_label": entry["cloud_label"] or entry["edge_label"]} if entry else {})}
            rows.append({"path": (folder / rel).as_posix(), "label": index[name], "attrs": json.dumps(attrs, sort_keys=True)})
    return pd.DataFrame(rows, columns=["path", "label", "attrs"])


def folder_version(frame: pd.DataFrame) -> str:
    """The version of an extra folder's data: the digest of its sorted (sha256, label) pairs."""
    pairs = sorted(f"{s}:{lab}" for s, lab in zip(frame["sha256"], frame["label"]))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()
