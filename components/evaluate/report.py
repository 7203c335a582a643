"""Evaluation of model files on a split: metrics, DVC plot data, and pictures for people."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch



@torch.no_grad()
def predict_dataset(model: torch.nn.Module, batches, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities over an iterable of {"image", "label"} torch batches;
    ``tta``: averaged over test-time views (:mod:`components.evaluate.tta`)."""
    from components.evaluate.tta import tta_proba

    model.eval()
    ys, ps = [], []

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(x.contiguous(memory_format=torch.channels_last)).float(), 1)

    for b in batches:
        ps.append(tta_proba(predict, b["image"], tta).numpy())
        ys.append(b["label"].numpy())
    if not ys:
        raise ValueError("the evaluation split is empty")
    return np.concatenate(ys), np.concatenate(ps)


def confusion_rows(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One row per sample (actual, predicted): the input DVC's confusion template expects."""
    return pd.DataFrame({"actual": [class_names[i] for i in y_true], "predicted": [class_names[i] for i in y_pred]})


def confusion_png(cm: list[list[int]], class_names: list[str], title: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2.5, 1.2 * len(class_names) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_html_report(path: str | Path, results: dict[str, dict], pictures: dict[str, str]) -> Path:
    """A small self-contained HTML page: the headline metrics per model and the confusion matrices."""
    rows = "".join(
        f"<tr><td>{name}</td>" + "".join(f"<td>{m[k]:.3f}</td>" for k in ("accuracy", "balanced_accuracy", "macro_f1", "mcc"))
        + f"<td>{m['roc_auc_ovr'] if m['roc_auc_ovr'] is None else round(m['roc_auc_ovr'], 3)}</td><td>{m['majority_rate']:.3f}</td></tr>"
        for name, m in results.items())
    imgs = "".join(f'<figure><img src="{src}" alt="{name}"><figcaption>{name}</figcaption></figure>' for name, src in pictures.items())
    html = (f"<!doctype html><meta charset=utf-8><title>resops evaluation</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}"
            f"figure{{display:inline-block;margin:1em}}</style><h1>Evaluation on the test split</h1>"
            f"<table><tr><th>model</th><th>accuracy</th><th>balanced acc.</th><th>macro-F1</th><th>MCC</th>"
            f"<th>ROC-AUC (OvR)</th><th>majority rate</th></tr>{rows}</table>{imgs}"
            f"<h2>Per-class</h2><pre>{json.dumps({n: m['per_class'] for n, m in results.items()}, indent=1)}</pre>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path

