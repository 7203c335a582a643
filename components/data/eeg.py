"""EEG signals: the Bonn University layout, a NumPy source, a synthetic generator, signal augmentation.

Sources
-------
* **Bonn University EEG** (Andrzejak et al., 2001): five sets Z, O, N, F, S (also called A-E), each a
  folder of 100 text files (``Z/Z001.txt`` ... ; set N ships as ``N001.TXT``) holding one segment of
  4,097 samples, one integer per line, sampled at 173.61 Hz (23.6 s). Sets map to classes:
  Z, O = ``normal`` (healthy volunteers, eyes open / closed), N, F = ``interictal`` (patients,
  seizure-free intervals), S = ``ictal`` (seizure activity). :func:`read_bonn` reads a folder of that
  layout for one of the :data:`BONN_TASKS`; :func:`bonn_records` only lists the files (the
  ``Records`` shape the dataset registry in :mod:`components.data.sources` uses).
* **EDF / EDF+ / BDF** (pyEDFlib): :func:`read_edf_file` reads one channel of a recording;
  :func:`read_edf_folder` reads ``<class>/<file>.edf`` recordings cut into equal windows, grouped by
  recording.
* **NumPy**: a ``.npz`` with ``signals`` (N, T), ``labels`` (N,) and optional ``fs`` and
  ``class_names`` (:func:`read_eeg_npz`).
* **Synthetic** (:func:`synthetic_eeg`, :func:`synthetic_bonn`, :func:`write_bonn_layout`): signals of
  three classes made for tests and pipeline plumbing. **They are not EEG recordings: accuracy, AUC or
  any other figure measured on synthetic signals says nothing about clinical seizure detection.**

Augmentation (as in Dubey et al.)
---------------------------------
* :func:`segment`: overlapping windows of one signal.
* :func:`reassemble` / :func:`reassemble_by_class`: cut same-class segments into ``parts`` equal
  sub-segments and build new segments whose j-th sub-segment is the j-th sub-segment of some
  segment of the same class (order positions kept, several source segments mixed).

Arrays are float32 (N, T); labels are int64 indices into ``class_names``.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.sources import Records

BONN_FS = 173.61
BONN_LENGTH = 4097
BONN_SETS = ("Z", "O", "N", "F", "S")
EEG_CLASSES = ["normal", "interictal", "ictal"]
BONN_SET_CLASS = {"Z": "normal", "O": "normal", "N": "interictal", "F": "interictal", "S": "ictal"}

# task -> (class_names, set -> label). Sets absent from the mapping are not used by the task.
BONN_TASKS: dict[str, tuple[list[str], dict[str, int]]] = {
    "ictal_vs_interictal": (["interictal", "ictal"], {"N": 0, "F": 0, "S": 1}),
    "normal_vs_ictal": (["normal", "ictal"], {"Z": 0, "O": 0, "S": 1}),
    "normal_vs_interictal": (["normal", "interictal"], {"Z": 0, "O": 0, "N": 1, "F": 1}),
    "3class": (["normal", "interictal", "ictal"], {"Z": 0, "O": 0, "N": 1, "F": 1, "S": 2}),
}


class EEGFormatError(ValueError):
    """A signal file (or several) could not be read; the message names the file(s) and line(s)."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 errors: list[dict] | None = None):
        super().__init__(message)
        self.path, self.line = path, line
        self.errors = errors if errors is not None else [{"path": path, "line": line, "reason": message}]


@dataclass(frozen=True)
class EEGDataset:
    """Signals of equal length with their labels.

    ``records`` has one row per signal with the registry's columns (path, label, group,
    stratify, attrs); ``skipped`` lists files left out with ``skip_malformed`` (path, line, reason).
    """

    signals: np.ndarray  # (N, T) float32
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    fs: float
    records: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


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


def parse_signal_text(raw: bytes, name: str, length: int | None = None) -> np.ndarray:
    """Text with one number per line (a Bonn file, an uploaded ``.txt``) -> float32 samples; the
    checks and messages of :func:`read_bonn_file`, naming ``name``."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise EEGFormatError(f"{name}: line {line}: not text (byte {raw[exc.start]:#04x})", name, line) from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    values = np.empty(len(lines), dtype=np.float64)
    for i, line in enumerate(lines):
        s = line.strip()
        if not s:
            raise EEGFormatError(f"{name}: line {i + 1}: empty line", name, i + 1)
        try:
            if "_" in s:  # float() would accept '1_000'
                raise ValueError(s)
            v = float(s)
        except ValueError:
            raise EEGFormatError(f"{name}: line {i + 1}: not a number: {s[:40]!r}", name, i + 1) from None
        if not math.isfinite(v):
            raise EEGFormatError(f"{name}: line {i + 1}: non-finite value {s[:40]!r}", name, i + 1)
        values[i] = v
    n = len(values)
    if n == 0:
        raise EEGFormatError(f"{name}: line 1: file is empty, expected {length or 'some'} samples", name, 1)
    if length is not None and n != length:
        if n > length:
            raise EEGFormatError(f"{name}: line {length + 1}: expected {length} samples (one per line), found {n}; "
                                 f"extra values from line {length + 1}", name, length + 1)
        raise EEGFormatError(f"{name}: line {n + 1}: expected {length} samples (one per line), found {n}; "
                             f"the file ends after line {n}", name, n + 1)
    return values.astype(np.float32)


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


# ------------------------------------------------------------------------------------ synthetic
def _pink_noise(n: int, fs: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance 1/f (pink) noise: white noise shaped by 1/sqrt(f) in amplitude."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / fs)
    f[0] = f[1]
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return (x - x.mean()) / (x.std() + 1e-12)


def _rhythm(t: np.ndarray, f_lo: float, f_hi: float, amp: float, rng: np.random.Generator) -> np.ndarray:
    """A band rhythm: a sinusoid in [f_lo, f_hi] Hz with slow amplitude waxing/waning and phase jitter."""
    f = rng.uniform(f_lo, f_hi)
    env = 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.05, 0.25) * t + rng.uniform(0, 2 * np.pi))
    jitter = np.cumsum(rng.standard_normal(t.size)) * 0.01
    return amp * env * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi) + jitter)


def _background(t: np.ndarray, fs: float, rng: np.random.Generator, alpha_uv: float) -> np.ndarray:
    """Resting background in µV: alpha (8-12 Hz), theta (4-7 Hz), beta (15-25 Hz) over pink noise."""
    x = rng.uniform(10, 15) * _pink_noise(t.size, fs, rng)
    x += _rhythm(t, 8.5, 11.5, alpha_uv, rng)
    x += _rhythm(t, 4.0, 7.0, rng.uniform(4, 8), rng)
    if fs > 50:
        x += _rhythm(t, 15.0, 25.0, rng.uniform(2, 5), rng)
    return x


def _gauss(t: np.ndarray, t0: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - t0) / sigma) ** 2)


def _normal(t, fs, rng):
    return _background(t, fs, rng, alpha_uv=rng.uniform(20, 35))


def _interictal(t, fs, rng):
    """Background plus sparse sharp spikes (sigma 8-15 ms, 150-300 µV), most followed by a slow wave."""
    x = _background(t, fs, rng, alpha_uv=rng.uniform(8, 20))
    duration = t[-1] + 1.0 / fs
    n_events = max(1, rng.poisson(rng.uniform(0.35, 0.6) * duration))
    for t0 in rng.uniform(0.3, max(0.31, duration - 0.5), n_events):
        sign = rng.choice([-1.0, 1.0])
        amp = rng.uniform(150, 300)
        x += sign * amp * _gauss(t, t0, rng.uniform(0.008, 0.015))
        if rng.random() < 0.6:  # spike-and-slow-wave: opposite polarity, later, wider
            x -= sign * rng.uniform(0.3, 0.6) * amp * _gauss(t, t0 + rng.uniform(0.12, 0.2), rng.uniform(0.06, 0.1))
    return x


def _ictal(t, fs, rng):
    """Rhythmic ~3 Hz spike-and-wave discharge (250-450 µV) throughout, over a weaker background."""
    f0 = rng.uniform(2.7, 3.3)
    inst_f = f0 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.02, 0.08) * t + rng.uniform(0, 2 * np.pi))
    phase = np.cumsum(inst_f) / fs + rng.uniform(0, 1)
    p = np.mod(phase, 1.0)  # position within the current cycle
    amp = rng.uniform(250, 450) * (1.0 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.03, 0.1) * t))
    spike = -np.exp(-0.5 * ((p - 0.15) / 0.035) ** 2)
    wave = 0.7 * np.exp(-0.5 * ((p - 0.55) / 0.16) ** 2)
    return amp * (spike + wave) + _background(t, fs, rng, alpha_uv=rng.uniform(5, 12))


_GENERATORS = {"normal": _normal, "interictal": _interictal, "ictal": _ictal}


def synthetic_eeg(n_per_class: int, *, length: int = BONN_LENGTH, fs: float = BONN_FS, seed: int = 0) -> EEGDataset:
    """Synthetic EEG-like signals of three classes (labels 0 normal, 1 interictal, 2 ictal), in µV.

    * normal: background rhythms (alpha 8.5-11.5 Hz ~20-35 µV, theta 4-7 Hz, beta 15-25 Hz)
      over 1/f (pink) noise of 10-15 µV RMS;
    * interictal: a background with less alpha plus sparse (0.35-0.6 per second) sharp spikes of
      150-300 µV (8-15 ms wide), 60 % of them followed by an opposite-polarity slow wave;
    * ictal: a rhythmic 2.7-3.3 Hz spike-and-wave discharge of 250-450 µV through the whole
      segment over a weak background.

    These are hand-made test signals, NOT recordings: any accuracy, sensitivity or AUC measured on
    them validates the plumbing only and must never be reported as a clinical or EEG result.
    Deterministic for a given ``seed``.
    """
    if n_per_class < 1 or length < 16 or not fs > 0:
        raise ValueError(f"need n_per_class >= 1, length >= 16 and fs > 0; got {n_per_class}, {length}, {fs}")
    rng = np.random.default_rng(seed)
    t = np.arange(length) / fs
    signals, labels = [], []
    for label, name in enumerate(EEG_CLASSES):
        for _ in range(n_per_class):
            x = _GENERATORS[name](t, fs, rng)
            signals.append(x - x.mean())
            labels.append(label)
    n = len(labels)
    frame = pd.DataFrame({
        "path": [f"synthetic#{i}" for i in range(n)], "label": np.asarray(labels, np.int64),
        "group": [f"synthetic/{i}" for i in range(n)], "stratify": np.asarray(labels, np.int64),
        "attrs": [json.dumps({"synthetic": True, "fs": fs}) for _ in range(n)],
    })
    return EEGDataset(np.stack(signals).astype(np.float32), np.asarray(labels, np.int64), list(EEG_CLASSES),
                      float(fs), frame)


def synthetic_bonn(n_per_set: int, *, length: int = BONN_LENGTH, fs: float = BONN_FS,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic signals for each Bonn set: Z, O normal; N, F interictal; S ictal (not clinical data)."""
    ds = synthetic_eeg(2 * n_per_set, length=length, fs=fs, seed=seed)
    by_class = {name: ds.signals[ds.labels == k] for k, name in enumerate(EEG_CLASSES)}
    return {"Z": by_class["normal"][:n_per_set], "O": by_class["normal"][n_per_set:],
            "N": by_class["interictal"][:n_per_set], "F": by_class["interictal"][n_per_set:],
            "S": by_class["ictal"][:n_per_set]}


def write_bonn_layout(root: str | Path, signals_by_set: Mapping[str, np.ndarray], *, suffix: str = ".txt") -> list[Path]:
    """Write signals in the Bonn layout: ``root/<key>/<SET><index:03d><suffix>``, one integer per line.

    Keys are set letters in any case; the folder is named exactly as the key (so ``"z"`` writes
    ``z/Z001.txt``), which lets tests exercise the reader's leniency. Values are rounded to
    integers as in the original files. Returns the written paths.
    """
    root = Path(root)
    written = []
    for key, sigs in signals_by_set.items():
        s = key.upper()
        if s not in BONN_SETS:
            raise ValueError(f"{key!r} is not a Bonn set; expected one of {BONN_SETS}")
        sigs = np.asarray(sigs)
        if sigs.ndim == 1:
            sigs = sigs[None]
        d = root / key
        d.mkdir(parents=True, exist_ok=True)
        for i, x in enumerate(sigs, start=1):
            f = d / f"{s}{i:03d}{suffix}"
            f.write_text("\n".join(str(v) for v in np.rint(x).astype(np.int64).tolist()) + "\n")
            written.append(f)
    return written


# ---------------------------------------------------------------------------------- augmentation
def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer number of samples, got {value!r}")
    return int(value)


def segment(signal: np.ndarray, window: int, overlap: int = 0) -> np.ndarray:
    """Cut a 1-D signal into windows of ``window`` samples, consecutive windows sharing ``overlap``.

    The step is ``window - overlap``; window k covers ``[k*step, k*step + window)``; the tail that
    does not fill a whole window is dropped. Returns a new (n_windows, window) array with
    ``n_windows = 1 + (len(signal) - window) // step``.
    """
    x = np.asarray(signal)
    if x.ndim != 1:
        raise ValueError(f"segment needs a 1-D signal, got shape {x.shape}")
    window, overlap = _as_int("window", window), _as_int("overlap", overlap)
    if window < 1:
        raise ValueError(f"window must be >= 1 sample, got {window}")
    if window > x.size:
        raise ValueError(f"window ({window} samples) is longer than the signal ({x.size} samples)")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than window ({window})")
    step = window - overlap
    return np.lib.stride_tricks.sliding_window_view(x, window)[::step].copy()


def segment_dataset(signals: np.ndarray, labels: np.ndarray, window: int, overlap: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment every row of ``signals`` (N, T); returns (windows, labels, source row index).

    Keep the source index as the split group: windows of one recording must not be spread over
    train and test (overlapping windows share samples).
    """
    signals = np.asarray(signals)
    if signals.ndim != 2 or len(signals) != len(labels):
        raise ValueError(f"signals must be (N, T) with N labels; got {signals.shape} and {len(labels)} labels")
    parts = [segment(x, window, overlap) for x in signals]
    counts = [len(p) for p in parts]
    return (np.concatenate(parts), np.repeat(np.asarray(labels), counts), np.repeat(np.arange(len(signals)), counts))


def _part_bounds(window: int, parts: int) -> np.ndarray:
    """Boundaries of ``parts`` near-equal sub-segments (np.array_split convention)."""
    q, r = divmod(window, parts)
    sizes = np.full(parts, q)
    sizes[:r] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def reassemble(segments: np.ndarray, n_new: int, parts: int, seed: int | None = None, *,
               return_sources: bool = False):
    """New segments from sub-segments of ``segments``, which must all belong to ONE class.

    Each segment is cut into ``parts`` near-equal consecutive sub-segments. New segment i takes
    its j-th sub-segment from the j-th sub-segment of segment ``sources[i, j]`` (positions are
    kept). The sources of one new segment are distinct segments when there are at least ``parts``
    of them, otherwise at least two different ones, so no new segment is a copy of an input.
    Returns (n_new, window), and with ``return_sources`` also the (n_new, parts) source indices.

    The joins are plain concatenations: each creates a step that shows up as a broadband vertical
    line in a scalogram.
    """
    segs = np.asarray(segments)
    if segs.ndim != 2:
        raise ValueError(f"reassemble needs (n_segments, window) segments of one class, got shape {segs.shape}")
    n_new, parts = _as_int("n_new", n_new), _as_int("parts", parts)
    m, window = segs.shape
    if m < 2:
        raise ValueError(f"reassemble needs at least 2 segments of the class to mix, got {m}")
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    if parts < 2:
        raise ValueError(f"parts must be >= 2 (1 part would only copy segments), got {parts}")
    if parts > window:
        raise ValueError(f"parts ({parts}) cannot exceed the segment length ({window} samples)")
    rng = np.random.default_rng(seed)
    bounds = _part_bounds(window, parts)
    sources = np.empty((n_new, parts), dtype=np.int64)
    out = np.empty((n_new, window), dtype=segs.dtype)
    for i in range(n_new):
        if m >= parts:
            src = rng.choice(m, size=parts, replace=False)
        else:
            src = rng.integers(0, m, size=parts)
            while np.all(src == src[0]):
                src = rng.integers(0, m, size=parts)
        sources[i] = src
        for j in range(parts):
            out[i, bounds[j]:bounds[j + 1]] = segs[src[j], bounds[j]:bounds[j + 1]]
    return (out, sources) if return_sources else out


def reassemble_by_class(segments: np.ndarray, labels: np.ndarray, n_new_per_class: int | Mapping[int, int],
                        parts: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`reassemble` applied to each class separately; returns (new segments, their labels).

    ``n_new_per_class`` is one count for every class or a {label: count} mapping (e.g. to
    balance classes). Sub-segments never cross classes.
    """
    segs, labels = np.asarray(segments), np.asarray(labels)
    if segs.ndim != 2 or labels.shape != (len(segs),):
        raise ValueError(f"segments must be (N, window) with N labels; got {segs.shape} and {labels.shape}")
    rng = np.random.default_rng(seed)
    outs, outs_y = [], []
    for label in np.unique(labels):
        n = n_new_per_class.get(int(label), 0) if isinstance(n_new_per_class, Mapping) else n_new_per_class
        if n == 0:
            continue
        new = reassemble(segs[labels == label], n, parts, int(rng.integers(2**63)))
        outs.append(new)
        outs_y.append(np.full(len(new), label, dtype=labels.dtype))
    if not outs:
        return np.empty((0, segs.shape[1]), segs.dtype), np.empty(0, labels.dtype)
    return np.concatenate(outs), np.concatenate(outs_y)
