"""Continuous-wavelet scalograms: 1-D signals (EEG) -> grayscale images for the ResNet models.

Pipeline of :func:`scalogram` for one signal ``x`` sampled at ``fs`` Hz:

1. frequencies: ``num_scales`` geometrically spaced frequencies from ``fmax`` down to ``fmin`` Hz
   (or the given ``scales``); scale and frequency are tied by
   ``f = pywt.scale2frequency(wavelet, scale) * fs`` (:func:`cwt_frequencies`);
2. ``W = pywt.cwt(x, scales, wavelet, sampling_period=1/fs, method="fft")`` and ``M = |W|``
   (rows: frequency, high at the top; columns: time). pywt's scale normalisation is kept
   (a sinusoid of fixed amplitude gives larger coefficients at larger scales);
3. ``V = log1p(M)`` when ``log`` (default), else ``V = M``;
4. resize ``V`` (float) to ``out_size = (H, W)`` with OpenCV, each axis separately: INTER_AREA
   where the axis shrinks (averages, no aliasing), INTER_LINEAR where it grows;
5. normalise to uint8. **Default: per-image min-max**:
   ``img = round(255 * (V - V.min()) / (V.max() - V.min()))`` (a constant image gives zeros).
   This keeps the time-frequency pattern and discards absolute amplitude and recording gain
   (the ictal/normal amplitude difference then shows only through the pattern). With
   ``value_range=(lo, hi)`` the mapping is fixed instead: ``round(255 * clip((V - lo) / (hi - lo), 0, 1))``
   in the units of ``V`` (log1p of the magnitude when ``log``), which keeps amplitude but depends
   on the units of the recording (µV vs ADC counts) and must then be fixed per dataset.

``"cmor1.5-1.0"`` (complex Morlet, bandwidth 1.5, centre 1.0) gives a smooth magnitude envelope;
``"morl"`` is real, so its magnitude ripples at the analysed frequency.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pywt

from components.data.images import encode_png

DEFAULT_WAVELET = "cmor1.5-1.0"
DEFAULT_FREQS = (0.5, 40.0)  # Hz: the Bonn recordings were band-passed 0.53-40 Hz


def _wavelet(wavelet: str | pywt.ContinuousWavelet) -> pywt.ContinuousWavelet:
    if isinstance(wavelet, pywt.ContinuousWavelet):
        return wavelet
    try:
        return pywt.ContinuousWavelet(wavelet)
    except ValueError:
        raise ValueError(f"{wavelet!r} is not a continuous wavelet; e.g. 'cmor1.5-1.0', 'morl' "
                         f"(pywt families: {pywt.wavelist(kind='continuous')[:12]} ...)") from None


def cwt_frequencies(fs: float, *, wavelet: str = DEFAULT_WAVELET, freqs: tuple[float, float] | None = None,
                    scales: Sequence[float] | np.ndarray | None = None,
                    num_scales: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The (scales, frequencies in Hz) of a scalogram's rows, highest frequency first.

    Give either ``freqs=(fmin, fmax)`` (``num_scales`` geometric steps, default
    :data:`DEFAULT_FREQS`) with ``0 < fmin < fmax <= fs/2``, or explicit positive ``scales``.
    """
    if not fs > 0:
        raise ValueError(f"fs must be a positive sampling rate in Hz, got {fs}")
    w = _wavelet(wavelet)
    if scales is not None:
        if freqs is not None:
            raise ValueError("give either freqs=(fmin, fmax) or scales, not both")
        sc = np.asarray(scales, dtype=np.float64)
        if sc.ndim != 1 or sc.size == 0 or not np.all(sc > 0):
            raise ValueError("scales must be a non-empty 1-D sequence of positive numbers")
        f = np.asarray(pywt.scale2frequency(w, sc), dtype=np.float64) * fs
        return sc, f
    if isinstance(num_scales, bool) or not isinstance(num_scales, (int, np.integer)) or num_scales < 2:
        raise ValueError(f"num_scales must be an integer >= 2, got {num_scales!r}")
    fmin, fmax = DEFAULT_FREQS if freqs is None else (float(freqs[0]), float(freqs[1]))
    if not 0 < fmin < fmax:
        raise ValueError(f"freqs must be (fmin, fmax) with 0 < fmin < fmax, got {freqs}")
    if fmax > fs / 2:
        raise ValueError(f"fmax={fmax} Hz is above the Nyquist frequency fs/2={fs / 2:g} Hz")
    f = np.geomspace(fmax, fmin, int(num_scales))
    sc = pywt.scale2frequency(w, 1.0) * fs / f  # scale2frequency(w, s) = fc / s
    return sc, f


def cwt_magnitude(signal: np.ndarray, fs: float, *, wavelet: str = DEFAULT_WAVELET,
                  freqs: tuple[float, float] | None = None, scales: Sequence[float] | np.ndarray | None = None,
                  num_scales: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``|pywt.cwt(signal)|`` as float32 (num_scales, T), rows highest frequency first, and the row frequencies in Hz."""
    x = np.asarray(signal, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"a scalogram needs a 1-D signal of >= 2 samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("signal contains NaN or inf")
    w = _wavelet(wavelet)
    sc, f = cwt_frequencies(fs, wavelet=w, freqs=freqs, scales=scales, num_scales=num_scales)
    coefs, _ = pywt.cwt(x, sc, w, sampling_period=1.0 / fs, method="fft")
    return np.abs(coefs).astype(np.float32), f


def _resize_axis_aware(v: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    h, w = int(out_size[0]), int(out_size[1])
    if v.shape[1] != w:
        interp = cv2.INTER_AREA if w < v.shape[1] else cv2.INTER_LINEAR
        v = cv2.resize(v, (w, v.shape[0]), interpolation=interp)
    if v.shape[0] != h:
        interp = cv2.INTER_AREA if h < v.shape[0] else cv2.INTER_LINEAR
        v = cv2.resize(v, (w, h), interpolation=interp)
    return v


def to_uint8(v: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Per-image min-max (``value_range=None``) or fixed-range mapping of ``v`` to uint8 (see module doc)."""
    v = v.astype(np.float64)
    if value_range is None:
        lo, hi = float(v.min()), float(v.max())
        if hi - lo <= 0:
            return np.zeros(v.shape, dtype=np.uint8)
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    return np.rint(255.0 * np.clip((v - lo) / (hi - lo), 0.0, 1.0)).astype(np.uint8)


def cwt_kwargs(cwt: Mapping | None) -> dict:
    """:func:`scalogram` keyword arguments from a params-style ``cwt`` mapping (``data.eeg.cwt``)."""
    c = dict(cwt or {})
    return dict(wavelet=c.get("wavelet", DEFAULT_WAVELET), freqs=tuple(c["freqs"]) if c.get("freqs") else None,
                num_scales=int(c.get("num_scales", 64)), out_size=tuple(c.get("out_size", (64, 64))),
                log=bool(c.get("log", True)))


def scalogram(signal: np.ndarray, fs: float, *, wavelet: str = DEFAULT_WAVELET,
              freqs: tuple[float, float] | None = None, scales: Sequence[float] | np.ndarray | None = None,
              num_scales: int = 64, out_size: tuple[int, int] | None = (64, 64), log: bool = True,
              value_range: tuple[float, float] | None = None) -> np.ndarray:
    """A uint8 (H, W) scalogram image of a 1-D signal; row 0 is the highest frequency.

    Steps and normalisation are in the module docstring: CWT magnitude, ``log1p`` (``log``),
    resize to ``out_size = (H, W)`` (``None``: keep num_scales x T), then per-image min-max to
    0..255, or a fixed ``value_range`` when given.
    """
    mag, _ = cwt_magnitude(signal, fs, wavelet=wavelet, freqs=freqs, scales=scales, num_scales=num_scales)
    v = np.log1p(mag) if log else mag
    if out_size is not None:
        if len(out_size) != 2 or min(int(out_size[0]), int(out_size[1])) < 1:
            raise ValueError(f"out_size must be (H, W) with positive sizes, got {out_size}")
        v = _resize_axis_aware(v, out_size)
    return to_uint8(v, value_range)


def scalogram_batch(batch: dict[str, np.ndarray], *, fs: float | None = None, wavelet: str = DEFAULT_WAVELET,
                    freqs: tuple[float, float] | None = None, scales: Sequence[float] | None = None,
                    num_scales: int = 64, out_size: tuple[int, int] = (64, 64), log: bool = True,
                    value_range: tuple[float, float] | None = None,
                    keep_signal: bool = False) -> dict[str, np.ndarray]:
    """Batch function for ``Dataset.map_batches(scalogram_batch, batch_format="numpy", fn_kwargs=...)``.

    ``batch["signal"]`` is a 2-D array (equal lengths) or an object array of 1-D arrays. The
    sampling rate is the ``fs`` argument or a per-row ``batch["fs"]`` column (both given must
    agree). Returns ``image`` (object array of grayscale PNG bytes, H x W = ``out_size``) plus
    every other input column unchanged; ``signal`` is dropped unless ``keep_signal``.
    """
    if "signal" not in batch:
        raise ValueError(f"scalogram_batch needs a 'signal' column, got {sorted(batch)}")
    signals = batch["signal"]
    n = len(signals)
    if "fs" in batch:
        rates = np.asarray(batch["fs"], dtype=np.float64)
        if fs is not None and not np.allclose(rates, fs):
            raise ValueError(f"fs={fs} was passed but the batch's 'fs' column holds {np.unique(rates)[:5].tolist()}")
    elif fs is not None:
        rates = np.full(n, float(fs))
    else:
        raise ValueError("scalogram_batch needs fs= (Hz) or an 'fs' column")
    images = np.empty(n, dtype=object)
    for i in range(n):
        img = scalogram(np.asarray(signals[i], dtype=np.float64), float(rates[i]), wavelet=wavelet, freqs=freqs,
                        scales=scales, num_scales=num_scales, out_size=out_size, log=log, value_range=value_range)
        images[i] = encode_png(img)
    out = {"image": images}
    for k, v in batch.items():
        if k == "image" or (k == "signal" and not keep_signal):
            continue
        out[k] = v
    return out


def save_example_scalograms(signals_by_class: Mapping[str, np.ndarray | Sequence[np.ndarray]], fs: float,
                            out_png: str | Path, *, per_class: int = 3, wavelet: str = DEFAULT_WAVELET,
                            freqs: tuple[float, float] | None = None, num_scales: int = 64, log: bool = True,
                            title: str | None = None, max_columns: int = 600, dpi: int = 100) -> Path:
    """Save a figure with ``per_class`` example scalograms per class (one row per class) for a person.

    Axes: time in s, frequency in Hz (log scale). Each panel shows ``log1p|W|`` (or ``|W|``) with
    its own colour range, as the model sees it after per-image min-max. Time is averaged down to
    at most ``max_columns`` columns for drawing only. Returns ``out_png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(signals_by_class)
    if not names:
        raise ValueError("signals_by_class is empty")
    cols = max(1, min(per_class, max(len(signals_by_class[k]) for k in names)))
    fig = Figure(figsize=(3.2 * cols, 2.4 * len(names) + (0.4 if title else 0)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), cols, squeeze=False)
    for r, name in enumerate(names):
        sigs = list(signals_by_class[name])[:cols]
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(sigs):
                ax.set_axis_off()
                continue
            mag, f = cwt_magnitude(sigs[c], fs, wavelet=wavelet, freqs=freqs, num_scales=num_scales)
            v = np.log1p(mag) if log else mag
            t_end = mag.shape[1] / fs
            if v.shape[1] > max_columns:
                v = cv2.resize(v, (max_columns, v.shape[0]), interpolation=cv2.INTER_AREA)
            t = np.linspace(0.0, t_end, v.shape[1])
            ax.pcolormesh(t, f, v, shading="nearest", cmap="magma", rasterized=True)
            ax.set_yscale("log")
            ax.set_ylim(f.min(), f.max())
            ticks = [v for v in (0.5, 1, 2, 4, 8, 16, 32, 64, 128) if f.min() <= v <= f.max()]
            ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
            ax.minorticks_off()
            ax.set_title(f"{name} #{c + 1}", fontsize=9)
            if c == 0:
                ax.set_ylabel("frequency (Hz)")
            if r == len(names) - 1:
                ax.set_xlabel("time (s)")
            ax.tick_params(labelsize=7)
    fig.suptitle(title or f"scalograms ({wavelet}, {'log1p|W|' if log else '|W|'}, per-panel colour range)",
                 fontsize=10)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
