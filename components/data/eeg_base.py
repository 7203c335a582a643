"""What every EEG module shares: the Bonn constants and tasks, :class:`EEGDataset`,
:class:`EEGFormatError`, and the text parser of one-number-per-line signals (a Bonn file, an
uploaded ``.txt``). numpy only (pandas for type hints), like :mod:`components.data.eeg_segments`:
what a Serve replica reading uploaded signals needs, without the readers' pandas and registry."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

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
