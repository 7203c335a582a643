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
"""
from __future__ import annotations

import collections
import threading

import numpy as np

EPS = 1e-4


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

    def __init__(self, reference: dict, threshold: float = 3.0):
        self.ref, self.threshold = reference, float(threshold)
        self.window = int(reference["window"])
        self._hists: collections.deque = collections.deque(maxlen=self.window)
        self._embeddings: collections.deque = collections.deque(maxlen=self.window)
        emb = reference.get("embedding")
        self._emb = None if emb is None else {k: np.asarray(v) for k, v in emb.items()}
        self._lock = threading.Lock()
        self.seen = 0

    def observe(self, image: np.ndarray | None = None, embedding: np.ndarray | None = None) -> None:
        """One input: its uint8 pixels at the model's size, and/or the cloud model's embedding of it."""
        with self._lock:
            self.seen += 1
            if image is not None:
                self._hists.append(intensity_histogram(np.asarray(image)[None], self.ref["bins"])[0])
            if embedding is not None and self._emb is not None:
                self._embeddings.append((np.asarray(embedding, float) - self._emb["mean"]) @ self._emb["basis"].T)

    def score(self) -> dict:
        with self._lock:
            hists, embs = list(self._hists), list(self._embeddings)
        out = {"window": self.window, "inputs_seen": self.seen, "threshold": self.threshold,
               "intensity": None, "embedding": None}
        if hists:
            value = psi(self.ref["intensity"], np.mean(hists, 0))
            out["intensity"] = {"psi": value, "score": value / max(self.ref["intensity_null95"], EPS),
                                "inputs": len(hists)}
        if len(embs) > 1:
            value = frechet(self._emb["mu"], self._emb["cov"], *_gaussian(np.stack(embs)))
            out["embedding"] = {"frechet": value, "score": value / max(self.ref["embedding_null95"], EPS),
                                "inputs": len(embs)}
        scores = [s["score"] for s in (out["intensity"], out["embedding"]) if s is not None]
        out["score"] = max(scores) if scores else None
        # a window that is not full yet says little: drift is only declared on a full one
        full = max(len(hists), len(embs)) >= self.window
        out["drifted"] = bool(full and out["score"] is not None and out["score"] > self.threshold)
        return out
