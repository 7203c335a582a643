"""Drift: does what serving receives still look like the training inputs? (numpy only: the edge uses it too)

Two statistics of a rolling window of the last ``window`` inputs against reference statistics of
the training split:

* **intensity**: population-stability index (PSI) between the reference histogram of pixel values
  (inputs at the model's size, ``bins`` bins over 0..255) and the window's;
* **embedding**: Frechet distance between Gaussians of the cloud model's penultimate-layer
  embeddings, in the first ``k`` principal components of the training embeddings (a window of a
  few hundred inputs cannot estimate a 512-dimensional covariance).

Each is divided by its **null level**: the 95th percentile of the same statistic over windows of the
same size drawn from held-out in-distribution images (the validation split). A score of 1 is what
an ordinary window of in-distribution inputs reaches one time in twenty; the drift threshold
(``serve.drift.threshold``) is on that scale.

The reference is written by the calibrate stage (``models/serve/drift_reference.json``, also in the
edge bundle: :mod:`components.feedback.reference`); the Serve app's router and the edge runtime each
keep a :class:`DriftMonitor` and answer ``GET /drift``.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

EPS = 1e-4
# The models' input normalisation (components.augment.resize.normalise, components.edge.model):
# x = (pixel - 127.5) / 63.75. Repeated here so the edge runtime needs neither OpenCV nor torch.
PIXEL_MEAN, PIXEL_SCALE = 127.5, 63.75
log = logging.getLogger("resops.drift")


class DriftSettings(BaseModel):
    """``serve.drift`` in params.yaml (every key required: params.yaml holds the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool
    threshold: float = Field(gt=0, description="drift is declared when a full window's score exceeds this "
                                               "(1 = the 95th percentile of in-distribution windows)")
    window: int = Field(ge=10, description="inputs in the rolling window (and in the null windows of the reference)")
    components: int = Field(ge=1, description="principal components of the embeddings the Frechet distance uses")
    embed_rate: float = Field(ge=0, le=1, description="share of requests whose cloud embedding is observed: a "
                                                      "random sample, sent to the cloud also when not escalated")
    check_every: int = Field(ge=1, description="the score (metrics, the warning) is recomputed every this many inputs")


def input_histograms(x: np.ndarray, bins: int = 32) -> np.ndarray:
    """Histograms of model inputs (normalised float32 ``[C, H, W]`` or ``[N, C, H, W]``), in pixel values."""
    x = np.asarray(x, np.float32)
    x = x[None] if x.ndim == 3 else x
    pixels = np.clip(np.rint(x * PIXEL_SCALE + PIXEL_MEAN), 0, 255).astype(np.uint8)
    return intensity_histogram(pixels, bins)


def load_reference(path: str | Path) -> dict:
    ref = json.loads(Path(path).read_text())
    missing = {"window", "bins", "intensity", "intensity_null95"} - set(ref)
    if missing:
        raise ValueError(f"{path}: not a drift reference (missing {sorted(missing)})")
    return ref


def intensity_histogram(images: np.ndarray, bins: int = 32) -> np.ndarray:
    """Per-image normalised histograms of uint8 images ``[N, ...]`` -> ``[N, bins]``."""
    images = np.asarray(images).reshape(len(images), -1)
    idx = np.minimum(images.astype(np.int64) * bins // 256, bins - 1)
    out = np.zeros((len(images), bins))
    for i, row in enumerate(idx):
        out[i] = np.bincount(row, minlength=bins)
    return out / out.sum(1, keepdims=True)


def psi(reference: np.ndarray, observed: np.ndarray) -> float:
    """Population-stability index of two normalised histograms."""
    p, q = np.clip(np.asarray(reference, float), EPS, None), np.clip(np.asarray(observed, float), EPS, None)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2)."""
    s1 = _sqrtm_psd(cov1)
    cross = _sqrtm_psd(s1 @ cov2 @ s1)  # tr sqrt(C1 C2) = tr sqrt(C1^1/2 C2 C1^1/2), symmetric and PSD
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(cross))


def _gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the rows of ``x`` (a zero covariance for a single row)."""
    x = np.asarray(x, float)
    d = x.shape[1]
    cov = np.cov(x, rowvar=False).reshape(d, d) if len(x) > 1 else np.zeros((d, d))
    return x.mean(0), cov


def build_reference(train_hists: np.ndarray, train_embeddings: np.ndarray | None, val_hists: np.ndarray,
                    val_embeddings: np.ndarray | None, *, window: int = 200, k: int = 16, null_windows: int = 50,
                    seed: int = 0) -> dict:
    """Reference statistics (JSON-serialisable) from the training split and null levels from held-out
    windows of ``window`` validation inputs (drawn with replacement when the split is smaller)."""
    rng = np.random.default_rng(seed)
    ref = {"window": int(window), "bins": int(train_hists.shape[1]),
           "intensity": train_hists.mean(0).tolist()}
    picks = [rng.choice(len(val_hists), size=window, replace=len(val_hists) < window) for _ in range(null_windows)]
    ref["intensity_null95"] = float(np.percentile([psi(ref["intensity"], val_hists[i].mean(0)) for i in picks], 95))
    if train_embeddings is not None and val_embeddings is not None:
        mean = train_embeddings.mean(0)
        _, _, vt = np.linalg.svd(train_embeddings - mean, full_matrices=False)
        basis = vt[:min(k, vt.shape[0])]
        mu, cov = _gaussian((train_embeddings - mean) @ basis.T)
        val_proj = (val_embeddings - mean) @ basis.T
        nulls = [frechet(mu, cov, *_gaussian(val_proj[i])) for i in picks]
        ref.update(embedding={"mean": mean.tolist(), "basis": basis.tolist(), "mu": mu.tolist(), "cov": cov.tolist()},
                   embedding_null95=float(np.percentile(nulls, 95)))
    return ref


class DriftMonitor:
    """Rolling statistics of the inputs a server receives, scored against a reference (thread-safe)."""

    def __init__(self, reference: dict, threshold: float, *, check_every: int = 0, name: str = "serve"):
        self.ref, self.threshold = reference, float(threshold)
        self.window = int(reference["window"])
        self._hists: collections.deque = collections.deque(maxlen=self.window)
        self._embeddings: collections.deque = collections.deque(maxlen=self.window)
        emb = reference.get("embedding")
        self._emb = None if emb is None else {k: np.asarray(v) for k, v in emb.items()}
        self._lock = threading.Lock()
        self.seen = self.embedded = 0
        self.check_every, self.name = int(check_every), name
        self.last: dict | None = None  # the latest periodic score (check_every > 0)

    @property
    def has_embeddings(self) -> bool:
        return self._emb is not None

    def observe(self, image: np.ndarray | None = None, embedding: np.ndarray | None = None, *,
                histogram: np.ndarray | None = None) -> None:
        """One input: its uint8 pixels at the model's size (or their ``histogram``), and/or the cloud
        model's embedding of it. Every ``check_every`` inputs the score is recomputed (``last``) and a
        change of the verdict is logged (a warning when drift is declared)."""
        if image is not None:
            histogram = intensity_histogram(np.asarray(image)[None], self.ref["bins"])[0]
        with self._lock:
            if histogram is not None:
                self.seen += 1
                self._hists.append(np.asarray(histogram, float))
            if embedding is not None and self._emb is not None:
                self.embedded += 1
                self._embeddings.append((np.asarray(embedding, float) - self._emb["mean"]) @ self._emb["basis"].T)
            due = self.check_every > 0 and histogram is not None and self.seen % self.check_every == 0
        if due:
            self.check()

    def check(self) -> dict:
        """Score now, remember it as ``last`` and log when the verdict changes."""
        before = bool(self.last and self.last["drifted"])
        s = self.last = self.score()
        if s["drifted"] and not before:
            log.warning("%s: input drift: score %.2f > threshold %.2f over the last %d inputs (intensity %s, "
                        "embedding %s); see GET /drift", self.name, s["score"], self.threshold, self.window,
                        _fmt(s["intensity"]), _fmt(s["embedding"]))
        elif before and not s["drifted"]:
            log.info("%s: input drift cleared: score %.2f <= %.2f", self.name, s["score"] or 0.0, self.threshold)
        return s

    def score(self) -> dict:
        with self._lock:
            hists, embs = list(self._hists), list(self._embeddings)
        out = {"enabled": True, "window": self.window, "inputs_seen": self.seen, "embedded": self.embedded,
               "threshold": self.threshold,
               "intensity": None, "embedding": None}
        if hists:
            value = psi(self.ref["intensity"], np.mean(hists, 0))
            out["intensity"] = {"psi": value, "score": value / max(self.ref["intensity_null95"], EPS),
                                "inputs": len(hists)}
        if len(embs) > 1:
            value = frechet(self._emb["mu"], self._emb["cov"], *_gaussian(np.stack(embs)))
            out["embedding"] = {"frechet": value, "score": value / max(self.ref["embedding_null95"], EPS),
                                "inputs": len(embs)}
        # A statistic counts once its window is full (the null level is for full windows; a few inputs
        # say little): the score is the highest full one's, None while none is full.
        for part in (out["intensity"], out["embedding"]):
            if part is not None:
                part["full"] = part["inputs"] >= self.window
        scores = [s["score"] for s in (out["intensity"], out["embedding"]) if s is not None and s["full"]]
        out["score"] = max(scores) if scores else None
        out["drifted"] = bool(out["score"] is not None and out["score"] > self.threshold)
        return out


def _fmt(part: dict | None) -> str:
    return "n/a" if part is None else f"{part['score']:.2f}"
