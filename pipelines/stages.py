"""One thin function per DVC stage: read params, call components, write the stage's outs.

The artifact layout (documented in the README) lives here and nowhere else.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path, PurePosixPath

import pandas as pd

from components.progress import bar
from pipelines.params import Params
from pipelines.runtime import init_ray

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
AUGMENTED = Path("data/augmented")
REBALANCED = Path("data/rebalanced")
GAN_DIR = Path("models/gan")
GAN_REPORTS = Path("reports/gan")
TRAIN_MODEL = Path("models/train/model.pt")
PRUNE_DIR = Path("models/prune")
REGISTRY = Path("models/registry.json")
PROMOTED = Path("models/promoted")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports/evaluation")
REPORT_DIR = Path("reports/report")
SERVE_DIR = Path("models/serve")


def _read_json(path: Path) -> dict | None:
    """A stage output's JSON, or None when the pipeline did not write it."""
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def say(msg: str) -> None:
    print(f"[resops] {msg}", flush=True)


# ------------------------------------------------------------------------------ data
def ingest(p: Params) -> dict:
    from components.data.sources import get_source

    name = p("data.dataset")
    if name in EEG_DATASETS:
        return _ingest_eeg(p, name)
    source = get_source(name)
    if RAW.exists():
        shutil.rmtree(RAW)
    opts = {"folder": dict(p("data.folder")), "synthetic": dict(p("data.synthetic"), seed=p("seed"))}.get(name, {})
    source.ingest(RAW / name, **opts)
    n = sum(1 for f in (RAW / name).rglob("*") if f.is_file())
    say(f"ingest: {n} raw files of dataset {name!r} in {RAW / name}")
    return {"dataset": name, "files": n}


def prepare(p: Params) -> dict:
    from components.data.prepare import prepare_dataset

    name = p("data.dataset")
    if name in EEG_DATASETS:
        return _prepare_eeg(p, name)
    res = prepare_dataset(RAW / name, PREPARED, name, p("data.task"), in_chans=p("data.in_chans"),
                          test_size=p("data.test_size"), val_size=p("data.val_size"), seed=p("seed"),
                          skip_corrupt=p("data.skip_corrupt"), rows_per_shard=p("data.rows_per_shard"),
                          max_image_pixels=p("data.max_image_pixels"), extra=_extra_folders(p))
    say(f"prepare: {res.report['num_prepared']} images, {len(res.report['corrupt'])} corrupt, "
         f"counts {res.report['counts']}; examples per class in {PREPARED / 'samples.png'}")
    return res.report


EXTRA = Path("data/extra")


def _extra_folders(p: Params) -> list[str]:
    """``data.extra``: folders under data/extra (the prepare stage's DVC dep, so adding or correcting an
    image re-runs prepare and what follows)."""
    folders = [str(f) for f in (p("data.extra") or [])]
    for f in folders:
        if EXTRA.resolve() not in Path(f).resolve().parents:
            raise ValueError(f"data.extra: {f} is not under {EXTRA}/: put it there (`resops feedback export --to "
                             f"{EXTRA}/<name>`) so DVC sees when it changes")
    return folders


# EEG recordings become CWT scalogram images in prepare; every later stage is the image pipeline's.
EEG_DATASETS = ("bonn_eeg", "eeg_synthetic", "eeg_edf")


def _ingest_eeg(p: Params, name: str) -> dict:
    from components.data.eeg import ingest_bonn, synthetic_bonn, write_bonn_layout

    e = p("data.eeg")
    if RAW.exists():
        shutil.rmtree(RAW)
    dest = RAW / name
    if name == "eeg_synthetic":
        sy = e["synthetic"]
        write_bonn_layout(dest, synthetic_bonn(int(sy["n_per_set"]), length=int(e["length"]), fs=float(e["fs"]),
                                               seed=p("seed")))
    elif name == "bonn_eeg":
        ingest_bonn(dest, e["path"])
    else:
        if not e["path"] or not Path(e["path"]).is_dir():
            raise FileNotFoundError(f"data.eeg.path must be a folder of <class>/<file>.edf recordings, got {e['path']!r}")
        shutil.copytree(e["path"], dest)
    n = sum(1 for f in dest.rglob("*") if f.is_file())
    say(f"ingest: {n} raw EEG files of dataset {name!r} in {dest}")
    return {"dataset": name, "files": n}


def _prepare_eeg(p: Params, name: str) -> dict:
    from components.data.eeg import read_bonn, read_edf_folder
    from components.data.eeg_prepare import prepare_eeg

    e = p("data.eeg")
    if p("data.in_chans") != 1:
        raise ValueError("EEG scalograms are grayscale: set data.in_chans: 1")
    if name == "eeg_edf":
        # EDF recordings are long: cut into windows here, grouped by recording for the split.
        ds = read_edf_folder(RAW / name, channel=e["channel"], window=int(e["window"]), overlap=0)
        window, overlap = int(e["window"]), 0
    else:
        ds = read_bonn(RAW / name, p("data.task"), length=int(e["length"]), fs=float(e["fs"]),
                       skip_malformed=p("data.skip_corrupt"))
        window, overlap = int(e["window"]), int(e["overlap"])
    init_ray(p)
    res = prepare_eeg(ds, PREPARED, dataset=name, task=p("data.task"), window=window, overlap=overlap,
                      reassemble_per_class=int(e["reassemble_per_class"]), parts=int(e["parts"]), cwt=dict(e["cwt"]),
                      test_size=p("data.test_size"), val_size=p("data.val_size"), seed=p("seed"),
                      rows_per_shard=p("data.rows_per_shard"), use_ray=True,
                      cpus_per_task=p("augment.cpus_per_task"))
    r = res.report
    say(f"prepare: {r['num_recordings']} EEG recordings -> {r['num_prepared']} scalograms ({window}-sample windows, "
         f"overlap {overlap}, {sum(r['reassembled'].values())} reassembled), counts {r['counts']}; "
         f"examples in {r['examples']}")
    return r


def augment(p: Params) -> dict:
    """Offline augmentation of the training split on Ray Data; originals plus ``offline_copies`` copies."""
    from components.data.shards import read_shards, write_shards
    from components.train.trainer import augment_batch

    train = read_shards(PREPARED / "shards", split="train")
    parts = [train]
    copies = int(p("augment.offline_copies"))
    if copies > 0 and p("augment.policy") not in (None, "none"):
        init_ray(p)  # only when there is work for Ray Data
        import ray.data

        ds = ray.data.from_pandas(train).map_batches(
            augment_batch, batch_format="numpy", batch_size=64, num_cpus=p("augment.cpus_per_task"),
            fn_kwargs=dict(policy=p("augment.policy"), output="png", copies=copies, seed=p("seed"),
                           in_chans=p("data.in_chans"), max_pixels=p("data.max_image_pixels")))
        parts.append(ds.to_pandas().sort_values("path", kind="stable"))
    out = pd.concat(parts, ignore_index=True)
    write_shards(out, AUGMENTED / "shards", p("data.rows_per_shard"))
    report = {"policy": p("augment.policy"), "offline_copies": copies, "rows_in": len(train), "rows_out": len(out)}
    write_json(AUGMENTED / "augment.json", report)
    say(f"augment: {len(train)} training images -> {len(out)} rows (policy {p('augment.policy')}, {copies} copies)")
    return report


def gan(p: Params) -> dict:
    """Train the class-conditional GAN on the real training split when ``rebalance.strategy`` uses it.

    Otherwise the stage only records that no generator is in use (DVC still needs its outs), so
    the default pipeline pays nothing for it.
    """
    from components.data.prepare import load_report
    from components.data.shards import read_shards
    from components.rebalance import parse_strategy

    shutil.rmtree(GAN_DIR, ignore_errors=True)
    shutil.rmtree(GAN_REPORTS, ignore_errors=True)
    GAN_DIR.mkdir(parents=True)
    GAN_REPORTS.mkdir(parents=True)
    if "gan" not in parse_strategy(p("rebalance.strategy")):
        report = {"enabled": False, "reason": f"rebalance.strategy {p('rebalance.strategy')!r} does not use gan"}
        write_json(GAN_DIR / "gan.json", report)
        write_json(METRICS / "gan.json", report)
        (GAN_REPORTS / "README.txt").write_text("No GAN: rebalance.strategy does not use it.\n")
        from components.data.images import save_class_grid
        from components.data.prepare import load_report
        from components.data.shards import read_shards

        # the picture `dvc plots show` lists under GAN samples: what a generator would be judged against
        save_class_grid(read_shards(PREPARED / "shards", split="train"), load_report(PREPARED)["class_names"],
                        GAN_REPORTS / "samples.png", title=f"no generator ({report['reason']}): real training "
                        "images per class", in_chans=p("data.in_chans"), seed=p("seed"),
                        max_pixels=p("data.max_image_pixels"))
        say(f"gan: skipped ({report['reason']})")
        return report

    from components.rebalance.gan import generate, save_sample_grid, train_gan
    from components.rebalance.quality import check_quality, quality_report

    prep = load_report(PREPARED)
    real = read_shards(PREPARED / "shards", split="train")
    g = p("gan")
    init_ray(p)
    res = train_gan(real, GAN_DIR, image_size=g["image_size"], in_chans=p("data.in_chans"),
                    num_classes=len(prep["class_names"]), class_names=prep["class_names"], epochs=g["epochs"],
                    batch_size=g["batch_size"], lr=g["lr"], lr_d=g["lr_d"], betas=tuple(g["betas"]), loss=g["loss"],
                    z_dim=g["z_dim"], base_channels=g["base_channels"], d_steps=g["d_steps"], seed=p("seed"),
                    num_workers=g["num_workers"], cpus_per_worker=g["cpus_per_worker"],
                    threads_per_worker=g["threads_per_worker"], keep_checkpoints=g["keep_checkpoints"],
                    storage_path=g["storage_path"], max_pixels=p("data.max_image_pixels"), precision=g["precision"])
    grid = save_sample_grid(res.generator_path, real, GAN_REPORTS / "samples.png", seed=p("seed"))
    q = g["quality"]
    fakes = generate(res.generator_path, {k: int(q["samples_per_class"]) for k in range(len(prep["class_names"]))},
                     seed=p("seed") + 1)
    quality = quality_report(real, fakes, num_classes=len(prep["class_names"]), image_size=q["image_size"],
                             in_chans=p("data.in_chans"), epochs=q["epochs"], seed=p("seed"),
                             threads=p("train.threads_per_worker"))
    report = {"enabled": True, "generator": str(res.generator_path), "version": res.version, "epochs": len(res.history),
              "last_epoch": res.history[-1] if res.history else None, "samples": str(grid), "quality": quality}
    write_json(GAN_DIR / "gan.json", report)
    write_json(METRICS / "gan.json", {k: v for k, v in report.items() if k != "last_epoch"})
    say(f"gan: generator {res.version[:12]} after {len(res.history)} epochs; Frechet distance {quality['fd']:.2f} "
         f"(real held-out {quality['fd_real_holdout']:.2f}); samples in {grid}")
    # A generator that produces garbage fails the stage here, before its rows reach training.
    check_quality(quality, max_fd=q["max_fd"], min_class_accuracy=q["min_class_accuracy"],
                  max_fd_ratio=q["max_fd_ratio"], min_relative_class_accuracy=q["min_relative_class_accuracy"])
    return report


def rebalance(p: Params) -> dict:
    from components.data.prepare import load_report
    from components.data.shards import read_shards, write_shards
    from components.rebalance import parse_strategy, rebalance_frame

    num_classes = len(load_report(PREPARED)["class_names"])
    strategy = parse_strategy(p("rebalance.strategy"))
    generator = GAN_DIR / "generator.pt" if "gan" in strategy else None
    res = rebalance_frame(read_shards(AUGMENTED / "shards"), num_classes, strategy=strategy,
                          target_ratio=p("rebalance.target_ratio"), class_weight=p("rebalance.class_weight"),
                          seed=p("seed"), generator=generator, gan_size=p("rebalance.gan_size"),
                          smote_size=p("rebalance.smote.size"), smote_k_neighbors=p("rebalance.smote.k_neighbors"),
                          in_chans=p("data.in_chans"), max_pixels=p("data.max_image_pixels"))
    write_shards(res.frame.sample(frac=1.0, random_state=p("seed")), REBALANCED / "shards", p("data.rows_per_shard"))
    report = {"strategy": "+".join(res.strategy), "target_ratio": p("rebalance.target_ratio"),
              "counts_before": res.counts_before, "counts_after": res.counts_after, "added": res.added,
              "class_weights": res.class_weights, "generator_version": res.generator_version}
    write_json(REBALANCED / "rebalance.json", report)
    say(f"rebalance ({report['strategy']}): {res.counts_before} -> {res.counts_after}, "
         f"class weights {res.class_weights}")
    return report


# ----------------------------------------------------------------------------- model
def train(p: Params) -> dict:
    from components.data.prepare import load_report
    from components.train import fit
    from components.train.precision import describe as describe_precision

    prep = load_report(PREPARED)
    weights = json.loads((REBALANCED / "rebalance.json").read_text())["class_weights"]
    cfg = {
        "model_name": p("model.name"),
        "model_kwargs": dict(p("model.kwargs") or {}) | ({"head": p("model.head")} if p("model.head") != "softmax" else {}),
        "num_classes": len(prep["class_names"]), "class_names": prep["class_names"], "in_chans": p("data.in_chans"),
        "image_size": p("model.image_size"), "epochs": p("train.epochs"), "batch_size": p("train.batch_size"),
        "lr": p("train.lr"), "weight_decay": p("train.weight_decay"), "label_smoothing": p("train.label_smoothing"),
        "shuffle_buffer": p("train.shuffle_buffer"), "class_weights": weights,
        "threads_per_worker": p("train.threads_per_worker"), "seed": p("seed"), "wandb": dict(p("wandb")),
        "freeze_backbone_epochs": p("train.freeze_backbone_epochs"), "backbone_lr_scale": p("train.backbone_lr_scale"),
        "pretrained": None, "precision": p("train.precision"), "data_cache": p("train.data_cache"),
        "schedule": p("train.schedule"), "warmup": p("train.warmup"), "budget_minutes": p("train.budget_minutes"),
        "ema_decay": p("train.ema_decay"), "mix": dict(p("train.mix")),
    }
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
        decision = tune_model_file(TRAIN_MODEL, _batches(p, PREPARED / "shards", "val", None, meta, 128),
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


def record_training(res, t0: float, **extra) -> dict:
    """metrics/train.json (the last epoch, epochs run, the epoch resumed from, wall time, run name and
    ``extra``) and plots/train_history.csv (one row per epoch) of a ``fit`` result; returns the summary."""
    summary = {**{k: v for k, v in res.history[-1].items() if k != "start_epoch"}, "epochs_run": len(res.history),
               "resumed_from_epoch": max(h["start_epoch"] for h in res.history), "wall_seconds": time.time() - t0,
               "run_name": PurePosixPath(str(res.run_dir)).name, **extra}
    write_json(METRICS / "train.json", summary)
    PLOTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(res.history).to_csv(PLOTS / "train_history.csv", index=False)
    return summary


def _batches(p: Params, shards: Path, split: str | None, policy: str | None, meta: dict, batch_size: int):
    from components.train import image_dataset

    init_ray(p)
    ds = image_dataset(shards, split, policy=policy, image_size=meta["image_size"], in_chans=meta["in_chans"],
                       seed=p("seed") if policy else None, cpus_per_task=p("augment.cpus_per_task"),
                       max_pixels=p("data.max_image_pixels"), batch_size=batch_size)
    import torch

    return ds.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64})


def _finetune(p: Params, model, meta: dict, teacher, epochs: int, label: str) -> list[dict]:
    """Short fine-tune of a compressed model on the rebalanced training set, distilled from
    ``teacher`` (the full model) when ``prune.distill.enabled``."""
    import torch

    from components.prune import DistillationLoss, finetune_epoch
    from components.train.precision import resolve_precision

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
        batches = _batches(p, REBALANCED / "shards", None, p("augment.policy") if p("augment.online") else None,
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
    """Compress the trained model into the edge model: unstructured (sparse file) or structured
    (channel-pruned, really faster) pruning, fine-tuned with optional distillation, optionally
    exported to int8 ONNX. ``models/prune/edge.json`` records what was applied."""
    import torch

    from components.models import load_model
    from components.prune import make_permanent, sparsity_report

    torch.manual_seed(p("seed"))
    torch.set_num_threads(p("train.threads_per_worker"))
    if PRUNE_DIR.exists():
        shutil.rmtree(PRUNE_DIR)
    PRUNE_DIR.mkdir(parents=True)
    teacher, meta = load_model(TRAIN_MODEL)
    teacher = teacher.eval().to(memory_format=torch.channels_last)
    model, _ = load_model(TRAIN_MODEL)
    model = model.to(memory_format=torch.channels_last)
    method = p("prune.method")
    dense_size = TRAIN_MODEL.stat().st_size
    report: dict = {"method": method, "distill": dict(p("prune.distill")), "file_bytes_full": dense_size}
    finetune: list[dict] = []
    if method == "unstructured":
        from components.models.checkpoint import save_sparse
        from components.prune import magnitude_step, sparsity_schedule

        include_fc = p("prune.include_fc")
        before = sparsity_report(model, include_fc)
        reached = 0.0
        for target in sparsity_schedule(p("prune.sparsity"), p("prune.steps")):
            magnitude_step(model, reached, target, scope=p("prune.scope"), include_fc=include_fc)
            model = model.to(memory_format=torch.channels_last)
            reached = target
            finetune += _finetune(p, model, meta, teacher, p("prune.finetune_epochs"), f"sparsity {target:.2f}")
        make_permanent(model)
        after = sparsity_report(model, include_fc)
        meta = dict(meta, pruning={"method": "magnitude_unstructured", "scope": p("prune.scope"),
                                   "sparsity": p("prune.sparsity"), "steps": p("prune.steps"), "include_fc": include_fc})
        edge_file = save_sparse(PRUNE_DIR / "model.npz", model, meta)
        report.update(requested_sparsity=p("prune.sparsity"), measured_sparsity=after["target_sparsity_measured"],
                      params=after["params"], nonzero_params_before=before["nonzero_params"],
                      nonzero_params_after=after["nonzero_params"])
        say(f"prune: sparsity {after['target_sparsity_measured']:.3f} ({p('prune.scope')}, {p('prune.steps')} step(s)), "
             f"non-zero params {before['nonzero_params']} -> {after['nonzero_params']}")
    elif method == "structured":
        from components.models.checkpoint import save_structured
        from components.prune import structured_prune

        st = p("prune.structured")
        example = torch.zeros(1, meta["in_chans"], meta["image_size"], meta["image_size"])
        res = structured_prune(model, example, target=st["target"], ratio=st["ratio"], importance=st["importance"],
                               global_pruning=st["global_pruning"], seed=p("seed"))
        say("prune: " + res.summary().replace("\n", "\n[resops] "))
        model = model.to(memory_format=torch.channels_last)
        finetune += _finetune(p, model, meta, teacher, p("prune.finetune_epochs"), f"structured {st['ratio']}")
        edge_file = save_structured(PRUNE_DIR / "model.pt", model, meta, res)
        report.update(structured=res.as_dict(), params=res.params_after, macs_before=res.macs_before,
                      macs_after=res.macs_after)
    elif method == "none":
        edge_file = PRUNE_DIR / "model.pt"
        shutil.copy2(TRAIN_MODEL, edge_file)
    else:
        raise ValueError(f"prune.method must be unstructured, structured or none, got {method!r}")
    report.update(edge_file=edge_file.name, file_bytes_edge=edge_file.stat().st_size,
                  size_ratio=edge_file.stat().st_size / dense_size, finetune=finetune)
    q = p("prune.quantize")
    if q["enabled"]:
        from components.prune import export_onnx, quantize_onnx

        edge_model, edge_meta = load_model(edge_file)  # exactly what was saved
        onnx_float = export_onnx(edge_model, PRUNE_DIR / "model.onnx", edge_meta["image_size"], edge_meta["in_chans"])
        calib = _batches(p, PREPARED / "shards", "train", None, edge_meta, 32)
        qr = quantize_onnx(onnx_float, PRUNE_DIR / "model.int8.onnx", ({"image": b["image"].numpy()} for b in calib),
                           per_channel=q["per_channel"], reduce_range=q["reduce_range"],
                           max_images=q["calibration_images"])
        report.update(onnx_file="model.onnx", int8_file="model.int8.onnx", file_bytes_onnx=qr.float_bytes,
                      file_bytes_int8=qr.int8_bytes)
        say(f"prune: int8 ONNX {qr.float_bytes / 1e6:.1f} MB -> {qr.int8_bytes / 1e6:.1f} MB, calibrated on "
             f"{q['calibration_images']} training images")
    write_json(PRUNE_DIR / "edge.json", report)
    write_json(METRICS / "prune.json", report)
    say(f"prune: edge model {edge_file} ({method}), file {dense_size / 1e6:.1f} MB -> "
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
    from components.evaluate.tta import tta_proba
    from components.models import load_model

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
        batches = bar(_batches(p, PREPARED / "shards", "test", None, meta, p("evaluate.batch_size")),
                      desc=f"evaluate ({name})", unit="batch")
        if name == "int8":
            from components.prune import OnnxClassifier

            onnx = OnnxClassifier(path, threads=p("train.threads_per_worker"))
            ys, ps = [], []
            for b in batches:
                ps.append(tta_proba(onnx.predict_proba, b["image"].numpy(), tta))
                ys.append(b["label"].numpy())
            import numpy as np

            y, proba = np.concatenate(ys), np.concatenate(ps)
        else:
            model, _ = load_model(path)
            y, proba = predict_dataset(model.to(memory_format=torch.channels_last), batches, tta=tta)
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

            grid = _batches(p, PREPARED / "shards", "test", None, meta, p("evaluate.batch_size"))
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


def _split_logits(p: Params, split: str, cloud_path: Path, edge_path: Path, edge_onnx: Path | None):
    """Logits of the cloud (full) and edge tier models on a split, exactly as the tiers compute them."""
    import numpy as np
    import torch

    from components.models import load_model

    cloud, meta = load_model(cloud_path)
    edge, _ = load_model(edge_path)
    cloud, edge = (m.eval().to(memory_format=torch.channels_last) for m in (cloud, edge))
    onnx = None
    if edge_onnx is not None:
        from components.prune import OnnxClassifier

        onnx = OnnxClassifier(edge_onnx, threads=p("train.threads_per_worker"))
    out = {"cloud": [], "edge": [], "labels": []}
    with torch.inference_mode():
        for b in bar(_batches(p, PREPARED / "shards", split, None, meta, p("evaluate.batch_size")),
                     desc=f"calibrate ({split})", unit="batch"):
            x = b["image"].contiguous(memory_format=torch.channels_last)
            out["cloud"].append(cloud(x).float().numpy())
            out["edge"].append(onnx.logits(b["image"].numpy()) if onnx is not None else edge(x).float().numpy())
            out["labels"].append(b["label"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _drift_reference(p: Params, cloud_path: Path) -> dict:
    """Drift reference of the promoted cloud model: the training split's input histograms and embeddings,
    null levels from the validation split (components.feedback.reference)."""
    import torch

    from components.feedback.reference import drift_reference
    from components.models import load_model

    model, meta = load_model(cloud_path)
    model = model.eval().to(memory_format=torch.channels_last)
    d, bs = p("serve.drift"), p("evaluate.batch_size")
    batches = {split: bar(_batches(p, PREPARED / "shards", split, None, meta, bs), desc=f"drift reference ({split})",
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
                      evaluation=_read_json(METRICS / "evaluate.json"), calibration=cal,
                      prune=_read_json(METRICS / "prune.json"), train=_read_json(METRICS / "train.json"),
                      git_revision=git_revision())


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

    from components.evaluate.calibration import calibrate_cascade, expected_calibration_error, softmax
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
    # The same rule on the test split: what the served cascade should reach on unseen images.
    test = _split_logits(p, "test", Path(files["full"]), edge_model, edge_onnx)
    pe = softmax(test["edge"], cal["edge"]["temperature"])
    pc = softmax(test["cloud"], cal["cloud"]["temperature"])
    y = test["labels"]
    escalate = pe.max(1) < threshold
    pred = np.where(escalate, pc.argmax(1), pe.argmax(1))
    from components.evaluate.plots import cascade_rows, reliability_rows, write_points

    bins = c["ece_bins"]
    write_points(PLOTS / "reliability.json", [
        *reliability_rows(softmax(test["edge"]), y, "edge, raw (T=1)", bins),
        *reliability_rows(pe, y, f"edge, scaled (T={cal['edge']['temperature']:.2f})", bins),
        *reliability_rows(softmax(test["cloud"]), y, "cloud, raw (T=1)", bins),
        *reliability_rows(pc, y, f"cloud, scaled (T={cal['cloud']['temperature']:.2f})", bins)])
    write_points(PLOTS / "cascade.json", cascade_rows(pe.max(1), pe.argmax(1), pc.argmax(1), y, "test split"))
    cal["test"] = {"n": int(len(y)), "threshold": float(threshold), "escalation_rate": float(escalate.mean()),
                   "cascade_accuracy": float((pred == y).mean()), "edge_accuracy": float((pe.argmax(1) == y).mean()),
                   "cloud_accuracy": float((pc.argmax(1) == y).mean()),
                   "edge_ece": float(expected_calibration_error(pe, y, c["ece_bins"])),
                   "cloud_ece": float(expected_calibration_error(pc, y, c["ece_bins"]))}
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

    train = _read_json(METRICS / "train.json") or {}
    path = write_report(REPORT_DIR, evaluation=REPORTS / "evaluation.json", plots_dir=PLOTS,
                        prepared_report=load_report(PREPARED), promoted=_read_json(PROMOTED / "model.json"),
                        calibration=_read_json(SERVE_DIR / "calibration.json"),
                        model_card=_read_json(SERVE_DIR / "model_card.json"),
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
    if (_read_json(GAN_DIR / "gan.json") or {}).get("enabled"):
        pictures["GAN samples per class: real (left) and generated (right)"] = GAN_REPORTS / "samples.png"
    return pictures


STAGES = {f.__name__: f for f in (ingest, prepare, augment, gan, rebalance, train, prune, evaluate, promote,
                                  calibrate, report)}
