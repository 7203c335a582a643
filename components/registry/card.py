"""Model cards (Mitchell et al. 2019): what a promoted model is, what it was trained and tested on, how
well it does with what uncertainty, and where it should not be used. ``model_card`` gathers the facts
from the pipeline's outputs into a JSON-ready dict; ``card_markdown`` renders ``MODEL_CARD.md`` from it
(a Jinja2 template beside this module)."""
from __future__ import annotations

from pathlib import Path

# What is known about the datasets resops reads; a user's own folder says what its owner says.
DATASETS = {
    "elpv": {"name": "ELPV (Buerhop-Lutz et al. 2018; Deitsch et al. 2019): 2,624 electroluminescence images "
                     "of mono- and polycrystalline solar cells, 300 x 300 px, 8-bit",
             "licence": "CC BY-NC-SA 4.0 (non-commercial, share-alike)",
             "source": "the elpv-dataset Python package"},
    "synthetic": {"name": "synthetic shapes made by resops (not real inspection data)", "licence": "none (generated)",
                  "source": "components/data/sources.py"},
    "folder": {"name": "a folder of <class>/<image> files (data.folder.path)", "licence": "as its owner states",
               "source": "data.folder.path"},
    "bonn_eeg": {"name": "Bonn University EEG database (Andrzejak et al. 2001), sets Z O N F S",
                 "licence": "as published by the University of Bonn (research use; cite the paper)",
                 "source": "data.eeg.path"},
    "eeg_edf": {"name": "EDF recordings in <class>/<file>.edf folders (data.eeg.path)", "licence": "as its owner states",
                "source": "data.eeg.path"},
    "eeg_synthetic": {"name": "synthetic signals made by resops (NOT EEG: no clinical meaning)",
                      "licence": "none (generated)", "source": "components/data/eeg.py"},
}

INTENDED = {
    "elpv": ("Triage of electroluminescence images of single solar cells like ELPV's (cut out, rectified, "
             "300 x 300 px): flag cells that are probably defective for a person to look at, and answer "
             "confident cells at the edge."),
    "bonn_eeg": "Research on EEG scalogram classification on the Bonn sets; not a medical device.",
}
OUT_OF_SCOPE = ("Decisions without human review (acceptance of modules, diagnosis); images from other sensors, "
                "resolutions, module types or preprocessing than the training data without re-validating on "
                "them; any use the dataset licence excludes (ELPV: commercial use).")


def _interval(m: dict, key: str) -> dict:
    ci = (m.get("ci95") or {}).get(key)
    return {"value": float(m[key]), "ci95": [float(v) for v in ci] if ci else None}


def model_card(*, version: str, model: dict, data: dict, evaluation: dict, calibration: dict | None,
               prune: dict | None, train: dict | None, git_revision: str | None = None,
               benchmarks: dict | None = None) -> dict:
    """The card of one promoted version.

    ``model``: model params and the model file's metadata (name, head, image_size, in_chans, classes);
    ``data``: the prepared data's report plus its DVC hash (``dvc_md5``); ``evaluation``: the evaluate
    stage's per-model metrics with ``ci95``; ``calibration``: the calibrate stage's result (temperatures,
    ECE, threshold, test replay); ``prune``: metrics/prune.json; ``train``: metrics/train.json;
    ``benchmarks``: optional figures from benchmarks/results (e.g. the accuracy benchmark's summary)."""
    dataset = str(data.get("dataset"))
    full = evaluation["full"]
    limitations = []
    recalls = {c: v["recall"] for c, v in full["per_class"].items()}
    weak = sorted(recalls, key=recalls.get)[:2]
    limitations.append("Lowest recall on the test split: " + ", ".join(f"{c} {recalls[c]:.2f}" for c in weak)
                       + " (the rarer, in-between classes are the hard ones).")
    ci = (full.get("ci95") or {}).get("accuracy")
    if ci:
        limitations.append(f"The test split has {full['num_samples']} images: accuracy is known to about "
                           f"+-{(ci[1] - ci[0]) / 2:.3f} (95% bootstrap interval {ci[0]:.3f} to {ci[1]:.3f}).")
    if dataset == "elpv":
        limitations.append("Trained from scratch on ELPV only; published figures on this split are higher "
                           "(88.4 % fine-tuned VGG-19, Deitsch et al. 2019).")
    if (benchmarks or {}).get("accuracy"):
        limitations.append(benchmarks["accuracy"])
    edge = {}
    if prune:
        edge = {"method": prune.get("method"), "macs_before": prune.get("macs_before"),
                "macs_after": prune.get("macs_after"), "file_bytes_full": prune.get("file_bytes_full"),
                "file_bytes_edge": prune.get("file_bytes_edge"), "file_bytes_int8": prune.get("file_bytes_int8"),
                "metrics": {k: {m: _interval(evaluation[k], m) for m in ("accuracy", "balanced_accuracy", "macro_f1")}
                            for k in ("pruned", "int8") if k in evaluation}}
    cal = calibration or {}
    return {
        "schema": "resops model card 1",
        "version": version,
        "git_revision": git_revision,
        "model": {"name": model.get("model_name"), "head": model.get("head", "softmax"),
                  "image_size": model.get("image_size"), "in_chans": model.get("in_chans"),
                  "classes": list(model.get("class_names", [])), "pretrained": (train or {}).get("pretrained"),
                  "precision": (train or {}).get("precision"), "epochs": (train or {}).get("epochs_run"),
                  "selected_epoch": (train or {}).get("selected_epoch")},
        "dataset": {"id": dataset, "task": data.get("task"), **DATASETS.get(dataset, {"name": dataset,
                                                                                       "licence": "unknown"}),
                    "data_version": {"dvc_md5": data.get("dvc_md5"), "manifest_digest": data.get("data_digest")},
                    "split_counts": {split: int(sum(v.values())) for split, v in (data.get("counts") or {}).items()}},
        "intended_use": INTENDED.get(dataset, "Visual inspection triage on data like the training data, with a "
                                              "person reviewing what the model flags."),
        "out_of_scope": OUT_OF_SCOPE,
        "metrics": {"split": "test", "n": int(full["num_samples"]),
                    **{k: _interval(full, k) for k in ("accuracy", "balanced_accuracy", "macro_f1")},
                    "mcc": float(full["mcc"]), "roc_auc_ovr": full.get("roc_auc_ovr"),
                    "majority_rate": float(full["majority_rate"]),
                    "per_class": {c: {k: float(v[k]) for k in ("precision", "recall", "f1")} | {"support": int(v["support"])}
                                  for c, v in full["per_class"].items()}},
        "calibration": {t: {k: cal[t][k] for k in ("temperature", "ece_before", "ece_after") if k in cal.get(t, {})}
                        for t in ("edge", "cloud") if t in cal},
        "edge_model": edge,
        "cascade": {"threshold": (cal.get("test") or {}).get("threshold"),
                    **{k: v for k, v in (cal.get("test") or {}).items() if k != "threshold"}},
        "limitations": limitations,
    }


def card_markdown(card: dict) -> str:
    from jinja2 import Environment, FileSystemLoader

    env = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent), autoescape=False,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template("MODEL_CARD.md.j2").render(card=card)
