"""Model-zoo ablation on ELPV 4-class: every registered ResNet18 variant under one fixed training budget.

Same data for every variant (the prepared ELPV split, seed 42; its training split randomly
oversampled to 0.35 x the majority class, as params.yaml's `rebalance`; online augmentation
`industrial`), same epochs, image size, batch size and optimiser (params.yaml's train recipe).
Reports, per variant: parameters, MACs at the training image size, CPU latency at batch 1 and
throughput at batch 32, test accuracy / balanced accuracy / macro-F1, training wall time.

    python benchmarks/models.py [--epochs 6] [--image-size 64] [--seeds 42] [--variants a,b]
                                [--max-train-images N] [--work DIR] [--out FILE]

Prints a Markdown table and writes benchmarks/results/models.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # benchmarks/common.py (also puts the repository root on sys.path)
from common import (ONLINE_POLICY, RAY_INIT, RAY_RESOURCES, REBALANCE_DEFAULTS, RESULTS, SPLIT_SEED, TRAIN_DEFAULTS,
                    class_names, elpv_frame, environment_info, evaluate_model_file, fmt_mean_std, headline,
                    label_counts, markdown_table, mean_std, model_cost, parse_ints, prepared_elpv,
                    rebalanced_train_shards, say, start_ray, stop_ray, stratified_subset, train_config, train_model,
                    write_json)
from components.models import list_models


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    ap.add_argument("--seeds", default="42", help="comma-separated training seeds (model init, augmentation)")
    ap.add_argument("--variants", default=",".join(list_models()), help=f"comma-separated, from {list_models()}")
    ap.add_argument("--max-train-images", type=int, default=None,
                    help="stratified subset of the training split before oversampling (smoke runs)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts for the latency/throughput measurement")
    ap.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 runs (>= 30) after 10 warm-up runs")
    ap.add_argument("--throughput-runs", type=int, default=20, help="timed batch-32 runs")
    ap.add_argument("--work", default=None,
                    help="work dir: prepared ELPV is cached there and each run's shards and models kept; "
                         "default a temp dir")
    ap.add_argument("--out", default=str(RESULTS / "models.json"))
    return ap


def train_variants(args: argparse.Namespace, variants: list[str], seeds: list[int], names: list[str],
                   prepared: Path, run_dir: Path) -> dict[str, list[dict]]:
    """Every variant x seed trained on the same shards and tested once; Ray stopped afterwards."""
    start_ray()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for variant in variants:
            for seed in seeds:
                say(f"training {variant}, seed {seed}, {args.epochs} epochs at {args.image_size}px")
                cfg = train_config(variant, names, args.image_size, args.epochs, seed, batch_size=args.batch_size)
                tr = train_model(cfg, run_dir / "train-shards", prepared / "shards",
                                 run_dir / f"{variant}-s{seed}.pt", run_dir / "ray-storage")
                m = evaluate_model_file(tr["model_path"], prepared / "shards", "test")
                say(f"{variant} seed {seed}: test accuracy {m['accuracy']:.3f}, balanced "
                    f"{m['balanced_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
                    f"trained in {tr['wall_seconds']:.0f} s")
                runs[variant].append({"seed": seed, **tr, "test": m})
    finally:
        stop_ray()  # the cost measurement below runs with no Ray process of ours alive
    return runs


def measure_variants(args: argparse.Namespace, variants: list[str], threads: list[int],
                     runs: dict[str, list[dict]]) -> dict:
    """Per variant: CPU cost of the first seed's model, test metrics over seeds and the per-seed records."""
    results = {}
    for variant in variants:
        say(f"measuring {variant} on the CPU ({threads} torch threads)")
        cost = model_cost(runs[variant][0]["model_path"], args.image_size, threads, args.latency_runs,
                          args.throughput_runs)
        agg = {k: mean_std([r["test"][k] for r in runs[variant]]) for k in ("accuracy", "balanced_accuracy",
                                                                           "macro_f1", "mcc")}
        agg["train_wall_seconds"] = mean_std([r["wall_seconds"] for r in runs[variant]])
        per_seed = [{"seed": r["seed"], "train_wall_seconds": r["wall_seconds"],
                     "train_images_per_second_last_epoch": r["train_images_per_second_last_epoch"],
                     "test": headline(r["test"]), "test_per_class": r["test"]["per_class"],
                     "test_confusion_matrix": r["test"]["confusion_matrix"],
                     "test_roc_auc_ovr": r["test"]["roc_auc_ovr"], "history": r["history"]}
                    for r in runs[variant]]
        results[variant] = {"cost": cost, "test_mean_std": agg, "runs": per_seed}
    return results


def print_report(args: argparse.Namespace, threads: list[int], results: dict, data: dict, env: dict) -> None:
    headers = ["variant", "params (M)", f"MMACs @{args.image_size}px",
               *[f"b1 ms {t}t" for t in threads], *[f"b32 img/s {t}t" for t in threads],
               "test acc", "bal. acc", "macro-F1", "train wall (s)", "seeds"]
    rows = []
    for variant, r in results.items():
        c, runs_v = r["cost"], r["runs"]
        rows.append([variant, f"{c['params'] / 1e6:.3f}", f"{c['macs'] / 1e6:.1f}",
                     *[f"{c['cpu'][str(t)]['latency_ms_median']:.2f}" for t in threads],
                     *[f"{c['cpu'][str(t)]['throughput_images_per_second_median']:.0f}" for t in threads],
                     fmt_mean_std([x["test"]["accuracy"] for x in runs_v]),
                     fmt_mean_std([x["test"]["balanced_accuracy"] for x in runs_v]),
                     fmt_mean_std([x["test"]["macro_f1"] for x in runs_v]),
                     fmt_mean_std([x["train_wall_seconds"] for x in runs_v], 0),
                     ",".join(str(x["seed"]) for x in runs_v)])
    majority = next(iter(results.values()))["runs"][0]["test"]["majority_rate"]
    print(f"\nELPV 4-class, {args.epochs} epochs, {args.image_size}x{args.image_size} grayscale, batch "
          f"{args.batch_size}, {data['rows']} training rows per epoch (oversampled), test split "
          f"{next(iter(results.values()))['runs'][0]['test']['num_samples']} images (majority rate {majority:.3f}); "
          f"torch {env['torch']}, ray {env['ray']}, {env['cpus']} CPUs")
    print(f"MACs: torch.utils.flop_counter.FlopCounterMode (FLOPs / 2, convolutions and linear layers only). "
          f"Latency: median of {args.latency_runs} batch-1 runs, throughput: median of {args.throughput_runs} "
          f"batch-32 runs, with {' and '.join(map(str, threads))} torch threads (1t = 1 thread), eval mode, "
          f"channels_last, inference_mode. "
          f"Metrics: mean ± std over seeds.\n")
    print(markdown_table(headers, rows))


def run_settings(args: argparse.Namespace, variants: list[str], seeds: list[int], threads: list[int],
                 names: list[str]) -> dict:
    """The settings block of the JSON."""
    return {"dataset": "elpv", "task": "4class", "split_seed": SPLIT_SEED, "epochs": args.epochs,
            "image_size": args.image_size, "batch_size": args.batch_size, "seeds": seeds,
            "variants": variants, "max_train_images": args.max_train_images,
            "train_recipe": {k: v for k, v in train_config(variants[0], names, args.image_size, args.epochs,
                                                            seeds[0], batch_size=args.batch_size).items()
                             if k not in ("model_name", "seed", "wandb", "class_names")},
            "rebalance": REBALANCE_DEFAULTS, "online_augmentation": ONLINE_POLICY,
            "offline_augmented_copies": 0, "ray_resources": RAY_RESOURCES, "ray_init": RAY_INIT,
            "latency": {"threads": threads, "runs": args.latency_runs, "warmup": 10,
                        "throughput_batch": 32, "throughput_runs": args.throughput_runs,
                        "mode": "eval, channels_last, torch.inference_mode, float32, after training with "
                                "Ray shut down, on the first seed's trained model"},
            "mac_counter": "torch.utils.flop_counter.FlopCounterMode; MACs = FLOPs / 2 (conv, linear)",
            "model_selection": "weights after the last epoch (no early stopping); test split used once"}


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    seeds = parse_ints(args.seeds, "--seeds")
    threads = parse_ints(args.threads, "--threads")
    variants = [v for v in args.variants.replace(" ", "").split(",") if v]
    unknown = sorted(set(variants) - set(list_models()))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list_models()}")
    common.setup_environment()
    env = environment_info()

    with tempfile.TemporaryDirectory(prefix="resops-bench-models-") as tmp:
        work = Path(args.work or tmp)
        prepared = prepared_elpv(work, "4class", SPLIT_SEED)
        names = class_names(prepared)
        train = elpv_frame(prepared, "train")
        train = stratified_subset(train, args.max_train_images, SPLIT_SEED)
        run_dir = work / f"models-{time.strftime('%Y%m%d-%H%M%S')}"
        data = rebalanced_train_shards(train, run_dir / "train-shards", len(names), seed=SPLIT_SEED)
        data["train_images_before_oversampling"] = len(train)
        say(f"training set: {len(train)} images {label_counts(train)} -> oversampled {data['counts_after']}")

        runs = train_variants(args, variants, seeds, names, prepared, run_dir)
        results = measure_variants(args, variants, threads, runs)

    env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print_report(args, threads, results, data, env)
    result = {
        "benchmark": "models",
        "settings": run_settings(args, variants, seeds, threads, names),
        "data": {**data, "class_names": names},
        "environment": env,
        "results": results,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
