"""Cross-domain few-label transfer on real ELPV: pre-train on one cell type, fine-tune on a few labels of the other.

ELPV's cells are monocrystalline ("mono") or polycrystalline ("poly"); the type is in the
``cell_type`` field of the prepared manifest's ``attrs``. Per seed:

1. pre-train ``--model`` (resnet18) on every training image of the source type (default mono,
   oversampled as params.yaml's `rebalance`) for ``--pretrain-epochs``;
2. take ``--target-images`` (default 100) labelled images of the target type's training split
   (stratified on the label, seeded) and train on them for ``--epochs``, once fine-tuning from
   the source model (``pretrained=<its model.pt>``, ``--freeze-backbone-epochs``,
   ``--backbone-lr-scale``) and once from scratch: same images, oversampling, epochs, batch size,
   learning rate and augmentation;
3. evaluate on the target type's test images: both models, and the source model zero-shot
   (and, for reference, the source model on the source type's test images).

The split is the prepared ELPV split (seed 42) for both tasks; validation during training uses
the val images of the type being trained on; the reported model is the last epoch's.

    python benchmarks/transfer.py [--source mono] [--target poly] [--task 4class|binary]
        [--target-images 100] [--pretrain-epochs 6] [--epochs 15] [--seeds 42]
        [--freeze-backbone-epochs 0] [--backbone-lr-scale 0.1] [--with-ceiling] [--out FILE]

Prints a Markdown table and writes benchmarks/results/transfer.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # benchmarks/common.py (also puts the repository root on sys.path)
from common import (HEADLINE, ONLINE_POLICY, RAY_INIT, RAY_RESOURCES, REBALANCE_DEFAULTS, RESULTS, SPLIT_SEED,
                    TRAIN_DEFAULTS, class_names, elpv_frame, environment_info, evaluate_model_file, fmt_mean_std,
                    headline, label_counts, markdown_table, mean_std, parse_ints, prepared_elpv,
                    rebalanced_train_shards, say, start_ray, stop_ray, stratified_subset, train_config, train_model,
                    write_json, write_split_shards)
from components.models import create_model, list_models, load_pretrained

CELL_TYPES = ("mono", "poly")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="mono", choices=CELL_TYPES)
    ap.add_argument("--target", default="poly", choices=CELL_TYPES)
    ap.add_argument("--task", default="4class", choices=("4class", "binary"))
    ap.add_argument("--model", default="resnet18", choices=list_models())
    ap.add_argument("--target-images", type=int, default=100, help="labelled target training images (stratified)")
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=15, help="epochs of both fine-tuning and training from scratch")
    ap.add_argument("--freeze-backbone-epochs", type=int, default=0, help="fine-tuning: head-only epochs first")
    ap.add_argument("--backbone-lr-scale", type=float, default=0.1, help="fine-tuning: backbone lr = lr x this")
    ap.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    ap.add_argument("--oversample-ratio", type=float, default=REBALANCE_DEFAULTS["target_ratio"],
                    help="random oversampling of every training set to this x majority; 0 = none")
    ap.add_argument("--max-source-images", type=int, default=None, help="subset of the source training images (smoke)")
    ap.add_argument("--with-ceiling", action="store_true",
                    help="also train from scratch on all target training images (same epochs), as a reference")
    ap.add_argument("--seeds", default="42", help="comma-separated; each seed: pre-training, subset, both arms")
    ap.add_argument("--work", default=None,
                    help="work dir: prepared ELPV is cached there and each run's shards and models kept; "
                         "default a temp dir")
    ap.add_argument("--out", default=str(RESULTS / "transfer.json"))
    return ap


class Runs:
    """Training and test runs of one benchmark run: the shared settings, run directory and evaluation shards."""

    def __init__(self, args: argparse.Namespace, names: list[str], run_dir: Path, eval_dirs: dict, sampler: str,
                 ratio: float):
        self.args, self.names, self.run_dir, self.eval_dirs = args, names, run_dir, eval_dirs
        self.sampler, self.ratio = sampler, ratio

    def train(self, name: str, rows, val_type: str, epochs: int, seed: int, **kw) -> dict:
        args, run_dir = self.args, self.run_dir
        shards = rebalanced_train_shards(rows, run_dir / f"{name}-s{seed}-train", len(self.names), seed=seed,
                                         sampler=self.sampler, target_ratio=self.ratio)
        say(f"{name}, seed {seed}: {len(rows)} images {shards['counts_before']} -> {shards['counts_after']}, "
            f"{epochs} epochs")
        cfg = train_config(args.model, self.names, args.image_size, epochs, seed, batch_size=args.batch_size,
                           lr=args.lr, **kw)
        tr = train_model(cfg, run_dir / f"{name}-s{seed}-train", self.eval_dirs[("val", val_type)],
                         run_dir / f"{name}-s{seed}.pt", run_dir / "ray-storage")
        return {**tr, "train_data": {k_: v for k_, v in shards.items() if k_ != "dir"}, "epochs": epochs,
                "config": {k_: cfg[k_] for k_ in ("lr", "freeze_backbone_epochs", "backbone_lr_scale",
                                                   "pretrained")}}

    def test(self, model_path: str, cell_type: str) -> dict:
        return evaluate_model_file(model_path, self.eval_dirs[("test", cell_type)], "test")


def run_seed(runs: Runs, by: dict, seed: int) -> dict:
    """Pre-training on the source type, then scratch and fine-tuned (and the ceiling) on the target type."""
    args = runs.args
    src, tgt = args.source, args.target
    rec: dict = {"seed": seed}
    source_rows = stratified_subset(by[("train", src)], args.max_source_images, seed)
    pre = runs.train(f"pretrain-{src}", source_rows, src, args.pretrain_epochs, seed)
    source_model = str(Path(pre["model_path"]).resolve())
    rec["source_pretrain"] = {**pre, "test_source": runs.test(source_model, src),
                              "test_target_zero_shot": runs.test(source_model, tgt)}
    subset = stratified_subset(by[("train", tgt)], args.target_images, seed)
    rec["target_subset"] = {"images": len(subset), "label_counts": label_counts(subset),
                            "paths": subset["path"].tolist()}
    # The pretrained file is checked here, before any worker, as the train stage does.
    report = load_pretrained(create_model(args.model, len(runs.names), 1), source_model, in_chans=1)
    rec["transfer_report"] = {"loaded": len(report.loaded), "adapted": report.adapted,
                              "reinitialised": report.reinitialised, "ignored": report.ignored}
    scratch = runs.train(f"scratch-{tgt}{len(subset)}", subset, tgt, args.epochs, seed)
    rec["scratch"] = {**scratch, "test_target": runs.test(scratch["model_path"], tgt)}
    fine = runs.train(f"finetune-{src}-{tgt}{len(subset)}", subset, tgt, args.epochs, seed,
                      pretrained=source_model, freeze_backbone_epochs=args.freeze_backbone_epochs,
                      backbone_lr_scale=args.backbone_lr_scale)
    rec["finetune"] = {**fine, "test_target": runs.test(fine["model_path"], tgt)}
    if args.with_ceiling:
        ceil = runs.train(f"scratch-{tgt}-all", by[("train", tgt)], tgt, args.epochs, seed)
        rec["ceiling"] = {**ceil, "test_target": runs.test(ceil["model_path"], tgt)}
    for arm in ("scratch", "finetune", "ceiling"):
        if arm in rec:
            m = rec[arm]["test_target"]
            say(f"seed {seed} {arm}: {tgt} test accuracy {m['accuracy']:.3f}, balanced "
                f"{m['balanced_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
    return rec


def summarise(args: argparse.Namespace, per_seed: list[dict], by: dict) -> tuple[list[str], list[list], dict]:
    """The table's headers and rows and the JSON summary, one entry per arm."""
    src, tgt = args.source, args.target
    n_sub = per_seed[0]["target_subset"]["images"]
    arms = [  # (label, where the metrics are, where the training record is)
        (f"source {src} model on {src} test (in-domain reference)", ("source_pretrain", "test_source"),
         "source_pretrain"),
        (f"source {src} model zero-shot on {tgt} test", ("source_pretrain", "test_target_zero_shot"), None),
        (f"from scratch, {n_sub} {tgt} images", ("scratch", "test_target"), "scratch"),
        (f"fine-tuned from {src}, {n_sub} {tgt} images", ("finetune", "test_target"), "finetune"),
    ]
    if args.with_ceiling:
        arms.append((f"from scratch, all {len(by[('train', tgt)])} {tgt} training images (ceiling)",
                     ("ceiling", "test_target"), "ceiling"))
    headers = ["arm", "train images", "epochs", "test images", "accuracy", "balanced acc.", "macro-F1",
               "train wall (s)"]
    rows, summary = [], {}
    for label, (key, metrics_key), train_key in arms:
        ms = [r[key][metrics_key] for r in per_seed]
        trs = [r[train_key] for r in per_seed] if train_key else None
        summary[label] = {m: mean_std([x[m] for x in ms]) for m in HEADLINE}
        summary[label]["test_images"] = ms[0]["num_samples"]
        summary[label]["majority_rate"] = ms[0]["majority_rate"]
        images, epochs, wall = "none (source model)", "-", "-"
        if trs:
            summary[label]["train_wall_seconds"] = mean_std([t["wall_seconds"] for t in trs])
            td = trs[0]["train_data"]
            images = f"{sum(td['counts_before'].values())} ({td['rows']} after oversampling)"
            epochs, wall = str(trs[0]["epochs"]), fmt_mean_std([t["wall_seconds"] for t in trs], 0)
        rows.append([label, images, epochs, str(ms[0]["num_samples"]),
                     *[fmt_mean_std([x[m] for x in ms]) for m in HEADLINE], wall])
    return headers, rows, summary


def run_settings(args: argparse.Namespace, names: list[str], seeds: list[int], sampler: str, ratio: float) -> dict:
    """The settings block of the JSON."""
    return {"dataset": "elpv", "task": args.task, "class_names": names, "split_seed": SPLIT_SEED,
            "source": args.source, "target": args.target, "model": args.model, "target_images": args.target_images,
            "pretrain_epochs": args.pretrain_epochs, "epochs": args.epochs,
            "freeze_backbone_epochs": args.freeze_backbone_epochs,
            "backbone_lr_scale": args.backbone_lr_scale, "lr": args.lr, "image_size": args.image_size,
            "batch_size": args.batch_size, "oversampling": {"sampler": sampler, "target_ratio": ratio},
            "online_augmentation": ONLINE_POLICY, "max_source_images": args.max_source_images,
            "with_ceiling": args.with_ceiling, "seeds": seeds,
            "train_recipe": {k_: v for k_, v in train_config(args.model, names, args.image_size, args.epochs,
                                                             seeds[0]).items()
                             if k_ in ("weight_decay", "label_smoothing", "shuffle_buffer",
                                       "threads_per_worker", "class_weights")},
            "ray_resources": RAY_RESOURCES, "ray_init": RAY_INIT,
            "scratch_arm": "same images, epochs, lr, oversampling and augmentation; no pretrained weights, "
                           "no freezing, backbone_lr_scale 1.0",
            "model_selection": "weights after the last epoch (no early stopping); test images used once"}


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    if args.source == args.target:
        ap.error("--source and --target must be different cell types")
    seeds = parse_ints(args.seeds, "--seeds")
    sampler = "random_over" if args.oversample_ratio > 0 else "none"
    ratio = args.oversample_ratio if args.oversample_ratio > 0 else 1.0
    src, tgt = args.source, args.target
    common.setup_environment()
    env = environment_info()

    with tempfile.TemporaryDirectory(prefix="resops-bench-transfer-") as tmp:
        work = Path(args.work or tmp)
        prepared = prepared_elpv(work, args.task, SPLIT_SEED)
        names = class_names(prepared)
        frame = elpv_frame(prepared)
        run_dir = work / f"transfer-{time.strftime('%Y%m%d-%H%M%S')}"
        by = {(s, t): frame[(frame["split"] == s) & (frame["cell_type"] == t)] for s in ("train", "val", "test")
              for t in CELL_TYPES}
        data = {f"{s}/{t}": label_counts(f) for (s, t), f in by.items()}
        say("images per split/cell type (label counts): " + "; ".join(f"{key} {v}" for key, v in data.items()))
        eval_dirs = {(s, t): write_split_shards(by[(s, t)], run_dir / f"{s}-{t}") for s in ("val", "test")
                     for t in (src, tgt)}
        runs = Runs(args, names, run_dir, eval_dirs, sampler, ratio)

        start_ray()
        per_seed = []
        try:
            for seed in seeds:
                per_seed.append(run_seed(runs, by, seed))
        finally:
            stop_ray()

    headers, rows, summary = summarise(args, per_seed, by)
    gain = {m: mean_std([r["finetune"]["test_target"][m] - r["scratch"]["test_target"][m] for r in per_seed])
            for m in HEADLINE}
    env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"\nELPV {args.task}, {src} -> {tgt}, {args.model} at {args.image_size}x{args.image_size}, batch "
          f"{args.batch_size}, lr {args.lr}; pre-training {args.pretrain_epochs} epochs, target training "
          f"{args.epochs} epochs; fine-tuning: freeze_backbone_epochs {args.freeze_backbone_epochs}, backbone_lr_scale "
          f"{args.backbone_lr_scale}; oversampling {sampler} {ratio}; seeds {seeds} (mean ± std); "
          f"{tgt} test majority rate {per_seed[0]['scratch']['test_target']['majority_rate']:.3f}; "
          f"torch {env['torch']}, ray {env['ray']}\n")
    print(markdown_table(headers, rows))
    print("\nfine-tuned minus scratch (paired by seed): " +
          ", ".join(f"{m} {fmt_mean_std(gain[m]['values'])}" for m in HEADLINE))
    result = {
        "benchmark": "transfer",
        "settings": run_settings(args, names, seeds, sampler, ratio),
        "data": {"label_counts_by_split_and_cell_type": data},
        "environment": env,
        "summary": summary,
        "finetune_minus_scratch": gain,
        "per_seed": [_compact(r) for r in per_seed],
    }
    write_json(args.out, result)


def _compact(rec: dict) -> dict:
    """A per-seed record for the JSON: metrics without model paths in the temp dir."""
    out = {}
    for key, value in rec.items():
        if isinstance(value, dict) and "model_path" in value:
            value = {k: (headline(v) | {"per_class": v["per_class"], "confusion_matrix": v["confusion_matrix"],
                                        "roc_auc_ovr": v["roc_auc_ovr"]}) if k.startswith("test") else v
                     for k, v in value.items() if k != "model_path"}
        out[key] = value
    return out


if __name__ == "__main__":
    main()
