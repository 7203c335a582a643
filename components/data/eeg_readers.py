"""EEG sources: the Bonn University layout (set folders of text files), a NumPy ``.npz`` and EDF /
EDF+ / BDF recordings (pyEDFlib); see :mod:`components.data.eeg` for the layouts."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.eeg_base import (BONN_FS, BONN_LENGTH, BONN_SETS, BONN_TASKS, EEGDataset, EEGFormatError,
                                      parse_signal_text)
from components.data.eeg_segments import segment
from components.data.sources import Records


# ---------------------------------------------------------------------------------------- Bonn
def _check_task(task: str) -> tuple[list[str], dict[str, int]]:
    if task not in BONN_TASKS:
        raise ValueError(f"Bonn EEG task must be one of {sorted(BONN_TASKS)}, got {task!r}")
    return BONN_TASKS[task]


def find_bonn_sets(root: str | Path) -> dict[str, Path]:
    """Map set letter (upper case) -> folder for the set folders directly under ``root``.

    Folder names match a set letter case-insensitively (``Z/`` or ``z/``); two folders for the
    same set (``Z/`` and ``z/`` on a case-sensitive file system) are refused as ambiguous.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Bonn EEG root {root} is not a directory")
    found: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        key = p.name.upper()
        if p.is_dir() and key in BONN_SETS:
            if key in found:
                raise ValueError(f"{root}: both {found[key].name}/ and {p.name}/ look like Bonn set {key}")
            found[key] = p
    return found


def _bonn_files(set_dir: Path) -> list[Path]:
    """The ``.txt`` / ``.TXT`` files of a set folder (recursively; hidden and ``._*`` files ignored)."""
    files = [f for f in set_dir.rglob("*")
             if f.is_file() and f.suffix.lower() == ".txt"
             and not any(part.startswith((".", "__MACOSX")) for part in f.relative_to(set_dir).parts)]
    return sorted(files, key=lambda f: f.relative_to(set_dir).as_posix().upper())


def bonn_records(raw_dir: str | Path, task: str = "3class", *, sets: Sequence[str] | None = None,
                 fs: float = BONN_FS) -> Records:
    """List the Bonn files a task uses, without reading them (registry ``Records`` shape).

    ``group`` is ``<set>/<file stem>`` (one recording segment; windows cut from it must stay in one
    split), ``stratify`` is the set's index in ``Z, O, N, F, S`` so every split holds each set in
    proportion, ``attrs`` is JSON ``{"set", "fs"}``. Every set the task uses must be present;
    ``sets`` restricts reading to a subset of them.
    """
    raw_dir = Path(raw_dir)
    class_names, mapping = _check_task(task)
    wanted = list(mapping) if sets is None else [s.upper() for s in sets]
    unknown = [s for s in wanted if s not in mapping]
    if unknown:
        raise ValueError(f"task {task!r} uses Bonn sets {list(mapping)}; {unknown} are not among them")
    found = find_bonn_sets(raw_dir)
    missing = [s for s in wanted if s not in found]
    if missing:
        raise FileNotFoundError(f"{raw_dir}: Bonn task {task!r} needs set folders {wanted}; missing {missing} "
                                f"(found {sorted(found) or 'none'})")
    rows = []
    for s in wanted:
        files = _bonn_files(found[s])
        if not files:
            raise FileNotFoundError(f"{found[s]}: no .txt files in Bonn set {s}")
        for f in files:
            rows.append((f.relative_to(raw_dir).as_posix(), mapping[s], f"{s}/{f.stem.upper()}",
                         BONN_SETS.index(s), json.dumps({"set": s, "fs": fs})))
    frame = pd.DataFrame(rows, columns=["path", "label", "group", "stratify", "attrs"])
    frame["label"] = frame["label"].astype("int64")
    return Records(frame, list(class_names))


def read_bonn_file(path: str | Path, length: int | None = BONN_LENGTH, *, name: str | None = None) -> np.ndarray:
    """Read one Bonn text file (one number per line) into a float32 array of ``length`` samples.

    Trailing blank lines, surrounding spaces, CRLF line ends and a UTF-8 BOM are accepted;
    anything else (empty or non-numeric line, NaN/inf, wrong number of samples) raises
    :class:`EEGFormatError` naming the file (``name`` if given) and the line. ``length=None``
    accepts any non-zero length.
    """
    path = Path(path)
    name = name or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EEGFormatError(f"{name}: unreadable file: {exc.strerror or exc}", name, None) from None
    return parse_signal_text(raw, name, length)


def read_bonn(root: str | Path, task: str = "3class", *, sets: Sequence[str] | None = None,
              skip_malformed: bool = False, length: int = BONN_LENGTH, fs: float = BONN_FS) -> EEGDataset:
    """Read the Bonn set folders under ``root`` for ``task`` (see :data:`BONN_TASKS`).

    Every file is checked. Malformed files raise one :class:`EEGFormatError` listing each file with
    its line and reason, unless ``skip_malformed``: then they are left out and listed in
    ``EEGDataset.skipped``. A class left without any signal is an error either way.
    """
    records = bonn_records(root, task, sets=sets, fs=fs)
    root = Path(root)
    signals, keep, errors = [], [], []
    for i, rel in enumerate(records.frame["path"]):
        try:
            signals.append(read_bonn_file(root / rel, length, name=rel))
            keep.append(i)
        except EEGFormatError as exc:
            errors.append({"path": rel, "line": exc.line, "reason": str(exc)})
    if errors and not skip_malformed:
        listing = "; ".join(e["reason"] for e in errors[:10])
        first = errors[0]
        raise EEGFormatError(
            f"{len(errors)} of {len(records.frame)} Bonn EEG files under {root} are malformed: {listing}"
            f"{' ...' if len(errors) > 10 else ''}. Fix or remove them, or pass skip_malformed=True to leave "
            f"them out (they are then listed in EEGDataset.skipped).", first["path"], first["line"], errors)
    frame = records.frame.iloc[keep].reset_index(drop=True)
    empty = [records.class_names[k] for k in range(len(records.class_names)) if not (frame["label"] == k).any()]
    if empty:
        raise ValueError(f"{root}: no readable signal for class(es) {empty} of task {task!r} "
                         f"(sets read: {sorted(set(frame['group'].str.split('/').str[0]))})")
    return EEGDataset(np.stack(signals), frame["label"].to_numpy(np.int64), records.class_names, float(fs), frame,
                      errors)


def ingest_bonn(dest: Path, path: str | None = None, **_: object) -> None:
    """Copy a user's Bonn folder (set folders Z, O, N, F, S) into ``dest`` so DVC versions it."""
    if not path:
        raise ValueError("dataset 'bonn_eeg' needs a path: a directory holding the Bonn set folders Z, O, N, F, S")
    found = find_bonn_sets(path)
    if not found:
        raise FileNotFoundError(f"{path}: no Bonn set folders (Z, O, N, F, S) found")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for s, src in found.items():
        shutil.copytree(src, dest / src.name, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------- NumPy
def read_eeg_npz(path: str | Path, *, fs: float | None = None) -> EEGDataset:
    """Read ``signals`` (N, T) real, ``labels`` (N,) int and optional ``fs``, ``class_names`` from a .npz.

    The sampling rate comes from the file's ``fs`` or from the ``fs`` argument (both given must
    agree; neither is an error: the Hz axis of a scalogram depends on it). ``class_names``
    defaults to ``class_0..class_{K-1}``. No pickled objects are loaded.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise EEGFormatError(f"{path}: not a readable .npz without pickled objects: {exc}", str(path)) from None
    for key in ("signals", "labels"):
        if key not in data:
            raise EEGFormatError(f"{path}: missing array {key!r} (found {sorted(data)})", str(path))
    signals, labels = data["signals"], data["labels"]
    if signals.ndim != 2 or signals.shape[0] == 0 or signals.shape[1] == 0:
        raise EEGFormatError(f"{path}: 'signals' must be a non-empty (N, T) array, got shape {signals.shape}", str(path))
    if not (np.issubdtype(signals.dtype, np.floating) or np.issubdtype(signals.dtype, np.integer)):
        raise EEGFormatError(f"{path}: 'signals' must be real numbers, got dtype {signals.dtype}", str(path))
    if labels.shape != (signals.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise EEGFormatError(f"{path}: 'labels' must be {signals.shape[0]} integers (one per signal), got "
                             f"shape {labels.shape} dtype {labels.dtype}", str(path))
    bad = np.flatnonzero(~np.isfinite(signals).all(axis=1))
    if bad.size:
        raise EEGFormatError(f"{path}: signals {bad[:10].tolist()} contain NaN or inf", str(path))
    file_fs = float(data["fs"]) if "fs" in data else None
    if file_fs is not None and fs is not None and not math.isclose(file_fs, fs, rel_tol=1e-9):
        raise ValueError(f"{path}: fs={file_fs} in the file but fs={fs} was passed")
    rate = file_fs if file_fs is not None else fs
    if rate is None:
        raise ValueError(f"{path}: no 'fs' array in the file; pass fs= (sampling rate in Hz)")
    if not rate > 0:
        raise ValueError(f"{path}: sampling rate must be positive, got {rate}")
    if "class_names" in data:
        class_names = [str(c) for c in data["class_names"].tolist()]
    else:
        class_names = [f"class_{k}" for k in range(int(labels.max()) + 1)]
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise EEGFormatError(f"{path}: labels must be in 0..{len(class_names) - 1} ({len(class_names)} class names), "
                             f"got {int(labels.min())}..{int(labels.max())}", str(path))
    n = signals.shape[0]
    frame = pd.DataFrame({
        "path": [f"{path.name}#{i}" for i in range(n)], "label": labels.astype(np.int64),
        "group": [f"{path.stem}/{i}" for i in range(n)], "stratify": labels.astype(np.int64),
        "attrs": [json.dumps({"index": i, "fs": rate}) for i in range(n)],
    })
    return EEGDataset(signals.astype(np.float32), labels.astype(np.int64), class_names, float(rate), frame)


# ------------------------------------------------------------------------------------------ EDF
def read_edf_file(path: str | Path, channel: str | int | None = None) -> tuple[np.ndarray, float, str]:
    """One channel of an EDF/EDF+ (or BDF) file, read with pyEDFlib: ``(signal float32 in physical
    units, sampling rate in Hz, channel label)``.

    ``channel`` is a label (case-insensitive, surrounding spaces ignored), an index, or ``None`` for
    a file with exactly one signal. Errors name the file: not an EDF file, no such channel, an
    empty channel, non-finite samples.
    """
    import pyedflib

    path = Path(path)
    try:
        reader = pyedflib.EdfReader(str(path))
    except OSError as exc:
        raise EEGFormatError(f"{path}: not a readable EDF/BDF file ({exc})", str(path)) from None
    try:
        labels = [lab.strip() for lab in reader.getSignalLabels()]
        if channel is None:
            if len(labels) != 1:
                raise EEGFormatError(f"{path}: {len(labels)} channels {labels}; choose one (a label or an index)",
                                     str(path))
            index = 0
        elif isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
            if not 0 <= int(channel) < len(labels):
                raise EEGFormatError(f"{path}: channel index {channel} is out of range (0..{len(labels) - 1})",
                                     str(path))
            index = int(channel)
        else:
            wanted = str(channel).strip().lower()
            matches = [i for i, lab in enumerate(labels) if lab.lower() == wanted]
            if not matches:
                raise EEGFormatError(f"{path}: no channel {channel!r} (channels: {labels})", str(path))
            index = matches[0]
        fs = float(reader.getSampleFrequency(index))
        signal = reader.readSignal(index).astype(np.float64)
    finally:
        reader.close()
    if signal.size == 0:
        raise EEGFormatError(f"{path}: channel {labels[index]!r} holds no samples", str(path))
    if not np.isfinite(signal).all():
        raise EEGFormatError(f"{path}: channel {labels[index]!r} has non-finite samples", str(path))
    if not fs > 0:
        raise EEGFormatError(f"{path}: channel {labels[index]!r} has sampling rate {fs}", str(path))
    return signal.astype(np.float32), fs, labels[index]


def read_edf_folder(root: str | Path, *, channel: str | int | None = None, window: int, overlap: int = 0,
                    class_names: Sequence[str] | None = None) -> EEGDataset:
    """Recordings as ``root/<class>/<file>.edf`` (``.bdf`` too), cut into segments of ``window``
    samples (``overlap`` shared between neighbours; the tail shorter than a window is dropped).

    Every segment's ``group`` is its recording, so splits keep all segments of one recording on
    the same side. All files must share one sampling rate. ``class_names`` fixes the class order
    (default: the folder names, sorted).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"EDF root {root} is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(class_names) if class_names is not None else found
    missing = [c for c in names if c not in found]
    if missing or not names:
        raise FileNotFoundError(f"{root}: class folder(s) {missing or '(none)'} not found (folders: {found})")
    signals, rows, errors, rates = [], [], [], {}
    for label, cls in enumerate(names):
        files = sorted(f for f in (root / cls).rglob("*") if f.is_file() and f.suffix.lower() in (".edf", ".bdf"))
        for f in files:
            rel = f.relative_to(root).as_posix()
            try:
                signal, fs, chan = read_edf_file(f, channel)
                if signal.size < window:
                    raise EEGFormatError(f"{rel}: {signal.size} samples, shorter than one window of {window}", rel)
            except EEGFormatError as exc:
                errors.append({"path": rel, "line": None, "reason": str(exc)})
                continue
            rates.setdefault(fs, rel)
            segs = segment(signal, window, overlap)
            signals.append(segs)
            rows += [{"path": f"{rel}#{i}", "label": label, "group": rel, "stratify": label,
                      "attrs": json.dumps({"segment": i, "channel": chan, "fs": fs})} for i in range(len(segs))]
    if errors:
        raise EEGFormatError(f"{len(errors)} EDF file(s) under {root} could not be used: "
                             + "; ".join(e["reason"] for e in errors[:10]), errors[0]["path"], None, errors)
    if len(rates) > 1:
        raise ValueError(f"{root}: files have different sampling rates {dict((r, p) for r, p in rates.items())}: "
                         "resample them to one rate first")
    empty = [c for k, c in enumerate(names) if not any(r["label"] == k for r in rows)]
    if empty:
        raise ValueError(f"{root}: no EDF recording for class(es) {empty}")
    return EEGDataset(np.concatenate(signals).astype(np.float32), np.array([r["label"] for r in rows], np.int64),
                      names, float(next(iter(rates))), pd.DataFrame(rows))
