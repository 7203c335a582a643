"""EEG windows and reassembly (as in Dubey et al.), numpy only.

* :func:`segment`: overlapping windows of one signal; :func:`segment_dataset` of every signal.
* :func:`reassemble` / :func:`reassemble_by_class`: cut same-class segments into ``parts`` equal
  sub-segments and build new segments whose j-th sub-segment is the j-th sub-segment of some
  segment of the same class (order positions kept, several source segments mixed).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np


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
