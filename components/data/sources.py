"""Dataset registry: where raw images come from and how labels are read.

Every source knows two things: how to *ingest* (materialise its raw files under a
directory that DVC versions) and how to list *records* of such a directory
(relative path, label, group, stratification key, extra attributes).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from components.data.images import encode_png

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class Records:
    """What a source says about a raw directory."""

    frame: pd.DataFrame  # columns: path (relative), label, group, stratify, attrs (JSON)
    class_names: list[str]


@dataclass(frozen=True)
class DatasetSource:
    name: str
    ingest: Callable[..., None]
    records: Callable[..., Records]
    tasks: tuple[str, ...]


_REGISTRY: dict[str, DatasetSource] = {}


def register(source: DatasetSource) -> DatasetSource:
    _REGISTRY[source.name] = source
    return source


def get_source(name: str) -> DatasetSource:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(_REGISTRY)}") from None


def list_sources() -> list[str]:
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- ELPV
ELPV_CLASS_NAMES = {
    "4class": ["functional", "possibly_defective", "likely_defective", "defective"],
    "binary": ["functional", "defective"],
}


def _elpv_package_dir() -> Path:
    try:
        import elpv_dataset
    except ImportError:  # pragma: no cover - dependency is pinned
        raise RuntimeError("the ELPV dataset needs the `elpv-dataset` package (pip install elpv-dataset)") from None
    return Path(elpv_dataset.__file__).parent / "data"


def ingest_elpv(dest: Path, **_: object) -> None:
    """Copy the images and labels shipped by the `elpv-dataset` package into ``dest``."""
    src = _elpv_package_dir()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "labels.csv", dest / "labels.csv")
    shutil.copytree(src / "images", dest / "images", dirs_exist_ok=True)


def elpv_records(raw_dir: Path, task: str = "4class") -> Records:
    """ELPV labels: defect probability p in {0, 1/3, 2/3, 1}.

    ``4class``: label = round(3p). ``binary``: defective when p >= 0.5. The split is
    stratified on the 4-class label for both tasks so the two tasks share one split.
    """
    if task not in ELPV_CLASS_NAMES:
        raise ValueError(f"ELPV task must be one of {sorted(ELPV_CLASS_NAMES)}, got {task!r}")
    labels_file = raw_dir / "labels.csv"
    if not labels_file.exists():
        raise FileNotFoundError(f"ELPV labels not found at {labels_file}: run the ingest stage first")
    df = pd.read_csv(labels_file, sep=r"\s+", header=None, names=["path", "probability", "cell_type"])
    bad = ~df["probability"].between(0.0, 1.0)
    if bad.any():
        raise ValueError(f"{labels_file}: defect probabilities outside [0, 1] on lines {list(df.index[bad] + 1)[:10]}")
    four = np.rint(df["probability"].to_numpy() * 3).astype(int)
    label = four if task == "4class" else (df["probability"].to_numpy() >= 0.5).astype(int)
    frame = pd.DataFrame({
        "path": df["path"],
        "label": label,
        "group": df["path"].map(lambda p: Path(p).stem),
        "stratify": four,
        "attrs": [json.dumps({"probability": float(p), "cell_type": t}) for p, t in zip(df["probability"], df["cell_type"])],
    })
    return Records(frame, ELPV_CLASS_NAMES[task])


register(DatasetSource("elpv", ingest_elpv, elpv_records, tasks=("4class", "binary")))


# ------------------------------------------------------------------------- folder
def ingest_folder(dest: Path, path: str | None = None, **_: object) -> None:
    """Copy a user's ``<class>/<image>`` tree into ``dest`` so DVC versions it."""
    if not path:
        raise ValueError("dataset 'folder' needs data.folder.path: a directory of <class>/<image> files")
    src = Path(path)
    if not src.is_dir():
        raise FileNotFoundError(f"data.folder.path {src} is not a directory")
    shutil.copytree(src, dest, dirs_exist_ok=True)


def folder_records(raw_dir: Path, task: str = "multiclass") -> Records:
    """Records of a ``<class>/<image>`` tree; class names sorted, labels 0..K-1."""
    classes = sorted(p.name for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{raw_dir}: expected at least two class folders, found {classes}")
    rows = []
    for label, cls in enumerate(classes):
        for f in sorted((raw_dir / cls).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                rel = f.relative_to(raw_dir).as_posix()
                rows.append((rel, label, f"{cls}/{f.stem}", label, "{}"))
    if not rows:
        raise ValueError(f"{raw_dir}: no images with suffixes {sorted(IMAGE_SUFFIXES)}")
    frame = pd.DataFrame(rows, columns=["path", "label", "group", "stratify", "attrs"])
    return Records(frame, classes)


register(DatasetSource("folder", ingest_folder, folder_records, tasks=("multiclass",)))


# ---------------------------------------------------------------------- synthetic
SYNTHETIC_CLASSES = ["ok", "crack", "spot", "scratch"]


def synthetic_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grayscale cell-like image: textured background with busbars, plus a defect per class.

    0 ok: clean; 1 crack: a dark jagged line; 2 spot: a dark blob; 3 scratch: a bright line.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 150 + 20 * rng.standard_normal((size, size)).astype(np.float32)
    img += 15 * np.sin(xx / size * np.pi * rng.uniform(1, 3))
    for k in range(1, 3):  # two busbars, like a solar cell
        img[:, int(k * size / 3) - 1:int(k * size / 3) + 1] -= 60
    if label == 1:
        x0, y0 = rng.uniform(0.2, 0.8, 2) * size
        ang = rng.uniform(0, np.pi)
        d = np.abs((xx - x0) * np.sin(ang) - (yy - y0) * np.cos(ang))
        img[d < max(1.0, size / 40)] -= 90
    elif label == 2:
        x0, y0 = rng.uniform(0.25, 0.75, 2) * size
        r = rng.uniform(0.08, 0.18) * size
        img[(xx - x0) ** 2 + (yy - y0) ** 2 < r * r] -= 80
    elif label == 3:
        y0 = rng.uniform(0.2, 0.8) * size
        img[np.abs(yy - y0 - 0.3 * (xx - size / 2)) < max(1.0, size / 50)] += 90
    return np.clip(img, 0, 255).astype(np.uint8)


def ingest_synthetic(dest: Path, num_images: int = 200, image_size: int = 64, num_classes: int = 2,
                     seed: int = 0, imbalance: float = 1.0, **_: object) -> None:
    """Write ``num_images`` synthetic PNGs as ``<class>/<index>.png``.

    ``imbalance`` < 1 makes class k hold imbalance**k of class 0's share, as in real defects.
    """
    if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"synthetic num_classes must be in 2..{len(SYNTHETIC_CLASSES)}")
    rng = np.random.default_rng(seed)
    share = np.array([imbalance ** k for k in range(num_classes)])
    labels = rng.choice(num_classes, size=num_images, p=share / share.sum())
    labels[:num_classes] = np.arange(num_classes)  # every class present
    for i, label in enumerate(labels):
        d = dest / SYNTHETIC_CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.png").write_bytes(encode_png(synthetic_image(int(label), image_size, rng)))


def synthetic_records(raw_dir: Path, task: str = "multiclass") -> Records:
    return folder_records(raw_dir, task)


register(DatasetSource("synthetic", ingest_synthetic, synthetic_records, tasks=("multiclass",)))
