"""The serving stages: calibrate (cascade, Serve config, edge bundle) and report (one thin function per DVC stage)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.progress import bar
from pipelines.layout import (EEG_DATASETS, GAN_DIR, GAN_REPORTS, METRICS, PLOTS, PREPARED, PROMOTED, REPORTS, REPORT_DIR, SERVE_DIR,
                              read_json, say, write_json)
from pipelines.params import Params


def _split_logits(p: Params, split: str, cloud_path: Path, edge_path: Path, edge_onnx: Path | None) -> dict:
    """Logits of the cloud (full) and edge tier models on a split, image by image as the tiers compute
    them (components.evaluate.replay.tier_logits)."""
    import numpy as np

    from components.data.shards import read_shards
    from components.evaluate.replay import tier_logits

    rows = read_shards(PREPARED / "shards", columns=["image", "label"], split=split)
    images, kw = list(rows["image"]), {"threads": p("train.threads_per_worker"), "max_pixels": p("data.max_image_pixels")}
    return {"cloud": tier_logits(cloud_path, None, images, desc=f"calibrate ({split}, cloud)", **kw),
            "edge": tier_logits(edge_path, edge_onnx, images, desc=f"calibrate ({split}, edge)", **kw),
            "labels": np.asarray(rows["label"]), "images": images}


def _drift_reference(p: Params, cloud_path: Path) -> dict:
    """Drift reference of the promoted cloud model: the training split's input histograms and embeddings,
    null levels from the validation split (components.feedback.reference)."""
    import torch

    from components.feedback.reference import drift_reference
    from components.models import load_model
    from pipelines.datasets import split_batches

    model, meta = load_model(cloud_path)
    model = model.eval().to(memory_format=torch.channels_last)
    d, bs = p("serve.drift"), p("evaluate.batch_size")
    batches = {split: bar(split_batches(p, PREPARED / "shards", split, None, meta, bs), desc=f"drift reference ({split})",
                          unit="batch") for split in ("train", "val")}
    ref = drift_reference(model, batches["train"], batches["val"], window=d["window"], components=d["components"],
                          seed=p("seed"))
    ref.update(image_size=int(meta["image_size"]), in_chans=int(meta["in_chans"]), model_name=str(meta["model_name"]))
    say(f"calibrate: drift reference from {ref['train_images']} training and {ref['val_images']} validation images "
         f"(null levels: intensity PSI {ref['intensity_null95']:.4f}, embedding Frechet "
         f"{ref.get('embedding_null95', float('nan')):.3f})")
    return ref


def write_edge_bundle(directory: Path, onnx_path: Path, edge_model: Path, args: dict, cal: dict) -> Path:
    """The edge bundle (components.edge.bundle): the int8 ONNX edge model, its classes, input, temperature
    and the cascade threshold, in a directory to copy to the device."""
    from components.edge.bundle import write_bundle
    from components.models.checkpoint import load_model

    _, meta = load_model(edge_model)
    drift = args.get("drift") or {}
    if drift:
        drift = {"drift_reference": drift["reference"], "drift_threshold": float(drift["threshold"]),
                 "drift_check_every": int(drift["check_every"])}
    return write_bundle(directory, onnx_path, model_name=str(meta["model_name"]), **drift,
                        model_version=str(args["model_version"]),
                        class_names=[str(n) for n in meta["class_names"]], image_size=int(meta["image_size"]),
                        in_chans=int(meta["in_chans"]), temperature=float(cal["edge"]["temperature"]),
                        threshold=float(args["threshold"]),
                        **{k: int(args[k]) for k in ("max_body_bytes", "max_image_pixels", "min_image_side",
                                                     "max_batch_images")})


def _model_card(p: Params, files: dict, cal: dict) -> dict:
    """The promoted version's model card from the pipeline's outputs (components.registry.card)."""
    from components.data.prepare import load_report
    from components.models.checkpoint import load_payload
    from components.registry import dvc_out_hash, git_revision
    from components.registry.card import model_card

    promoted = json.loads((PROMOTED / "model.json").read_text())
    meta = load_payload(files["full"])["meta"]
    return model_card(version=promoted["version"], model={**meta, "head": p("model.head")},
                      data={**load_report(PREPARED), "dvc_md5": dvc_out_hash("dvc.lock", PREPARED.as_posix())},
                      evaluation=read_json(METRICS / "evaluate.json"), calibration=cal,
                      prune=read_json(METRICS / "prune.json"), train=read_json(METRICS / "train.json"),
                      git_revision=git_revision())


def _test_replay(p: Params, files: dict, edge_model: Path, edge_onnx: Path | None, cal: dict, threshold: float,
                 version: str) -> dict:
    """The served cascade replayed offline on the test split (components.evaluate.replay)."""
    from components.evaluate.replay import replay_from_logits
    from components.models.checkpoint import load_payload

    test = _split_logits(p, "test", Path(files["full"]), edge_model, edge_onnx)
    names = [str(n) for n in load_payload(files["full"])["meta"]["class_names"]]
    return replay_from_logits(test["images"], test["labels"], test,
                              temperatures={t: cal[t]["temperature"] for t in ("edge", "cloud")}, threshold=threshold,
                              class_names=names, model_version=version)


def _cascade_figures(replay: dict, cal: dict, threshold: float, bins: int) -> dict:
    """The test split's reliability and cascade curves (plots/) and the replayed cascade's figures."""
    from components.evaluate.calibration import expected_calibration_error, softmax
    from components.evaluate.plots import cascade_rows, reliability_rows, write_points
    from components.evaluate.replay import cascade_route

    pe, pc, y = replay["edge_probs"], replay["cloud_probs"], replay["labels"]
    pred, escalate = cascade_route(pe, pc, threshold)
    raw = {t: softmax(replay[f"{t}_logits"]) for t in ("edge", "cloud")}
    write_points(PLOTS / "reliability.json", [
        *reliability_rows(raw["edge"], y, "edge, raw (T=1)", bins),
        *reliability_rows(pe, y, f"edge, scaled (T={cal['edge']['temperature']:.2f})", bins),
        *reliability_rows(raw["cloud"], y, "cloud, raw (T=1)", bins),
        *reliability_rows(pc, y, f"cloud, scaled (T={cal['cloud']['temperature']:.2f})", bins)])
    write_points(PLOTS / "cascade.json", cascade_rows(pe.max(1), pe.argmax(1), pc.argmax(1), y, "test split"))
    return {"n": int(len(y)), "threshold": float(threshold), "escalation_rate": float(escalate.mean()),
            "cascade_accuracy": float((pred == y).mean()), "edge_accuracy": float((pe.argmax(1) == y).mean()),
            "cloud_accuracy": float((pc.argmax(1) == y).mean()),
            "edge_ece": float(expected_calibration_error(pe, y, bins)),
            "cloud_ece": float(expected_calibration_error(pc, y, bins))}


def calibrate(p: Params) -> dict:
    """Calibrate the cascade of the promoted models on the validation split and write the Serve config.

    Temperature scaling per tier (expected calibration error before and after), then the escalation
    threshold that meets ``serve.cascade.target`` on the validation split; the same cascade is then
    simulated on the test split (accuracy, share answered at the edge) as an offline check of what
    the served app should do. Writes ``models/serve/calibration.json`` and
    ``models/serve/serve_config.yaml`` (what ``resops serve`` and the RayService deploy).
    """
    import numpy as np
    import torch

    from components.evaluate.calibration import calibrate_cascade
    from components.serve.config import build_serve_config, edge_uses_onnx, serve_args, write_serve_config

    torch.set_num_threads(p("train.threads_per_worker"))
    c = p("serve.cascade")
    files = json.loads((PROMOTED / "model.json").read_text())["files"]
    edge_model = Path(files.get("edge", files["full"]))
    use_onnx = edge_uses_onnx(p("serve.edge.backend"), files)  # the rule the served app follows
    edge_onnx = Path(files["edge_int8"]) if use_onnx else None
    val = _split_logits(p, "val", Path(files["full"]), edge_model, edge_onnx)
    cal = calibrate_cascade(val["edge"], val["cloud"], val["labels"], target=c["target"], value=c["value"],
                            temperature_scaling=c["temperature_scaling"], n_bins=c["ece_bins"],
                            confidence_level=c["confidence_level"])
    cal["edge_backend"] = "onnxruntime (int8)" if use_onnx else "torch"
    from components.data.prepare import load_report

    args = serve_args(p, PROMOTED, calibration=cal, prepared_report=load_report(PREPARED))
    threshold = args["threshold"]
    # The same rule on the test split, image by image as the served app computes it: what the served
    # cascade must answer (models/serve/replay.json; benchmarks/serve.py checks the app against it).
    replay = _test_replay(p, files, edge_model, edge_onnx, cal, threshold, args["model_version"])
    cal["test"] = _cascade_figures(replay, cal, threshold, c["ece_bins"])
    args["calibration"] = cal
    card = _model_card(p, files, cal)
    args["model_card"] = card
    if SERVE_DIR.exists():
        shutil.rmtree(SERVE_DIR)
    if args.get("drift"):  # reference statistics of the training inputs: GET /drift compares with them
        write_json(Path(args["drift"]["reference"]), _drift_reference(p, Path(files["full"])))
    config = build_serve_config(args, host=p("serve.host"), port=p("serve.port"))  # checks the files it names
    write_json(SERVE_DIR / "calibration.json", cal)
    from components.registry.card import card_markdown

    write_json(SERVE_DIR / "model_card.json", card)
    (SERVE_DIR / "MODEL_CARD.md").write_text(card_markdown(card))
    write_serve_config(SERVE_DIR / "serve_config.yaml", config)
    write_json(SERVE_DIR / "replay.json", {k: v for k, v in replay.items() if not isinstance(v, np.ndarray)})
    if edge_onnx is not None:  # what `resops edge` runs on a device: the int8 model and its calibration
        write_edge_bundle(SERVE_DIR / "edge", edge_onnx, edge_model, args, cal)
    metrics = {"threshold": float(threshold), "target": c["target"], "target_value": c["value"],
               "confidence_level": c["confidence_level"],
               "edge_temperature": cal["edge"]["temperature"], "cloud_temperature": cal["cloud"]["temperature"],
               "edge_ece_before": cal["edge"]["ece_before"], "edge_ece_after": cal["edge"]["ece_after"],
               "cloud_ece_before": cal["cloud"]["ece_before"], "cloud_ece_after": cal["cloud"]["ece_after"],
               "val_escalation_rate": cal["threshold"]["escalation_rate"],
               "val_cascade_accuracy": cal["threshold"]["cascade_accuracy"],
               "val_cloud_accuracy": cal["threshold"]["cloud_accuracy"], **{f"test_{k}": v for k, v in cal["test"].items()
                                                                           if k not in ("n", "threshold")}}
    write_json(METRICS / "serve.json", metrics)
    say(f"calibrate: edge T={cal['edge']['temperature']:.2f} (ECE {cal['edge']['ece_before']:.3f} -> "
         f"{cal['edge']['ece_after']:.3f}), cloud T={cal['cloud']['temperature']:.2f}; threshold {threshold:.3f} "
         f"({c['target']} {c['value']}): val escalation {cal['threshold']['escalation_rate']:.2f}; test cascade "
         f"accuracy {cal['test']['cascade_accuracy']:.3f} vs cloud {cal['test']['cloud_accuracy']:.3f}, "
         f"{1 - cal['test']['escalation_rate']:.0%} answered at the edge")
    return metrics


def report(p: Params) -> dict:
    """The evaluation's HTML page (reports/report/index.html, readable offline): metrics with bootstrap
    intervals, curves, the cascade, confusion matrices, Grad-CAM grids, GAN samples or scalograms when
    the pipeline made them, and the model card."""
    from components.data.prepare import load_report
    from components.evaluate.report import write_report

    train = read_json(METRICS / "train.json") or {}
    path = write_report(REPORT_DIR, evaluation=REPORTS / "evaluation.json", plots_dir=PLOTS,
                        prepared_report=load_report(PREPARED), promoted=read_json(PROMOTED / "model.json"),
                        calibration=read_json(SERVE_DIR / "calibration.json"),
                        model_card=read_json(SERVE_DIR / "model_card.json"),
                        model_name=str(p("model.name")) + (f", selected epoch {train['selected_epoch']}"
                                                           if train.get("selected_epoch") else ""),
                        extra_pictures=_extra_pictures(p))
    say(f"report: {path} ({len(list(REPORT_DIR.iterdir()))} files; open it in a browser, no network needed)")
    return {"report": str(path)}


def _extra_pictures(p: Params) -> dict:
    """The report's pictures of the data: the prepared inputs per class (CWT scalograms for EEG), and the
    GAN's samples beside real images when a generator was trained."""
    pictures = {("Scalograms per class (EEG, CWT)" if p("data.dataset") in EEG_DATASETS else
                 "Training images per class"): PREPARED / "samples.png"}
    if (read_json(GAN_DIR / "gan.json") or {}).get("enabled"):
        pictures["GAN samples per class: real (left) and generated (right)"] = GAN_REPORTS / "samples.png"
    return pictures
