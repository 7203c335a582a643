"""Offline quality check of generated images, with no downloaded (Inception) weights.

1. A small CNN (:class:`TinyCNN`: three conv blocks, global average pooling to ``feature_dim``
   features, a linear head) is trained for a few epochs on the *real* training images at
   ``image_size`` (32 by default; seconds on a CPU). A stratified ``holdout`` share of the real
   rows is kept out of its training to calibrate the numbers below.
2. **Frechet distance** (FID-style) between real and generated images in that classifier's
   penultimate (pooled) feature space: ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 sqrtm(S_r S_g))``.
   ``fd_real_holdout`` - the distance between the classifier's training rows and the held-out
   real rows - is the scale of "as good as real"; a generator scores well when ``fd`` is near it.
   Numerics: a non-finite ``sqrtm`` is retried with ``eps * I`` added to both covariances, a
   complex result keeps its real part (the largest imaginary part is reported), the distance is
   clipped at 0. Few samples (n < feature_dim) make the covariances singular: distances stay
   comparable between runs with the same sample sizes, not across sizes.
3. **Per-class accuracy on generated images** - the fraction of generated class-k images the
   classifier labels k ("does class k look like class k"), next to the same number on held-out
   real images (``real_holdout_class_accuracy``), the ceiling to expect.
4. **What the evidence says, per class** (``class_evidence``): a class whose held-out *real* images
   the classifier recognises no better than chance (1 / classes) is ``"not measurable"``: the check
   cannot see that class at all, so a low score on its generated images says nothing about the
   generator. Otherwise ``"recognised"`` when the generated images score at least half the real
   ones, else ``"not recognised"`` (the generator does not draw that class). The thresholds of
   :func:`check_quality` apply to measurable classes only.

:func:`check_quality` turns a report and thresholds into accept / :class:`GeneratorRejected`.
"""
from __future__ import annotations

import json
import math
import warnings
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from components.data.images import DEFAULT_MAX_PIXELS, decode_image


class GeneratorRejected(ValueError):
    """Generated images failed a quality threshold; the message lists every failure."""


class TinyCNN(nn.Module):
    """in_chans x S x S -> ``feature_dim`` pooled features -> class logits (conv-BatchNorm-ReLU blocks)."""

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 32, feature_dim: int = 64):
        super().__init__()

        def block(a: int, b: int, pool: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.body = nn.Sequential(*block(in_chans, width, True), *block(width, 2 * width, True),
                                  *block(2 * width, feature_dim, False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def images_to_tensor(images, image_size: int = 32, in_chans: int = 1,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded images -> float32 (n, C, S, S) in [-1, 1] (area resize)."""
    import cv2

    out = np.empty((len(images), in_chans, image_size, image_size), dtype=np.float32)
    for i, data in enumerate(images):
        img = decode_image(data, in_chans, max_pixels)
        if img.shape[:2] != (image_size, image_size):
            img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA).reshape(
                image_size, image_size, in_chans)
        out[i] = img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(out)


def train_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int = 8, batch_size: int = 32,
                     lr: float = 3e-3, seed: int = 0, feature_dim: int = 64, width: int = 32) -> tuple[TinyCNN, float]:
    """Train :class:`TinyCNN` (AdamW, random horizontal/vertical flips); returns (model, last-epoch accuracy)."""
    torch.manual_seed(seed)
    model = TinyCNN(num_classes, x.shape[1], width, feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    acc = 0.0
    for _ in range(int(epochs)):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        correct = 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            if torch.rand(1, generator=gen).item() < 0.5:
                xb = xb.flip(3)
            if torch.rand(1, generator=gen).item() < 0.5:
                xb = xb.flip(2)
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == yb).sum())
        acc = correct / max(1, len(x))
    recalibrate_batchnorm(model, x, batch_size)
    return model.eval(), acc


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Set BatchNorm running statistics to the exact averages over ``x``.

    After a few dozen steps the momentum-averaged statistics still lag the batch statistics the
    weights were trained with, and eval-mode predictions can collapse to one class.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()


@torch.no_grad()
def _features_and_predictions(model: TinyCNN, x: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f.double().numpy())
        preds.append(model.head(f).argmax(1).numpy())
    if not feats:
        return np.zeros((0, model.head.in_features)), np.zeros(0, dtype=np.int64)
    return np.concatenate(feats), np.concatenate(preds)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> tuple[float, float]:
    """Frechet distance between Gaussians fitted to feature rows ``a`` and ``b``.

    Returns (distance, largest imaginary part of the matrix square root that was dropped).
    NaN when either side has fewer than two rows.
    """
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        return float("nan"), 0.0
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    imag = 0.0
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(covmean.imag)))
        covmean = covmean.real
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0), imag


def _holdout_split(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out rows: ``share`` of every class with >= 2 rows (at least one)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    if share <= 0:
        return mask
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 2:
            n = min(len(idx) - 1, max(1, int(round(share * len(idx)))))
            mask[rng.choice(idx, size=n, replace=False)] = True
    return mask


def _real_rows(frame: pd.DataFrame) -> pd.DataFrame:
    keep = np.ones(len(frame), dtype=bool)
    if "split" in frame:
        keep &= (frame["split"] == "train").to_numpy()
    if "source" in frame:
        keep &= ~frame["source"].isin(["smote", "gan"]).to_numpy()
    return frame[keep].reset_index(drop=True)


def _version_of(frame: pd.DataFrame) -> str | None:
    if "generator_version" in frame and frame["generator_version"].notna().any():
        return str(frame["generator_version"].dropna().iloc[0])
    if "attrs" in frame and len(frame):
        try:
            return json.loads(frame["attrs"].iloc[0]).get("generator_version")
        except (TypeError, ValueError, AttributeError):
            return None
    return None


def quality_report(real_frame: pd.DataFrame, generated_frame: pd.DataFrame, *, num_classes: int | None = None,
                   image_size: int, in_chans: int, epochs: int, batch_size: int = 32, lr: float = 3e-3,
                   feature_dim: int = 64, width: int = 32, holdout: float = 0.2, seed: int = 0, threads: int | None = 1,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Score ``generated_frame`` (image, label) against the real training rows of ``real_frame``.

    ``image_size`` and ``epochs`` are params.yaml's ``gan.quality`` (no defaults here); the checker's
    other settings (batch, rate, width) are this function's own. Real rows: split "train" (when the
    column exists) and not synthetic. Returns a JSON-ready
    dict: ``fd``, ``fd_per_class``, ``fd_real_holdout``, ``class_accuracy`` (classifier accuracy on
    generated class k), ``accuracy``, ``real_holdout_class_accuracy``, ``counts``, ``classifier``
    (settings and accuracies), ``fd_imaginary`` and ``generator_version`` (when the rows carry it).
    Class keys are strings (JSON object keys).
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        real = _real_rows(real_frame)
        if len(real) < 4:
            raise ValueError(f"the quality check needs real training rows; got {len(real)}")
        y_all = real["label"].to_numpy().astype(np.int64)
        k = int(num_classes if num_classes is not None else max(y_all.max(), generated_frame["label"].max()) + 1)
        x_all = images_to_tensor(real["image"].to_numpy(), image_size, in_chans, max_pixels)
        held = _holdout_split(y_all, holdout, seed)
        model, train_acc = train_classifier(x_all[~held], torch.from_numpy(y_all[~held]), k, epochs=epochs,
                                            batch_size=batch_size, lr=lr, seed=seed, feature_dim=feature_dim,
                                            width=width)
        f_real, p_real = _features_and_predictions(model, x_all)
        y_gen = generated_frame["label"].to_numpy().astype(np.int64)
        x_gen = images_to_tensor(generated_frame["image"].to_numpy(), image_size, in_chans, max_pixels)
        f_gen, p_gen = _features_and_predictions(model, x_gen)

        fd, imag = frechet_distance(f_real, f_gen)
        fd_hold, imag_hold = frechet_distance(f_real[~held], f_real[held]) if held.any() else (float("nan"), 0.0)
        per_fd, acc, real_acc = {}, {}, {}
        for c in range(k):
            g, r = y_gen == c, y_all == c
            per_fd[str(c)] = frechet_distance(f_real[r], f_gen[g])[0] if g.sum() >= 2 and r.sum() >= 2 else None
            acc[str(c)] = float((p_gen[g] == c).mean()) if g.any() else None
            rh = r & held
            real_acc[str(c)] = float((p_real[rh] == c).mean()) if rh.any() else None

        def clean(v):
            return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)

        evidence = class_evidence(acc, real_acc, k)

        return {
            "fd": clean(fd), "fd_per_class": {c: clean(v) for c, v in per_fd.items()},
            "fd_real_holdout": clean(fd_hold), "fd_imaginary": max(imag, imag_hold),
            "class_accuracy": acc, "accuracy": float((p_gen == y_gen).mean()) if len(y_gen) else None,
            "real_holdout_class_accuracy": real_acc, "class_evidence": evidence,
            "real_holdout_accuracy": float((p_real[held] == y_all[held]).mean()) if held.any() else None,
            "counts": {"real": {str(c): int((y_all == c).sum()) for c in range(k)},
                       "generated": {str(c): int((y_gen == c).sum()) for c in range(k)}},
            "classifier": {"model": "TinyCNN", "image_size": image_size, "in_chans": in_chans, "epochs": epochs,
                           "feature_dim": feature_dim, "width": width, "holdout": holdout, "seed": seed,
                           "train_accuracy": float(train_acc)},
            "generator_version": _version_of(generated_frame),
        }
    finally:
        torch.set_num_threads(old_threads)


def class_evidence(generated: dict, real: dict, num_classes: int) -> dict:
    """Per class: ``"not measurable"`` (held-out real images recognised no better than chance, or none),
    ``"recognised"`` (generated images score >= half of the real ones), ``"not recognised"``, or
    ``"no generated images"``."""
    chance = 1.0 / max(2, num_classes)
    out = {}
    for c, g in generated.items():
        r = real.get(c)
        if r is None or r <= chance:
            out[c] = "not measurable"
        elif g is None:
            out[c] = "no generated images"
        else:
            out[c] = "recognised" if g >= 0.5 * r else "not recognised"
    return out


def _measurable(report: dict) -> set[str]:
    evidence = report.get("class_evidence")
    if evidence is None:  # a report written before class_evidence existed: every class counts
        return {str(c) for c in (report.get("class_accuracy") or {})}
    return {c for c, v in evidence.items() if v != "not measurable"}


def check_quality(report: dict, max_fd: float | None = None,
                  min_class_accuracy: float | Mapping[int | str, float] | None = None, *,
                  max_fd_ratio: float | None = None, min_relative_class_accuracy: float | None = None) -> dict:
    """Accept (return ``report``) or raise :class:`GeneratorRejected` naming every failed threshold.

    ``max_fd``: the largest acceptable ``report["fd"]`` (a missing/NaN distance fails).
    ``min_class_accuracy``: one floor for every class with generated images, or ``{class: floor}``
    (a class given a floor but without generated images fails).
    Relative forms, independent of the classifier's feature scale (better for ``params.yaml``):
    ``max_fd_ratio``: ``fd <= max_fd_ratio * fd_real_holdout``;
    ``min_relative_class_accuracy``: per class, accuracy on generated images
    ``>= min_relative_class_accuracy *`` accuracy on held-out real images of that class.
    The class thresholds skip classes the report calls ``"not measurable"`` (the classifier does not
    recognise their real images either): they cannot tell a good generator from a bad one there.
    """
    failures = []
    fd = report.get("fd")
    fd_ok = fd is not None and math.isfinite(fd)
    if max_fd is not None:
        if not fd_ok:
            failures.append("Frechet distance could not be computed")
        elif fd > max_fd:
            failures.append(f"Frechet distance {fd:.2f} > max_fd {max_fd:g} "
                            f"(real held-out vs real: {report.get('fd_real_holdout')})")
    if max_fd_ratio is not None:
        base = report.get("fd_real_holdout")
        if not fd_ok or base is None or not math.isfinite(base):
            failures.append("Frechet distance or its real held-out baseline could not be computed")
        elif fd > max_fd_ratio * base:
            failures.append(f"Frechet distance {fd:.2f} > {max_fd_ratio:g} x real held-out baseline {base:.2f}")
    measurable = _measurable(report)
    acc = {str(c): v for c, v in (report.get("class_accuracy") or {}).items() if str(c) in measurable}
    if min_class_accuracy is not None:
        if isinstance(min_class_accuracy, Mapping):
            floors = {str(c): float(v) for c, v in min_class_accuracy.items() if str(c) in measurable}
        else:
            floors = {c: float(min_class_accuracy) for c, v in acc.items() if v is not None}
        for c, floor in sorted(floors.items()):
            v = acc.get(c)
            if v is None:
                failures.append(f"class {c}: no generated images to check (needs accuracy >= {floor:g})")
            elif v < floor:
                failures.append(f"class {c}: the classifier recognises {v:.1%} of generated images < {floor:.1%}")
    if min_relative_class_accuracy is not None:
        real = {str(c): v for c, v in (report.get("real_holdout_class_accuracy") or {}).items()}
        for c, v in sorted(acc.items()):
            r = real.get(c)
            if v is None or r is None:
                continue
            if v < min_relative_class_accuracy * r:
                failures.append(f"class {c}: accuracy on generated images {v:.1%} < {min_relative_class_accuracy:g} x "
                                f"{r:.1%} on held-out real images")
    if failures:
        version = report.get("generator_version")
        raise GeneratorRejected(f"generator {version[:12] if version else '(unversioned)'} rejected: "
                                + "; ".join(failures))
    return report


__all__ = ["GeneratorRejected", "TinyCNN", "check_quality", "class_evidence", "frechet_distance", "images_to_tensor",
           "quality_report", "train_classifier"]
