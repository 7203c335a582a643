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

Modules: :mod:`components.data.eeg_base` (constants, :class:`EEGDataset`, :class:`EEGFormatError`,
the text parser), :mod:`components.data.eeg_readers` (Bonn, NumPy, EDF),
:mod:`components.data.eeg_segments` (windows, reassembly) and the synthetic signals here. Every
name is importable from this module.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.eeg_base import (BONN_FS, BONN_LENGTH, BONN_SET_CLASS, BONN_SETS, BONN_TASKS, EEG_CLASSES,
                                      EEGDataset, EEGFormatError, parse_signal_text)
from components.data.eeg_readers import (bonn_records, find_bonn_sets, ingest_bonn, read_bonn, read_bonn_file,
                                         read_edf_file, read_edf_folder, read_eeg_npz)
from components.data.eeg_segments import reassemble, reassemble_by_class, segment, segment_dataset

__all__ = ["BONN_FS", "BONN_LENGTH", "BONN_SETS", "BONN_SET_CLASS", "BONN_TASKS", "EEG_CLASSES", "EEGDataset",
           "EEGFormatError", "bonn_records", "find_bonn_sets", "ingest_bonn", "parse_signal_text", "read_bonn",
           "read_bonn_file", "read_edf_file", "read_edf_folder", "read_eeg_npz", "reassemble", "reassemble_by_class",
           "segment", "segment_dataset", "synthetic_bonn", "synthetic_eeg", "write_bonn_layout"]


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
