"""Evaluation of model files on a split: metrics, DVC plot data, and pictures for people."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch



@torch.no_grad()
def predict_dataset(model, batches, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities over an iterable of {"image", "label"} torch batches; ``model``
    is a torch module or an ONNX model with ``predict_proba`` (``components.prune.OnnxClassifier``,
    float32 NCHW arrays in). ``tta``: averaged over test-time views (:mod:`components.evaluate.tta`)."""
    from components.evaluate.tta import tta_proba

    if isinstance(model, torch.nn.Module):
        model.eval()

        def predict(x: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return torch.softmax(model(x.contiguous(memory_format=torch.channels_last)).float(), 1).numpy()
    else:
        predict = model.predict_proba  # float32 NCHW tensors or arrays

    ys, ps = [], []
    for b in batches:
        ps.append(np.asarray(tta_proba(predict, b["image"], tta)))
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
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """A matplotlib figure laid out, written as a PNG at ``path`` (its directory made) and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CHARTS = [  # (points file, DVC template, x, y, title, x label, y label)
    ("roc_full.json", "series_diagonal", "fpr", "tpr", "ROC per class, full model (one-vs-rest)",
     "false positive rate", "true positive rate"),
    ("pr_full.json", "series", "recall", "precision", "Precision-recall per class, full model", "recall", "precision"),
    ("reliability.json", "series_diagonal", "confidence", "accuracy", "Reliability, raw and temperature-scaled",
     "mean confidence in the bin", "accuracy in the bin"),
    ("cascade.json", "series", "escalated", "accuracy", "Cascade: accuracy against escalation",
     "share escalated to the cloud", "cascade accuracy"),
]


def training_spec(history: pd.DataFrame) -> dict:
    """Loss and validation metrics per epoch (one line per column), as a Vega-Lite spec."""
    cols = [c for c in ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1")
            if c in history]
    rows = [{"series": c, "epoch": int(e), "value": float(v)} for c in cols
            for e, v in zip(history["epoch"], history[c]) if pd.notna(v)]
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": "Training curves",
            "width": 360, "height": 300, "data": {"values": rows},
            "mark": {"type": "line", "point": {"size": 18}, "tooltip": True},
            "encoding": {"x": {"field": "epoch", "type": "quantitative", "title": "epoch"},
                         "y": {"field": "value", "type": "quantitative", "title": "loss / metric"},
                         "color": {"field": "series", "type": "nominal", "title": None,
                                   "legend": {"orient": "bottom", "columns": 2}}}}


def write_report(out_dir: str | Path, *, evaluation: str | Path, plots_dir: str | Path, prepared_report: dict,
                 promoted: dict | None = None, calibration: dict | None = None, model_card: dict | None = None,
                 extra_pictures: dict[str, str | Path] | None = None, n_resamples: int = 1000,
                 model_name: str = "") -> Path:
    """The evaluation's one HTML page (``out_dir/index.html``, Jinja2, every value escaped): metrics with
    bootstrap intervals, per-class figures, the curves (the Vega-Lite specs of ``dvc plots``, rendered to
    SVG by vl-convert), the cascade, confusion matrices, Grad-CAM grids and ``extra_pictures`` (GAN
    samples, scalograms), and the model card. Every file it shows is copied into ``out_dir``: the
    directory is the report, readable offline."""
    import shutil
    import time

    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from components.evaluate.plots import LOAD_CHECK, fill, to_svg

    out, plots_dir = Path(out_dir), Path(plots_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ev = json.loads(Path(evaluation).read_text())
    models = [{"name": name, "m": m} for name, m in ev["models"].items()]
    charts = []
    history = plots_dir / "train_history.csv"
    if history.exists():
        (out / "training.svg").write_text(to_svg(training_spec(pd.read_csv(history))))
        charts.append({"file": "training.svg", "title": "Training curves",
                       "caption": "Training loss, validation loss and validation metrics per epoch."})
    for name, template, x, y, title, x_label, y_label in CHARTS:
        path = plots_dir / name
        if not path.exists():
            continue
        spec = fill(template, json.loads(path.read_text()), x=x, y=y, title=title, x_label=x_label, y_label=y_label)
        svg = Path(name).with_suffix(".svg").name
        (out / svg).write_text(to_svg(spec))
        charts.append({"file": svg, "title": title, "caption": title + " (test split)."})
    pictures = []
    source = Path(evaluation).parent
    for title, file in ev.get("pictures", {}).items():
        shutil.copy2(source / file, out / file)
        pictures.append({"file": file, "title": title})
    for title, path in (extra_pictures or {}).items():
        if Path(path).exists():
            name = f"extra_{len(pictures)}{Path(path).suffix}"
            shutil.copy2(path, out / name)
            pictures.append({"file": name, "title": title})
    cascade = (calibration or {}).get("test")
    env = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    full = ev["models"].get("full", next(iter(ev["models"].values())))
    html = env.get_template("report.html.j2").render(
        version=(promoted or {}).get("version", "not promoted"),
        model_name=model_name or (model_card or {}).get("model", {}).get("name", ""),
        dataset=prepared_report.get("dataset"), task=prepared_report.get("task"),
        data_version=str(prepared_report.get("data_digest", ""))[:12],
        created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), n_test=full["num_samples"], models=models,
        n_resamples=n_resamples, per_class=full["per_class"], charts=charts, cascade=cascade,
        temperatures={t: (calibration or {}).get(t, {}).get("temperature", 1.0) for t in ("edge", "cloud")},
        pictures=pictures, card=model_card, load_check=LOAD_CHECK)
    (out / "index.html").write_text(html)
    return out / "index.html"
