"""The evaluation report (components.evaluate.report), its curves (components.evaluate.plots), the
offline page of `dvc plots show` and the model card (components.registry.card): every file the
report references exists beside it, every value is escaped, nothing is loaded from the network."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from components.evaluate.metrics import bootstrap_intervals, classification_metrics
from components.evaluate.plots import (TEMPLATES, cascade_rows, fill, pr_rows, reliability_rows, roc_rows, to_svg,
                                       write_offline_template, write_points)
from components.evaluate.report import write_report
from components.registry.card import card_markdown, model_card

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<script>alert(1)</script>"  # a class name that must come out as text


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.remote = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            v = a.get(key)
            if v and tag in ("img", "script", "link", "iframe", "source"):
                (self.remote if re.match(r"^(https?:)?//", v) else self.refs).append(v)


def referenced_files(html: str) -> list[str]:
    """Local files an HTML page loads (img/script/link/...); raises if it loads anything remote."""
    parser = _Refs()
    parser.feed(html)
    assert not parser.remote, f"remote resources: {parser.remote}"
    return parser.refs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What the evaluate and calibrate stages leave for the report, from a small fake evaluation."""
    root = tmp_path_factory.mktemp("report-inputs")
    rng = np.random.default_rng(0)
    names = ["ok", EVIL, "crack"]
    y = rng.integers(0, 3, 300)
    proba = rng.dirichlet(np.ones(3), 300)
    proba[np.arange(300), y] += 0.8
    proba /= proba.sum(1, keepdims=True)
    m = classification_metrics(y, proba, names)
    m["ci95"] = bootstrap_intervals(y, proba.argmax(1), 3)
    ev_dir = root / "reports/evaluation"
    ev_dir.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(ev_dir / "confusion_full.png")
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(ev_dir / "gradcam_full.png")
    (ev_dir / "evaluation.json").write_text(json.dumps({
        "models": {"full": m, "pruned": m},
        "pictures": {"Confusion matrix, full model": "confusion_full.png",
                     f"Grad-CAM, full model {EVIL}": "gradcam_full.png"}}))
    plots = root / "plots"
    write_points(plots / "roc_full.json", roc_rows(y, proba, names))
    write_points(plots / "pr_full.json", pr_rows(y, proba, names))
    write_points(plots / "reliability.json", reliability_rows(proba, y, "cloud, raw (T=1)"))
    conf = proba.max(1)
    write_points(plots / "cascade.json", cascade_rows(conf, proba.argmax(1), y, y, "test split"))
    (plots / "train_history.csv").write_text("epoch,train_loss,val_loss,val_accuracy\n1,1.2,1.0,0.5\n2,0.9,0.8,0.6\n")
    cal = {"edge": {"temperature": 1.5, "ece_before": 0.2, "ece_after": 0.05},
           "cloud": {"temperature": 1.2, "ece_before": 0.1, "ece_after": 0.04},
           "test": {"n": 300, "threshold": 0.6, "escalation_rate": 0.3, "cascade_accuracy": 0.8,
                    "edge_accuracy": 0.7, "cloud_accuracy": 0.81, "edge_ece": 0.05, "cloud_ece": 0.04}}
    data = {"dataset": "elpv", "task": "4class", "data_digest": "abc123", "dvc_md5": "d41d8cd9.dir",
            "counts": {"train": {"a": 10}, "val": {"a": 3}, "test": {"a": 5}}}
    card = model_card(version="v9-deadbeef", model={"model_name": "resnet18", "image_size": 64, "in_chans": 1,
                                                    "class_names": names},
                      data=data, evaluation={"full": m, "pruned": m}, calibration=cal,
                      prune={"method": "structured", "macs_before": 100, "macs_after": 50, "file_bytes_full": 4e7,
                             "file_bytes_edge": 2e7, "file_bytes_int8": 5e6},
                      train={"epochs_run": 6, "precision": "fp32", "selected_epoch": 6}, git_revision="0123abc")
    return {"root": root, "ev": ev_dir / "evaluation.json", "plots": plots, "data": data, "cal": cal, "card": card,
            "y": y, "proba": proba}


@pytest.fixture(scope="module")
def report(inputs):
    gan = inputs["root"] / "samples.png"
    from PIL import Image

    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(gan)
    path = write_report(inputs["root"] / "reports/report", evaluation=inputs["ev"], plots_dir=inputs["plots"],
                        prepared_report=inputs["data"], promoted={"version": "v9-deadbeef"},
                        calibration=inputs["cal"], model_card=inputs["card"], model_name="resnet18",
                        extra_pictures={"GAN samples": gan, "Scalograms": inputs["root"] / "missing.png"})
    return path


def test_every_file_the_report_shows_is_beside_it_and_nothing_is_remote(report):
    html = report.read_text()
    refs = referenced_files(html)
    assert {"confusion_full.png", "gradcam_full.png", "training.svg", "roc_full.svg", "pr_full.svg",
            "reliability.svg", "cascade.svg"} <= set(refs)
    assert len([r for r in refs if r.startswith("extra_")]) == 1  # the GAN samples; the missing picture left out
    for ref in refs:
        assert (report.parent / ref).stat().st_size > 0, ref
    for svg in [r for r in refs if r.endswith(".svg")]:
        text = (report.parent / svg).read_text()
        assert text.startswith("<svg") and "<path" in text  # drawn, not an empty chart


def test_report_values_are_escaped(report):
    html = report.read_text()
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_has_intervals_the_cascade_and_the_card(report, inputs):
    html = report.read_text()
    ci = json.loads(inputs["ev"].read_text())["models"]["full"]["ci95"]["accuracy"]
    assert f"[{ci[0]:.3f}, {ci[1]:.3f}]" in html
    assert "0.600" in html and "70.0 %" in html  # threshold, share answered at the edge
    assert "CC BY-NC-SA 4.0" in html and "v9-deadbeef" in html


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1600):
        y = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
        ci = bootstrap_intervals(y, pred, 3)
        acc = float((y == pred).mean())
        assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
        assert ci["balanced_accuracy"][0] < ci["balanced_accuracy"][1]
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < widths[0] / 2.5  # width ~ 1/sqrt(n): 16x the images, a quarter of the width


def test_curves_are_what_scikit_learn_computes(inputs):
    from sklearn.metrics import roc_auc_score

    y, proba = inputs["y"], inputs["proba"]
    rows = roc_rows(y, proba, ["a", "b", "c"])
    series = sorted({r["series"] for r in rows})
    assert len(series) == 3
    auc_a = roc_auc_score(y == 0, proba[:, 0])
    assert f"a (AUC {auc_a:.3f})" in series
    a = [r for r in rows if r["series"].startswith("a ")]
    assert a[0]["fpr"] == 0.0 and a[-1]["fpr"] == 1.0 and a[-1]["tpr"] == 1.0
    casc = cascade_rows(np.array([0.2, 0.9]), np.array([0, 1]), np.array([1, 1]), np.array([1, 1]), "t", steps=3)
    assert [(r["threshold"], r["escalated"], r["accuracy"]) for r in casc] == [(0.0, 0.0, 0.5), (0.5, 0.5, 1.0),
                                                                               (1.0, 1.0, 1.0)]


def test_dvc_templates_fill_like_dvc_and_render_offline(inputs):
    rows = json.loads((inputs["plots"] / "roc_full.json").read_text())
    for name in TEMPLATES:
        spec = fill(name, rows, x="fpr", y="tpr", title="ROC")
        text = json.dumps(spec)
        assert "<DVC_METRIC" not in text and spec["data"]["values"] == rows
        assert to_svg(spec).startswith("<svg")
    # dvc.yaml draws these files with these templates
    dvc = (ROOT / "dvc.yaml").read_text()
    for name in ("series.json", "series_diagonal.json"):
        assert f"components/evaluate/vega/{name}" in dvc


def test_offline_dvc_plots_page_is_the_committed_one(tmp_path):
    """.dvc/plots/offline.html (plots.html_template in .dvc/config) is what the generator writes: Vega,
    Vega-Lite and Vega-Embed inline, no {scripts} placeholder for DVC's CDN tags, no remote script."""
    fresh = write_offline_template(tmp_path / "offline.html").read_text()
    committed = (ROOT / ".dvc/plots/offline.html").read_text()
    assert committed == fresh, "regenerate: python -m components.evaluate.plots template"
    assert "{plot_divs}" in committed and "{scripts}" not in committed
    assert referenced_files(committed) == [] and "window.vegaEmbed" in committed
    assert "html_template = plots/offline.html" in (ROOT / ".dvc/config").read_text()


def test_model_card_markdown_names_licence_intervals_and_limits(inputs):
    card = inputs["card"]
    md = card_markdown(card)
    assert "CC BY-NC-SA 4.0" in md and "95% CI" in md and "v9-deadbeef" in md
    lo, hi = card["metrics"]["accuracy"]["ci95"]
    assert f"{lo:.3f} to {hi:.3f}" in md
    assert card["cascade"]["threshold"] == 0.6 and card["calibration"]["edge"]["temperature"] == 1.5
    assert any("Lowest recall" in item for item in card["limitations"])
    json.dumps(card)  # JSON-ready
