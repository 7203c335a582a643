"""Classification metrics (scikit-learn) for the evaluate stage and per-epoch validation."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             matthews_corrcoef, precision_recall_fscore_support, roc_auc_score)


def summary_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 from a confusion matrix (rows = true).

    Used where only the summed confusion matrix of several workers is at hand; classes
    absent from the truth are left out of the balanced accuracy, as scikit-learn does.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    total = cm.sum()
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    labels = present | (predicted > 0)
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[labels].mean()) if labels.any() else 0.0,
    }


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Everything the evaluate stage reports for one model on one split."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(class_names)
    y_pred = proba.argmax(1)
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
        "num_samples": int(len(y_true)),
        "majority_rate": float(np.bincount(y_true, minlength=k).max() / max(1, len(y_true))),
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, name in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    present = np.unique(y_true)
    if len(present) == k and k > 1:
        probs = proba / proba.sum(1, keepdims=True)
        out["roc_auc_ovr"] = float(roc_auc_score(y_true, probs[:, 1]) if k == 2 else
                                   roc_auc_score(y_true, probs, multi_class="ovr", labels=labels))
    else:
        out["roc_auc_ovr"] = None  # undefined when a class is missing from the truth
    return out


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, *, n_resamples: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals (scipy.stats.bootstrap, test images resampled with their
    predictions) of accuracy, balanced accuracy and macro-F1: how much of a difference between two
    models the test split can tell apart."""
    from scipy.stats import bootstrap

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) < 2:
        return {}
    k = int(num_classes)

    def stat(name):
        def f(t, p):
            cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
            return summary_from_confusion(cm)[name]
        return f

    out = {}
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        res = bootstrap((y_true, y_pred), stat(name), paired=True, vectorized=False, n_resamples=n_resamples,
                        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
        out[name] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return out
