"""Prepare: raw files -> validated, split, sharded Parquet + manifest + report."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from components.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, save_class_grid
from components.data.shards import write_shards
from components.data.sources import get_source
from components.progress import bar

SPLITS = ("train", "val", "test")


class CorruptDataError(RuntimeError):
    """Raised when raw images cannot be read and skipping them is not allowed."""


@dataclass(frozen=True)
class PrepareResult:
    manifest: pd.DataFrame
    report: dict


def _inspect(raw_dir: Path, rel: str, in_chans: int, max_pixels: int) -> tuple[bytes | None, str, int, int, str]:
    path = raw_dir / rel
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, "", 0, 0, f"unreadable file: {exc.strerror or exc}"
    sha = hashlib.sha256(data).hexdigest()
    try:
        arr = decode_image(data, in_chans=in_chans, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return None, sha, 0, 0, str(exc)
    return data, sha, arr.shape[1], arr.shape[0], ""


def _inspect_all(frame: pd.DataFrame, root: Path, in_chans: int, max_pixels: int, threads: int, desc: str) -> list[str]:
    """Read and decode the image of every ``frame["path"]`` (relative to ``root``): sets the ``image``,
    ``sha256``, ``width`` and ``height`` columns and returns each row's error ("" when it decoded)."""
    with ThreadPoolExecutor(threads) as pool:
        results = list(bar(pool.map(lambda rel: _inspect(root, rel, in_chans, max_pixels), frame["path"]),
                           total=len(frame), desc=desc, unit="img"))
    for i, col in enumerate(("image", "sha256", "width", "height")):
        frame[col] = [r[i] for r in results]
    return [r[4] for r in results]


def split_records(frame: pd.DataFrame, test_size: float, val_size: float, seed: int) -> np.ndarray:
    """Stratified train/val/test assignment (test first, then val carved from train)."""
    idx = np.arange(len(frame))
    strat = frame["stratify"].to_numpy()

    def _strat(y, size: float):
        # Stratify only when it is possible: every class has >= 2 members and both sides of the
        # split get at least one row per class; tiny sets fall back to a plain seeded split.
        classes, counts = np.unique(y, return_counts=True)
        n_small = int(np.ceil(size * len(y))) if size < 1 else int(size)
        ok = counts.min() >= 2 and min(n_small, len(y) - n_small) >= len(classes)
        return y if ok else None

    train_idx, test_idx = train_test_split(idx, test_size=test_size, random_state=seed,
                                           stratify=_strat(strat, test_size))
    split = np.empty(len(frame), dtype=object)
    split[test_idx] = "test"
    if val_size > 0:
        tr, va = train_test_split(train_idx, test_size=val_size, random_state=seed,
                                  stratify=_strat(strat[train_idx], val_size))
        split[tr], split[va] = "train", "val"
    else:
        split[train_idx] = "train"
    return split


def split_by_group(frame: pd.DataFrame, test_size: float, val_size: float, seed: int) -> np.ndarray:
    """train/val/test per row, drawn per ``group`` (stratified by the group's first ``stratify``
    value): rows of one group (the windows of one EEG recording, one detection image) share a side."""
    groups = frame.reset_index(drop=True).groupby("group", sort=True)["stratify"].first().reset_index()
    side = dict(zip(groups["group"], split_records(groups, test_size, val_size, seed)))
    return np.array([side[g] for g in frame["group"]], dtype=object)


def write_prepared(frame: pd.DataFrame, out_dir: Path, rows_per_shard: int) -> tuple[pd.DataFrame, list[str]]:
    """Prepared rows (sorted, image bytes included) -> ``out_dir/shards`` and ``out_dir/manifest.parquet``
    (the rows without their bytes, each with its shard); returns (manifest, shard files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = write_shards(frame, out_dir / "shards", rows_per_shard)
    manifest = frame.drop(columns=["image"])
    manifest["shard"] = [shards[i // rows_per_shard] for i in range(len(frame))]
    manifest.to_parquet(out_dir / "manifest.parquet", index=False)
    return manifest, shards


def prepare_dataset(raw_dir: str | Path, out_dir: str | Path, dataset: str, task: str, *, in_chans: int = 1,
                    test_size: float = 0.25, val_size: float = 0.15, seed: int = 42, skip_corrupt: bool = False,
                    rows_per_shard: int = 512, max_image_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 4,
                    extra: list[str | Path] = ()) -> PrepareResult:
    """Validate every raw image, split, and write ``out_dir/shards``, ``manifest.parquet``, ``report.json``
    and ``samples.png`` (training images per class).

    Corrupt images are listed in the report with the reason. Unless ``skip_corrupt`` the
    function then raises :class:`CorruptDataError` naming them; nothing is silently dropped.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    source = get_source(dataset)
    if task not in source.tasks:
        raise ValueError(f"dataset {dataset!r} supports tasks {source.tasks}, not {task!r}")
    records = source.records(raw_dir, task)
    frame = records.frame.reset_index(drop=True)

    errors = _inspect_all(frame, raw_dir, in_chans, max_image_pixels, threads, "prepare")
    corrupt = [{"path": p, "reason": e} for p, e in zip(frame["path"], errors) if e]

    report = {
        "dataset": dataset, "task": task, "raw_dir": str(raw_dir), "class_names": records.class_names,
        "num_records": len(frame), "corrupt": corrupt, "skip_corrupt": skip_corrupt,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if corrupt:
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        if not skip_corrupt:
            listing = "; ".join(f"{c['path']}: {c['reason']}" for c in corrupt[:10])
            raise CorruptDataError(
                f"{len(corrupt)} of {len(frame)} images in {raw_dir} are unreadable ({listing}"
                f"{' ...' if len(corrupt) > 10 else ''}). Fix or remove them, or set data.skip_corrupt: true "
                f"to leave them out (they stay listed in {out_dir / 'report.json'}).")
        frame = frame[[not e for e in errors]].reset_index(drop=True)

    frame["split"] = split_records(frame, test_size, val_size, seed)
    frame["source"] = "real"
    if extra:  # labelled feedback: training rows only, after the split (components.data.extra)
        frame, report["extra"] = _add_extra(frame, extra, records.class_names, in_chans, max_image_pixels,
                                            skip_corrupt, threads)
    frame["label_name"] = [records.class_names[i] for i in frame["label"]]
    frame["label"] = frame["label"].astype("int64")
    cols = ["image", "path", "label", "label_name", "split", "group", "sha256", "width", "height", "source", "attrs"]
    frame = frame[cols].sort_values(["split", "path"], kind="stable").reset_index(drop=True)
    manifest, shards = write_prepared(frame, out_dir, rows_per_shard)
    save_class_grid(frame[frame["split"] == "train"], records.class_names, out_dir / "samples.png",
                    title=f"{dataset} ({task}): training images per class (count)", in_chans=in_chans, seed=seed,
                    max_pixels=max_image_pixels)
    counts = {s: {records.class_names[k]: int(v) for k, v in sorted(manifest.loc[manifest.split == s, "label"].value_counts().items())}
              for s in SPLITS}
    report.update(num_prepared=len(manifest), counts=counts, shards=shards,
                  data_digest=hashlib.sha256("".join(manifest["sha256"] + manifest["split"]).encode()).hexdigest())
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return PrepareResult(manifest, report)


def _add_extra(frame: pd.DataFrame, folders, class_names: list[str], in_chans: int, max_pixels: int,
               skip_corrupt: bool, threads: int) -> tuple[pd.DataFrame, list[dict]]:
    """``frame`` with the images of the ``data.extra`` folders as training rows, and what each folder added."""
    from components.data.extra import SOURCE, folder_version, list_extra

    known, parts, report = set(frame["sha256"]), [frame], []
    for folder in folders:
        ef = list_extra(folder, class_names)
        errors = _inspect_all(ef, Path(), in_chans, max_pixels, threads, f"prepare {folder}")
        bad = [{"path": p, "reason": e} for p, e in zip(ef["path"], errors) if e]
        if bad and not skip_corrupt:
            raise CorruptDataError(f"data.extra {folder}: {len(bad)} unreadable images ({bad[0]['path']}: "
                                   f"{bad[0]['reason']}{' ...' if len(bad) > 1 else ''})")
        ef = ef[[not e for e in errors]]
        seen = ef["sha256"].isin(known) | ef["sha256"].duplicated()
        ef = ef[~seen].reset_index(drop=True)
        known |= set(ef["sha256"])
        ef["split"], ef["source"] = "train", SOURCE
        ef["group"] = [f"{SOURCE}:{s[:16]}" for s in ef["sha256"]]
        ef["stratify"] = ef["label"]
        parts.append(ef)
        report.append({"path": str(folder), "rows": int(len(ef)), "version": folder_version(ef),
                       "left_out_already_in_data": int(seen.sum()), "unreadable": bad,
                       "by_class": {class_names[k]: int(v) for k, v in sorted(ef["label"].value_counts().items())},
                       "label_sources": {k: int(v) for k, v in sorted(
                           pd.Series([json.loads(a)["label_source"] for a in ef["attrs"]], dtype=object)
                           .value_counts().items())}})
    return pd.concat(parts, ignore_index=True), report


def load_report(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    return json.loads(path.read_text())
