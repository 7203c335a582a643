"""Decision thresholds tuned on the validation split: a per-class bias added to the logits.

``argmax(logits + b)`` with ``b`` chosen to maximise a validation metric (balanced accuracy or
macro-F1) is post-hoc logit adjustment: the trained model stays, the decision moves towards the
rare classes as far as the validation split says it pays. The bias is folded into the model's last
layer (:func:`apply_class_bias`), so evaluation, ONNX export, pruning and the Serve app all use it
without knowing it exists.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from components.models.heads import OrdinalHead

DECISION_METRICS = ("none", "balanced_accuracy", "macro_f1")


def _score(metric: str, y: np.ndarray, pred: np.ndarray, k: int) -> float:
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(y, pred))
    return float(f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0))


def fit_class_bias(log_probs: np.ndarray, y: np.ndarray, metric: str = "macro_f1", *, span: float = 3.0,
                   step: float = 0.1, rounds: int = 3) -> tuple[np.ndarray, dict]:
    """Coordinate ascent over one bias per class (class 0's stays 0: only differences matter).

    Returns the bias and a report with the metric before and after. Ties keep the smaller |bias|, so
    a bias that does not help stays at zero.
    """
    if metric not in DECISION_METRICS[1:]:
        raise ValueError(f"train.decision_bias must be one of {DECISION_METRICS}, got {metric!r}")
    log_probs, y = np.asarray(log_probs, dtype=np.float64), np.asarray(y)
    k = log_probs.shape[1]
    bias = np.zeros(k)
    grid = np.round(np.arange(-span, span + step / 2, step), 6)
    grid = grid[np.argsort(np.abs(grid), kind="stable")]  # try small biases first: ties keep them
    before = best = _score(metric, y, log_probs.argmax(1), k)
    for _ in range(rounds):
        changed = False
        for c in range(1, k):
            for value in grid:
                trial = bias.copy()
                trial[c] = value
                s = _score(metric, y, (log_probs + trial).argmax(1), k)
                if s > best + 1e-12:
                    best, bias, changed = s, trial, True
        if not changed:
            break
    return bias, {"metric": metric, "validation_before": before, "validation_after": best,
                  "bias": [float(b) for b in bias], "validation_images": int(len(y))}


@torch.no_grad()
def apply_class_bias(model: torch.nn.Module, bias) -> None:
    """Add ``bias`` to the model's logits, in its weights: the ``fc`` bias of a softmax head, the
    output bias of an ordinal head."""
    fc = getattr(model, "module", model).fc
    b = torch.as_tensor(np.asarray(bias, dtype=np.float32))
    if isinstance(fc, OrdinalHead):
        fc.class_bias += b.to(fc.class_bias)
    elif isinstance(fc, torch.nn.Linear) and fc.bias is not None:
        fc.bias += b.to(fc.bias)
    else:
        raise ValueError(f"cannot fold a class bias into {type(fc).__name__}")


def tune_model_file(model_path, batches, metric: str) -> dict:
    """Fit the class bias of a model file on validation ``batches`` (``{"image", "label"}``), fold it in
    and save the file again, its metadata recording what was done; returns the report."""
    from components.evaluate.report import predict_dataset
    from components.models.checkpoint import load_model, save_model

    model, meta = load_model(model_path)
    y, proba = predict_dataset(model.to(memory_format=torch.channels_last), batches)
    bias, report = fit_class_bias(np.log(np.clip(proba, 1e-12, None)), y, metric)
    apply_class_bias(model, bias)
    save_model(model_path, model, dict(meta, decision_bias=report))
    return report
