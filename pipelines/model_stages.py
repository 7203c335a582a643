"""The model stages: train, prune (the edge model), evaluate, promote (one thin function per DVC stage)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from components.progress import bar
from pipelines.layout import (METRICS, PLOTS, PREPARED, PROMOTED, PRUNE_DIR, REBALANCED, REGISTRY, REPORTS, TRAIN_MODEL,
                              record_training, say, write_json)
from pipelines.params import Params
from pipelines.runtime import init_ray


def train(p: Params) -> dict:
    from components.data.prepare import load_report
    from components.train import fit
    from components.train.precision import describe as describe_precision
    from components.train.settings import loop_config
    from pipelines.datasets import split_batches

    prep = load_report(PREPARED)
    weights = json.loads((REBALANCED / "rebalance.json").read_text())["class_weights"]
    c = p.config
    cfg = loop_config(c.train, c.model, class_names=prep["class_names"], in_chans=c.data.in_chans, seed=c.seed,
                      class_weights=weights, wandb=c.wandb.model_dump(), max_pixels=c.data.max_image_pixels)
    from components.models import create_model

    # Built once here, before any Ray worker starts: an unknown variant or a bad option fails the
    # stage at once instead of in every retried worker.
    model = create_model(cfg["model_name"], cfg["num_classes"], cfg["in_chans"], **cfg["model_kwargs"])
    transfer = None
    if p("model.pretrained"):
        from components.models import load_pretrained, resolve_pretrained

        # Checked here too: a missing or malformed file fails the stage at once.
        path = resolve_pretrained(p("model.pretrained"))
        report = load_pretrained(model, path, in_chans=cfg["in_chans"])
        say(report.summary())
        cfg["pretrained"] = str(path)
        transfer = {"path": str(path), "loaded": len(report.loaded), "adapted": report.adapted,
                    "reinitialised": report.reinitialised, "ignored": report.ignored}
    init_ray(p)
    t0 = time.time()
    res = fit(cfg, REBALANCED / "shards", PREPARED / "shards", p("train.storage_path"), TRAIN_MODEL,
              num_workers=p("train.num_workers"), cpus_per_worker=p("train.cpus_per_worker"),
              use_gpu=p("train.use_gpu"), data_cpus=p("augment.cpus_per_task"), max_failures=p("train.max_failures"),
              keep_checkpoints=p("train.keep_checkpoints"),
              online_policy=p("augment.policy") if p("augment.online") else None, data_digest=prep["data_digest"],
              select_by=p("train.select_by"))
    last = res.history[-1]
    decision = None
    if p("train.decision_bias") != "none":  # thresholds tuned on validation, folded into the model
        from components.evaluate.decision import tune_model_file

        meta = {"image_size": cfg["image_size"], "in_chans": cfg["in_chans"]}
        decision = tune_model_file(TRAIN_MODEL, split_batches(p, PREPARED / "shards", "val", None, meta, 128),
                                   p("train.decision_bias"))
        say(f"train: class bias {decision['bias']} tuned on {decision['validation_images']} validation images: "
             f"{decision['metric']} {decision['validation_before']:.3f} -> {decision['validation_after']:.3f}")
    selected = next(h for h in res.history if h["epoch"] == res.selected_epoch)
    summary = record_training(res, t0, pretrained=transfer, select_by=p("train.select_by"),
                              selected_epoch=res.selected_epoch, decision_bias=decision,
                              selected={k: v for k, v in selected.items() if k.startswith("val_")},
                              **describe_precision(last["precision"], p("train.precision")))
    say(f"train: {len(res.history)} epochs, val accuracy {last['val_accuracy']:.3f}, "
         f"val macro-F1 {last['val_macro_f1']:.3f}; model at {TRAIN_MODEL}")
    return summary


def _finetune(p: Params, model, meta: dict, teacher, epochs: int, label: str) -> list[dict]:
    """Short fine-tune of a compressed model on the rebalanced training set, distilled from
    ``teacher`` (the full model) when ``prune.distill.enabled``."""
    import torch

    from components.prune import DistillationLoss, finetune_epoch
    from components.train.precision import resolve_precision
    from pipelines.datasets import split_batches

    if epochs <= 0:
        return []
    weights = json.loads((REBALANCED / "rebalance.json").read_text())["class_weights"]
    base = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights) if weights else None,
                                     label_smoothing=p("train.label_smoothing"))
    d = p("prune.distill")
    loss = DistillationLoss(teacher if d["enabled"] else None, temperature=d["temperature"],
                            alpha=d["alpha"] if d["enabled"] else 0.0, base_loss=base)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=p("prune.finetune_lr"))
    precision = resolve_precision(p("train.precision"), "cpu")
    history = []
    for epoch in range(epochs):
        batches = split_batches(p, REBALANCED / "shards", None, p("augment.policy") if p("augment.online") else None,
                           meta, p("train.batch_size"))
        batches = bar(batches, desc=f"prune fine-tune ({label}) {epoch + 1}/{epochs}", unit="batch",
                      total=p("prune.finetune_max_steps"))
        r = finetune_epoch(model, batches, opt, loss, torch.device("cpu"), max_steps=p("prune.finetune_max_steps"),
                           precision=precision)
        n = max(1, r["samples"])
        history.append({"step": label, "epoch": epoch + 1, "samples": r["samples"], "loss": r["loss_sum"] / n,
                        "distilled": bool(d["enabled"])})
        say(f"prune: fine-tune ({label}) epoch {epoch + 1}/{epochs}: loss {r['loss_sum'] / n:.3f} on {r['samples']} "
             f"images{' (distilled from the full model)' if d['enabled'] else ''}")
    return history


def prune(p: Params) -> dict:
    """Compress the trained model into the edge model (``prune.method``, components/prune/edge.py):
    structured (channel-pruned, really faster) or unstructured (sparse file) pruning, fine-tuned with
    optional distillation, optionally exported to int8 ONNX. ``models/prune/edge.json`` records what
    was applied."""
    import torch

    from components.models import load_model
    from components.prune.edge import build_edge_model, quantize_edge_model
    from pipelines.datasets import split_batches

    torch.manual_seed(p("seed"))
    torch.set_num_threads(p("train.threads_per_worker"))
    if PRUNE_DIR.exists():
        shutil.rmtree(PRUNE_DIR)
    PRUNE_DIR.mkdir(parents=True)
    teacher, meta = load_model(TRAIN_MODEL)
    teacher = teacher.eval().to(memory_format=torch.channels_last)
    model, _ = load_model(TRAIN_MODEL)
    method, dense_size = p("prune.method"), TRAIN_MODEL.stat().st_size

    def finetune(m, label: str) -> list[dict]:
        return _finetune(p, m, meta, teacher, p("prune.finetune_epochs"), label)

    edge = build_edge_model(method, model.to(memory_format=torch.channels_last), meta, p("prune"), finetune,
                            PRUNE_DIR, TRAIN_MODEL, p("seed"))
    say(f"prune: {edge.summary}".replace("\n", "\n[resops] "))
    report: dict = {"method": method, "distill": dict(p("prune.distill")), "file_bytes_full": dense_size,
                    **edge.report, "edge_file": edge.file.name, "file_bytes_edge": edge.file.stat().st_size,
                    "size_ratio": edge.file.stat().st_size / dense_size, "finetune": edge.finetune}
    q = p("prune.quantize")
    if q["enabled"]:
        def calibration(edge_meta: dict):
            return ({"image": b["image"].numpy()} for b in split_batches(p, PREPARED / "shards", "train", None, edge_meta, 32))

        report.update(quantize_edge_model(edge.file, PRUNE_DIR, calibration, q))
        say(f"prune: int8 ONNX {report['file_bytes_onnx'] / 1e6:.1f} MB -> {report['file_bytes_int8'] / 1e6:.1f} MB, "
            f"calibrated on {q['calibration_images']} training images")
    write_json(PRUNE_DIR / "edge.json", report)
    write_json(METRICS / "prune.json", report)
    say(f"prune: edge model {edge.file} ({method}), file {dense_size / 1e6:.1f} MB -> "
        f"{report['file_bytes_edge'] / 1e6:.1f} MB")
    return report


def edge_files() -> dict[str, Path]:
    """The prune stage's edge model files by role: ``edge`` (torch) and, when quantized, ``edge_int8``."""
    info = json.loads((PRUNE_DIR / "edge.json").read_text())
    files = {"edge": PRUNE_DIR / info["edge_file"]}
    if info.get("int8_file"):
        files["edge_int8"] = PRUNE_DIR / info["int8_file"]
    return files


def evaluate(p: Params) -> dict:
    import torch

    from components.evaluate import classification_metrics, confusion_png, confusion_rows, predict_dataset
    from components.evaluate.metrics import bootstrap_intervals
    from components.models import load_model
    from pipelines.datasets import split_batches

    torch.set_num_threads(p("train.threads_per_worker"))
    tta = p("evaluate.tta")
    results, pictures, details = {}, {}, {}
    REPORTS.mkdir(parents=True, exist_ok=True)
    edge = edge_files()
    candidates = [("full", TRAIN_MODEL), ("pruned", edge["edge"])]
    if "edge_int8" in edge:
        candidates.append(("int8", edge["edge_int8"]))
    _, meta = load_model(TRAIN_MODEL)
    for name, path in candidates:
        batches = bar(split_batches(p, PREPARED / "shards", "test", None, meta, p("evaluate.batch_size")),
                      desc=f"evaluate ({name})", unit="batch")
        if name == "int8":
            from components.prune import OnnxClassifier

            model = OnnxClassifier(path, threads=p("train.threads_per_worker"))
        else:
            model = load_model(path)[0].to(memory_format=torch.channels_last)
        y, proba = predict_dataset(model, batches, tta=tta)
        m = classification_metrics(y, proba, meta["class_names"])
        m["ci95"] = bootstrap_intervals(y, proba.argmax(1), len(meta["class_names"]), seed=p("seed"))
        details[name] = m
        results[name] = {k: v for k, v in m.items() if k != "confusion_matrix"} | {"tta": tta}
        PLOTS.mkdir(parents=True, exist_ok=True)
        if name != "int8":
            confusion_rows(y, proba.argmax(1), meta["class_names"]).to_csv(PLOTS / f"confusion_{name}.csv", index=False)
        if name == "full":  # the promoted (cloud) model's curves, per class
            from components.evaluate.plots import pr_rows, roc_rows, write_points

            write_points(PLOTS / "roc_full.json", roc_rows(y, proba, meta["class_names"]))
            write_points(PLOTS / "pr_full.json", pr_rows(y, proba, meta["class_names"]))
        confusion_png(m["confusion_matrix"], meta["class_names"], f"{name} model, test split", REPORTS / f"confusion_{name}.png")
        pictures[f"Confusion matrix, {name} model"] = f"confusion_{name}.png"
        per_cell = int(p("evaluate.gradcam_per_cell"))
        if per_cell and name != "int8":  # the int8 file has no gradients: its heat maps are the pruned model's
            from components.evaluate.explain import gradcam_grid

            grid = split_batches(p, PREPARED / "shards", "test", None, meta, p("evaluate.batch_size"))
            gradcam_grid(model, grid, meta["class_names"], REPORTS / f"gradcam_{name}.png", per_cell=per_cell,
                         title=f"{name} model ({meta['model_name']}), test split")
            pictures[f"Grad-CAM, {name} model: where it looked, per true class"] = f"gradcam_{name}.png"
        say(f"evaluate {name}: accuracy {m['accuracy']:.3f} (majority {m['majority_rate']:.3f}), balanced accuracy "
             f"{m['balanced_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, ROC-AUC {m['roc_auc_ovr']}")
    write_json(METRICS / "evaluate.json", results)
    write_json(REPORTS / "evaluation.json", {"models": details, "pictures": pictures})
    return results


def promote(p: Params) -> dict:
    from components.data.prepare import load_report
    from components.registry import dvc_out_hash, git_revision, register_candidate

    results = json.loads((METRICS / "evaluate.json").read_text())
    headline = {k: results["full"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "mcc", "majority_rate")}
    for edge in ("pruned", "int8"):
        if edge in results:
            headline[edge] = {k: results[edge][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    lineage = {
        "params": {k: p(k) for k in ("data", "augment", "rebalance", "gan", "model", "train", "prune")},
        "data_version": {"dvc_md5": dvc_out_hash("dvc.lock", PREPARED.as_posix()),
                         "manifest_digest": load_report(PREPARED)["data_digest"],
                         # labelled feedback in the training split (data.extra): each folder's version and rows
                         "extra": [{k: e[k] for k in ("path", "version", "rows", "by_class", "label_sources")}
                                   for e in load_report(PREPARED).get("extra", [])]},
        "git_revision": git_revision(),
    }
    entry = register_candidate(REGISTRY, PROMOTED, {"full": TRAIN_MODEL, **edge_files()}, headline,
                               dict(p("promote.gates")), lineage)
    if entry["status"] == "promoted":
        say(f"promote: {entry['version']} promoted (previous {entry['previous']}); weights in {PROMOTED}")
    else:
        say(f"promote: {entry['version']} NOT promoted: {'; '.join(entry['reasons'])}. "
             f"The promoted model stays {entry['previous']}.")
    return entry
