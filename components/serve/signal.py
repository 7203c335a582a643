"""Signals over HTTP: a posted EEG signal -> the scalogram images the served model was trained on.

The app serves signals when it was built with ``signal`` settings (the prepare stage's CWT
settings of an EEG dataset: sampling rate, window, overlap, wavelet, frequencies, scales, image
size). A signal is cut into windows exactly as prepare cut the recordings, each window becomes a
scalogram with the same transform, and the windows are classified like images; the answer for the
signal averages the windows' probabilities.

Accepted bodies: ``application/json`` ``{"signal": [numbers], "fs": Hz (optional, must match)}``;
``text/plain`` with one number per line (a Bonn-format ``.txt``); ``application/x-npy`` (or
``application/octet-stream``) holding a 1-D numeric ``.npy`` array (no pickled objects).
"""
from __future__ import annotations

import io
import json
import math

import numpy as np

from components.data.cwt import cwt_kwargs, scalogram
from components.data.eeg import EEGFormatError, parse_signal_text, segment
from components.data.images import encode_png

SIGNAL_CONTENT_TYPES = ("application/json", "text/plain", "application/x-npy", "application/octet-stream")


class SignalError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_settings(settings: dict) -> dict:
    """The ``signal`` argument of the app, validated: fs, window, overlap and the cwt options."""
    known = {"fs", "window", "overlap", "cwt", "max_samples"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown signal settings {unknown}; known: {sorted(known)}")
    s = {"fs": float(settings["fs"]), "window": int(settings["window"]), "overlap": int(settings.get("overlap", 0)),
         "cwt": dict(settings.get("cwt") or {}), "max_samples": int(settings.get("max_samples", 1_000_000))}
    if not s["fs"] > 0 or s["window"] < 2 or not 0 <= s["overlap"] < s["window"]:
        raise ValueError(f"signal settings need fs > 0, window >= 2 and 0 <= overlap < window, got {settings}")
    return s


def parse_signal(body: bytes, ctype: str, max_samples: int) -> tuple[np.ndarray, dict]:
    """The posted samples (float64, 1-D, finite) and the JSON body's other fields."""
    doc: dict = {}
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise SignalError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("signal"), list):
            raise SignalError(422, 'JSON body must be an object {"signal": [numbers, ...]}')
        unknown = sorted(set(doc) - {"signal", "fs", "mode", "threshold"})
        if unknown:
            raise SignalError(422, f"unknown JSON fields {unknown}; allowed: signal, fs, mode, threshold")
        values = doc.pop("signal")
        bad = next((i for i, v in enumerate(values)
                    if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is not None:
            raise SignalError(422, f"signal[{bad}] is not a number: {str(values[bad])[:40]!r}")
        x = np.asarray(values, dtype=np.float64)
    elif ctype == "text/plain":
        try:
            x = parse_signal_text(body, "request body").astype(np.float64)
        except EEGFormatError as exc:
            raise SignalError(422, str(exc)) from None
    else:  # .npy bytes
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise SignalError(415, f"body is not a .npy array without pickled objects ({exc})") from None
        if not isinstance(arr, np.ndarray) or arr.ndim != 1:
            raise SignalError(422, f".npy signal must be a 1-D array, got shape {getattr(arr, 'shape', None)}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise SignalError(422, f".npy signal must hold real numbers, got dtype {arr.dtype}")
        x = arr.astype(np.float64)
    if x.size == 0:
        raise SignalError(422, "the signal is empty")
    if x.size > max_samples:
        raise SignalError(413, f"{x.size} samples, above the limit of {max_samples}")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise SignalError(422, f"the signal has non-finite values (NaN or inf) at sample(s) {bad[:5].tolist()}")
    return x, doc


def signal_images(x: np.ndarray, settings: dict, fs: float | None = None) -> list[bytes]:
    """PNG scalograms of the windows of ``x`` (the prepare stage's windows and transform)."""
    s = settings
    if fs is not None:
        if isinstance(fs, bool) or not isinstance(fs, (int, float)) or not math.isclose(float(fs), s["fs"], rel_tol=1e-6):
            raise SignalError(422, f"fs {fs!r} Hz differs from the {s['fs']} Hz the model was trained on: resample first")
    if x.size < s["window"]:
        raise SignalError(422, f"the signal has {x.size} samples; at least one window of {s['window']} "
                               f"({s['window'] / s['fs']:.2f} s at {s['fs']} Hz) is needed")
    kwargs = cwt_kwargs(s["cwt"])  # the transform prepare used
    return [encode_png(scalogram(w, s["fs"], **kwargs)) for w in segment(x, s["window"], s["overlap"])]
