"""Curves as DVC plots, rendered offline.

The evaluate and calibrate stages write each curve as a JSON list of points (``plots/*.json``: one
row per point, a ``series`` field naming the line, ``i`` its order); ``dvc.yaml`` registers them with
the Vega-Lite templates of ``components/evaluate/vega/`` so ``dvc plots show`` / ``dvc plots diff``
draw them. The same template filled the same way is rendered to SVG by vl-convert (Vega in a
bundled Deno runtime, no browser, no network) for the HTML report, and the page ``dvc plots show``
writes loads Vega from the project (``.dvc/plots/offline.html``, made by :func:`write_offline_template`
from vl-convert's bundle of Vega, Vega-Lite and Vega-Embed) rather than from a CDN.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

VEGA_DIR = Path(__file__).resolve().parent / "vega"
LOAD_CHECK = """<script>
// Marks what did not load: a broken image gets a red outline; body[data-loaded] counts images and charts
// (benchmarks/report_render.py reads it from the rendered page).
window.addEventListener("load", function () {
  setTimeout(function () {
    var imgs = Array.prototype.slice.call(document.images);
    var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
    imgs.forEach(function (i) { if (ok.indexOf(i) < 0) { i.style.outline = "3px solid red"; } });
    var charts = document.querySelectorAll(".vega-embed canvas, .vega-embed svg.marks").length;
    document.body.setAttribute("data-loaded", "images " + ok.length + "/" + imgs.length + ", charts " + charts);
  }, 500);
});
</script>"""
TEMPLATES = {"series": VEGA_DIR / "series.json", "series_diagonal": VEGA_DIR / "series_diagonal.json"}


def _rows(series: str, **columns) -> list[dict]:
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    n = len(next(iter(cols.values())))
    return [{"series": series, "i": i, **{k: round(float(v[i]), 6) for k, v in cols.items()}} for i in range(n)]


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a curve, its first and last kept (the plot looks the same)."""
    if len(x) <= max_points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(int))
    return x[keep], y[keep]


def roc_rows(y: np.ndarray, proba: np.ndarray, class_names: list[str], max_points: int = 200) -> list[dict]:
    """One-vs-rest ROC curve per class (scikit-learn), its AUC in the series name; classes absent from
    ``y`` (no positives, or no negatives) are left out."""
    from sklearn.metrics import auc, roc_curve

    rows = []
    for k, name in enumerate(class_names):
        positive = np.asarray(y) == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, proba[:, k])
        area = auc(fpr, tpr)
        fpr, tpr = _thin(fpr, tpr, max_points)
        rows += _rows(f"{name} (AUC {area:.3f})", fpr=fpr, tpr=tpr)
    return rows


def pr_rows(y: np.ndarray, proba: np.ndarray, class_names: list[str], max_points: int = 200) -> list[dict]:
    """One-vs-rest precision-recall curve per class, its average precision in the series name."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    rows = []
    for k, name in enumerate(class_names):
        positive = np.asarray(y) == k
        if not positive.any():
            continue
        precision, recall, _ = precision_recall_curve(positive, proba[:, k])
        ap = average_precision_score(positive, proba[:, k])
        recall, precision = _thin(recall[::-1], precision[::-1], max_points)  # recall increasing
        rows += _rows(f"{name} (AP {ap:.3f})", recall=recall, precision=precision)
    return rows


def reliability_rows(probs: np.ndarray, y: np.ndarray, series: str, n_bins: int = 15) -> list[dict]:
    """A reliability diagram's points: per non-empty confidence bin, mean confidence and accuracy."""
    from components.evaluate.calibration import reliability_bins

    bins = reliability_bins(probs, y, n_bins)
    return _rows(series, confidence=[b["confidence"] for b in bins], accuracy=[b["accuracy"] for b in bins],
                 count=[b["count"] for b in bins])


def cascade_rows(edge_conf: np.ndarray, edge_pred: np.ndarray, cloud_pred: np.ndarray, y: np.ndarray,
                 series: str, steps: int = 101) -> list[dict]:
    """The cascade's trade-off: for thresholds 0..1, the share escalated to the cloud and the accuracy."""
    thresholds = np.linspace(0.0, 1.0, steps)
    escalated, accuracy = [], []
    for t in thresholds:
        up = edge_conf < t
        escalated.append(up.mean())
        accuracy.append((np.where(up, cloud_pred, edge_pred) == y).mean())
    return _rows(series, threshold=thresholds, escalated=escalated, accuracy=accuracy)


def write_points(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=0))
    return path


def fill(template: str, rows: list[dict], *, x: str, y: str, title: str = "", x_label: str | None = None,
         y_label: str | None = None) -> dict:
    """A Vega-Lite spec: ``template``'s DVC anchors filled as ``dvc plots show`` fills them."""
    spec = json.loads(TEMPLATES[template].read_text())
    values = {"<DVC_METRIC_DATA>": rows, "<DVC_METRIC_X>": x, "<DVC_METRIC_Y>": y,
              "<DVC_METRIC_TITLE>": title, "<DVC_METRIC_X_LABEL>": x_label or x,
              "<DVC_METRIC_Y_LABEL>": y_label or y}

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str) and node in values:
            return copy.deepcopy(values[node])
        return node

    return walk(spec)


def to_svg(spec: dict) -> str:
    """Vega-Lite -> SVG with vl-convert: no browser, no network."""
    import vl_convert as vlc

    return vlc.vegalite_to_svg(spec)


def write_offline_template(path: str | Path) -> Path:
    """The page ``dvc plots show --html-template`` fills: Vega, Vega-Lite and Vega-Embed inline (vl-convert's
    bundle), no ``{scripts}`` placeholder (where DVC would put its CDN script tags)."""
    import html

    import vl_convert as vlc

    versions = (f"vega {vlc.get_vega_version()}, vega-lite {vlc.get_vegalite_versions()[-1]}, "
                f"vega-embed {vlc.get_vega_embed_version()}")
    page = ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n<title>resops: DVC plots</title>\n"
            f"<!-- {html.escape(versions)} inline (vl-convert-python's javascript_bundle): renders offline. "
            "Made by `python -m components.evaluate.plots template`. -->\n"
            "<script>\n" + vlc.javascript_bundle() + "\n</script>\n"
            "<style>body{font-family:sans-serif;margin:1.5em} table{border-spacing:15px} "
            "img{max-width:100%}</style>\n</head>\n<body>\n<h1>resops plots</h1>\n{plot_divs}\n" + LOAD_CHECK
            + "\n</body>\n</html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="write the offline HTML template of `dvc plots show`")
    ap.add_argument("command", choices=["template"])
    ap.add_argument("--out", default=".dvc/plots/offline.html")
    args = ap.parse_args(argv)
    print(write_offline_template(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
