"""Class rebalancing of the training split with imbalanced-learn, and loss class weights.

Samplers work on row indices: imbalanced-learn decides *which* rows to repeat or drop
(``sample_indices_``) and the image bytes follow, so no pixel matrix is materialised.
GAN oversampling (a later stage) plugs in as another strategy that *adds* rows with
``source="gan"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from sklearn.utils.class_weight import compute_class_weight

SAMPLERS = ("none", "random_over", "random_under")
CLASS_WEIGHTS = ("none", "balanced", "sqrt")


@dataclass(frozen=True)
class RebalanceResult:
    frame: pd.DataFrame
    counts_before: dict[int, int]
    counts_after: dict[int, int]
    class_weights: list[float] | None


def sampling_strategy(counts: dict[int, int], sampler: str, target_ratio: float) -> dict[int, int]:
    """Per-class target counts.

    random_over: every class raised to at least ``target_ratio`` x the majority count.
    random_under: every class lowered to at most minority count / ``target_ratio``.
    """
    if not 0 < target_ratio <= 1:
        raise ValueError(f"rebalance.target_ratio must be in (0, 1], got {target_ratio}")
    if sampler == "random_over":
        goal = int(np.ceil(max(counts.values()) * target_ratio))
        return {c: max(n, goal) for c, n in counts.items()}
    goal = int(np.floor(min(counts.values()) / target_ratio))
    return {c: min(n, goal) for c, n in counts.items()}


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> list[float] | None:
    """Loss weights per class: ``balanced`` (n / (k * n_c)), ``sqrt`` (its square root) or None."""
    if mode == "none":
        return None
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"rebalance.class_weight must be one of {CLASS_WEIGHTS}, got {mode!r}")
    present = np.unique(labels)
    w = np.ones(num_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    if mode == "sqrt":
        w = np.sqrt(w)
    return [float(x) for x in w / w[present].mean()]


def rebalance_frame(frame: pd.DataFrame, num_classes: int, sampler: str = "none", target_ratio: float = 1.0,
                    class_weight: str = "none", seed: int = 42) -> RebalanceResult:
    """Resample the rows of a *training* frame; raises if any other split is present."""
    if sampler not in SAMPLERS:
        raise ValueError(f"rebalance.sampler must be one of {SAMPLERS}, got {sampler!r}")
    if "split" in frame and set(frame["split"].unique()) - {"train"}:
        raise ValueError("only the training split may be resampled; got splits "
                         f"{sorted(frame['split'].unique())}")
    labels = frame["label"].to_numpy()
    before = {int(k): int(v) for k, v in sorted(pd.Series(labels).value_counts().items())}
    if sampler == "none":
        out = frame.reset_index(drop=True)
    else:
        cls = RandomOverSampler if sampler == "random_over" else RandomUnderSampler
        s = cls(sampling_strategy=sampling_strategy(before, sampler, target_ratio), random_state=seed)
        s.fit_resample(np.arange(len(frame)).reshape(-1, 1), labels)
        out = frame.iloc[np.sort(s.sample_indices_)].reset_index(drop=True)
    after = {int(k): int(v) for k, v in sorted(out["label"].value_counts().items())}
    weights = class_weights(out["label"].to_numpy(), num_classes, class_weight)
    return RebalanceResult(out, before, after, weights)
