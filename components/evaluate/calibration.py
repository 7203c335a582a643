"""Confidence calibration and the escalation threshold of the cloud-edge cascade.

The edge model answers every request; when its confidence (the largest softmax
probability) is below a threshold, the request escalates to the cloud model. Both the
temperatures and the threshold are fitted on the validation split, with numpy/scipy only
so the Serve replicas can import this module without pulling in torch.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

T_MIN, T_MAX = 0.05, 20.0
TARGETS = ("accuracy_drop", "accuracy", "escalation_rate")
# Accuracies are ratios of counts; this absorbs the rounding of e.g. 0.9 - 0.01.
_EPS = 1e-12


# ----------------------------------------------------------------------------- validation


def _check_logits(logits, name: str = "logits") -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_classes), got shape {z.shape}")
    if z.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if z.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return z


def _check_labels(labels, n: int, k: int | None = None, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"shape mismatch: {name} has {y.shape[0]} entries but there are {n} samples")
    if n == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if y.dtype.kind not in "iu":
        yf = y.astype(np.float64)
        if y.dtype.kind not in "f" or not np.all(np.isfinite(yf)) or np.any(yf != np.round(yf)):
            raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
        y = yf.astype(np.int64)
    y = y.astype(np.int64)
    if k is not None and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"{name} out of range: values must lie in [0, {k - 1}], "
                         f"got min {int(y.min())} and max {int(y.max())}")
    return y


def _check_probs(probs) -> np.ndarray:
    p = _check_logits(probs, "probs")
    if p.min() < 0 or p.max() > 1:
        raise ValueError("probs must lie in [0, 1]")
    return p


# ----------------------------------------------------------------------------- calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64.

    The row maximum is subtracted first so large logits cannot overflow ``exp``.
    """
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    z = np.asarray(logits, dtype=np.float64) / t
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _mean_nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(z / T), via log-sum-exp (no log(0))."""
    s = z / temperature
    return float(np.mean(logsumexp(s, axis=1) - s[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the mean NLL of softmax(logits / T).

    One scalar keeps the argmax, hence the accuracy, unchanged and cannot overfit the
    validation split. The search runs over log T, bounded to [0.05, 20], because T is a
    scale: the NLL is unimodal in log T, so a bounded Brent search finds its minimum.
    """
    z = _check_logits(logits)
    y = _check_labels(labels, z.shape[0], z.shape[1])
    res = minimize_scalar(lambda log_t: _mean_nll(z, y, float(np.exp(log_t))),
                          bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-5})
    return float(np.clip(np.exp(res.x), T_MIN, T_MAX))


def _bin_stats(probs, labels, n_bins: int):
    """Per equal-width bin on (0, 1]: count, accuracy and mean confidence (max probability)."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    p = _check_probs(probs)
    y = _check_labels(labels, p.shape[0], p.shape[1])
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Bin b holds (b/n, (b+1)/n]: ceil maps a confidence of exactly 1.0 into the top bin.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    return n_bins, count, acc_sum, conf_sum


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width confidence bins on (0, 1]."""
    _, count, acc_sum, conf_sum = _bin_stats(probs, labels, n_bins)
    # (n_b / N) |acc_b - conf_b| = |sum correct - sum conf| / N within each bin.
    return float(np.abs(acc_sum - conf_sum).sum() / count.sum())


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict]:
    """The non-empty bins of a reliability diagram: lower, upper, count, accuracy, confidence."""
    n_bins, count, acc_sum, conf_sum = _bin_stats(probs, labels, n_bins)
    return [{"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": int(count[b]),
             "accuracy": float(acc_sum[b] / count[b]), "confidence": float(conf_sum[b] / count[b])}
            for b in range(n_bins) if count[b] > 0]


# ----------------------------------------------------------------------------- threshold


def _check_confidence(confidence) -> np.ndarray:
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.ndim != 1:
        raise ValueError(f"confidence must be 1-D, got shape {conf.shape}")
    if conf.shape[0] == 0:
        raise ValueError("confidence is empty: need at least one sample")
    if not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1:
        raise ValueError("confidence must be finite and lie in [0, 1]")
    return conf


def _bootstrap_bound(conf: np.ndarray, cands: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray, *,
                     paired: bool, confidence_level: float, n_boot: int, seed: int) -> np.ndarray:
    """Per candidate threshold, the one-sided ``confidence_level`` bootstrap bound (``n_boot``
    resamples of the samples) of the cascade accuracy, or with ``paired`` of the cascade-minus-cloud
    accuracy difference."""
    if not 0.5 <= float(confidence_level) < 1.0:
        raise ValueError(f"confidence_level must lie in [0.5, 1), got {confidence_level!r}")
    n = conf.shape[0]
    # Per sample and candidate: correct in the cascade (or cascade minus cloud, paired).
    answered_at_edge = conf[:, None] >= cands[None, :]
    per = np.where(answered_at_edge, edge_ok[:, None], cloud_ok[:, None]).astype(np.float64)
    if paired:
        per = per - cloud_ok[:, None]
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n
    return np.quantile(weights @ per, 1.0 - float(confidence_level), axis=0)


def choose_threshold(confidence: np.ndarray, edge_pred: np.ndarray, cloud_pred: np.ndarray, labels: np.ndarray,
                     *, target: str, value: float, confidence_level: float | None = None, n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """The escalation threshold (escalate iff confidence < threshold) meeting ``target``.

    Candidates are 0.0 (never escalate), the midpoints between consecutive distinct
    observed confidences, and 1.0: any threshold between two observed values gives the
    same validation outcome, and the midpoint generalises better than a threshold lying
    exactly on an observed confidence, which new data would straddle.

    targets: ``"accuracy_drop"`` (fewest escalations with cascade accuracy >= cloud
    accuracy - value), ``"accuracy"`` (fewest escalations with cascade accuracy >= value)
    and ``"escalation_rate"`` (best cascade accuracy with escalation rate <= value). Ties
    go to the lower escalation rate. When an accuracy goal cannot be met, the most
    accurate candidate is returned with ``reached`` False.

    ``confidence_level`` (e.g. 0.9) makes an accuracy goal hold with that probability under
    resampling of the validation split instead of on its point estimate: a few hundred
    validation images leave the cascade's accuracy uncertain by about a point, so a threshold that
    only just meets the goal there misses it on new data about half the time. The goal is then
    checked on the one-sided bootstrap bound (``n_boot`` paired resamples): of the cascade-minus-
    cloud accuracy difference for ``accuracy_drop``, of the cascade accuracy for ``accuracy``.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: allowed targets are {', '.join(TARGETS)}")
    v = float(value)
    if not np.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"value for target {target!r} must lie in [0, 1], got {value!r}")
    conf = _check_confidence(confidence)
    n = conf.shape[0]
    y = _check_labels(labels, n)
    edge_ok = _check_labels(edge_pred, n, name="edge_pred") == y
    cloud_ok = _check_labels(cloud_pred, n, name="cloud_pred") == y

    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]
    uniq = np.unique(sorted_conf)
    cands = np.unique(np.concatenate([[0.0], (uniq[:-1] + uniq[1:]) / 2, [1.0]]))
    # Samples with conf < t are a prefix of the sorted order, so cumulative sums give
    # every candidate's outcome at once.
    k = np.searchsorted(sorted_conf, cands, side="left")
    cum_cloud = np.concatenate([[0], np.cumsum(cloud_ok[order])])
    cum_edge = np.concatenate([[0], np.cumsum(edge_ok[order])])
    esc = k / n
    acc = (cum_cloud[k] + edge_ok.sum() - cum_edge[k]) / n
    edge_acc, cloud_acc = float(edge_ok.mean()), float(cloud_ok.mean())

    def most_accurate(mask: np.ndarray) -> int:
        """Highest accuracy within mask; np.argmax takes the first, i.e. lowest escalation."""
        return int(np.argmax(np.where(mask, acc, -np.inf)))

    if target == "escalation_rate":
        feasible = esc <= v + _EPS
        i = most_accurate(feasible)  # threshold 0.0 (no escalation) is always feasible
        reached = True
    else:
        need = cloud_acc - v if target == "accuracy_drop" else v
        score = acc
        if confidence_level is not None:
            score = _bootstrap_bound(conf, cands, edge_ok, cloud_ok, paired=target == "accuracy_drop",
                                     confidence_level=confidence_level, n_boot=n_boot, seed=seed)
            if target == "accuracy_drop":
                need = -v
        feasible = score >= need - _EPS
        reached = bool(feasible.any())
        # Candidates ascend in threshold, so escalation rate is non-decreasing: first feasible wins.
        i = int(np.argmax(feasible)) if reached else most_accurate(np.ones_like(feasible))
    return {"threshold": float(cands[i]), "target": target, "value": v, "reached": reached,
            "escalation_rate": float(esc[i]), "cascade_accuracy": float(acc[i]),
            "edge_accuracy": edge_acc, "cloud_accuracy": cloud_acc, "n": int(n),
            "confidence_level": None if confidence_level is None or target == "escalation_rate"
            else float(confidence_level)}


def _tier_report(z: np.ndarray, y: np.ndarray, temperature: float, n_bins: int) -> dict:
    return {"temperature": float(temperature),
            "ece_before": expected_calibration_error(softmax(z), y, n_bins),
            "ece_after": expected_calibration_error(softmax(z, temperature), y, n_bins),
            "nll_before": _mean_nll(z, y, 1.0),
            "nll_after": _mean_nll(z, y, temperature),
            "accuracy": float(np.mean(z.argmax(axis=1) == y))}


def calibrate_cascade(edge_logits: np.ndarray, cloud_logits: np.ndarray, labels: np.ndarray, *,
                      target: str = "accuracy_drop", value: float = 0.01, temperature_scaling: bool = True,
                      n_bins: int = 15, confidence_level: float | None = None) -> dict:
    """Fit both tiers' temperatures on validation logits, then the edge escalation threshold.

    The threshold is chosen on the calibrated edge confidence: raw ResNet softmax is
    over-confident, so a threshold on it escalates too little, and it would not mean the
    same thing after the edge model is retrained. Returns plain Python types (JSON-ready).
    """
    ze = _check_logits(edge_logits, "edge_logits")
    zc = _check_logits(cloud_logits, "cloud_logits")
    if ze.shape[0] != zc.shape[0]:
        raise ValueError(f"shape mismatch: edge_logits has {ze.shape[0]} samples, cloud_logits {zc.shape[0]}")
    y = _check_labels(labels, ze.shape[0], min(ze.shape[1], zc.shape[1]))
    t_edge = fit_temperature(ze, y) if temperature_scaling else 1.0
    t_cloud = fit_temperature(zc, y) if temperature_scaling else 1.0
    edge_conf = softmax(ze, t_edge).max(axis=1)
    threshold = choose_threshold(edge_conf, ze.argmax(axis=1), zc.argmax(axis=1), y, target=target, value=value,
                                 confidence_level=confidence_level)
    return {"edge": _tier_report(ze, y, t_edge, n_bins), "cloud": _tier_report(zc, y, t_cloud, n_bins),
            "threshold": threshold, "n_bins": int(n_bins)}
