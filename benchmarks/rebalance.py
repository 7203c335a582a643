"""Rebalancing ablation on ELPV 4-class: each strategy of components.rebalance under one model and one training budget.

Same data for every strategy: the prepared ELPV split (seed 42), its training split rebalanced
with ``rebalance_frame(strategy=...)`` (the function the pipeline's rebalance stage calls), then
the same model (``--model`` resnet18), image size, epochs, batch size and optimiser (params.yaml's
train recipe) and the same augmentation: no offline augmented copies, online ``industrial``
augmentation in training (real and synthetic rows alike). Strategies (``--strategies``, comma
separated; combine with ``+``; ``@R`` sets that entry's target ratio):

* ``none`` - the training split as it is;
* ``class_weight`` - balanced loss weights (n / (k n_c)), rows untouched;
* ``random_over`` - small classes repeated up to 0.35 x the majority (params.yaml), ``random_over@1.0`` fully;
* ``random_under`` - large classes cut to at most minority / 0.35;
* ``smote`` - SMOTE images (64 x 64 pixel features, params.yaml ``rebalance.smote``) up to 0.35 x majority;
* ``gan`` - images of a class-conditional GAN up to 0.35 x majority, resized to the training size.

The GAN is trained once per run (not per seed; ``--gan-epochs`` at ``--gan-image-size``, the
other settings from params.yaml ``gan``) on the real training rows; its sample grid goes next to
the JSON (``<out stem>_gan_samples.png``) and its offline quality report
(``components.rebalance.quality``) into the JSON. Each seed drives the resampling (which rows are
repeated or dropped, which SMOTE/GAN images are made) and the training (initialisation,
augmentation). Reports test accuracy, balanced accuracy, macro-F1, MCC and per-class recall,
mean and std over seeds.

    python benchmarks/rebalance.py [--strategies none,class_weight,...] [--epochs 6] [--image-size 64]
        [--seeds 42,43,44] [--target-ratio 0.35] [--gan-epochs 60] [--gan-image-size 32]
        [--max-train-images N] [--work DIR] [--out FILE] [--resume EARLIER.json]

Prints a Markdown table and writes benchmarks/results/rebalance.json (and, when a strategy uses
the GAN, benchmarks/results/rebalance_gan_samples.png).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import common  # benchmarks/common.py (also puts the repository root on sys.path)
from common import (ONLINE_POLICY, RAY_INIT, RAY_RESOURCES, RESULTS, ROOT, SPLIT_SEED, TRAIN_DEFAULTS, class_names,
                    elpv_frame, environment_info, evaluate_model_file, fmt_mean_std, headline, label_counts,
                    markdown_table, mean_std, parse_ints, prepared_elpv, say, start_ray, stop_ray, stratified_subset,
                    train_config, train_model)
from components.data.images import DEFAULT_MAX_PIXELS
from components.data.shards import write_shards
from components.models import list_models
from components.rebalance import OVER_SAMPLERS, STRATEGIES, parse_strategy, rebalance_frame

DEFAULT_STRATEGIES = "none,class_weight,random_over,random_over@1.0,random_under,smote,gan"
DEFAULT_TARGET_RATIO = 0.35  # params.yaml rebalance.target_ratio
# params.yaml at the time of writing, fixed here (as common.TRAIN_DEFAULTS) so the benchmark does not
# change when someone edits params.yaml; every value goes into the JSON.
SMOTE_DEFAULTS = dict(size=64, k_neighbors=5)  # rebalance.smote
GAN_DEFAULTS = dict(batch_size=64, lr=2e-4, lr_d=2e-4, betas=(0.0, 0.9), loss="hinge", z_dim=128, base_channels=32,
                    d_steps=1, num_workers=1, cpus_per_worker=1.0, threads_per_worker=2,
                    precision="fp32")  # gan.* but epochs and size; fp32 as the committed results were measured
QUALITY_DEFAULTS = dict(samples_per_class=64, image_size=32, epochs=8)  # gan.quality
QUALITY_GATES = dict(max_fd=None, max_fd_ratio=None, min_class_accuracy=None, min_relative_class_accuracy=None)
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "mcc")
RESAMPLERS = ("random_under", *OVER_SAMPLERS)  # the steps that use target_ratio


# ---------------------------------------------------------------------------- strategies
def parse_target_ratio(text: str) -> float | dict:
    """``0.35`` or a JSON object ``{"likely_defective": 0.5, ...}`` (class names or indices)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"--target-ratio must be a number or a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--target-ratio must be a number or a JSON object, got {text!r}")
    return value


def parse_specs(text: str, default_ratio: float | dict) -> list[dict]:
    """``"none,random_over,random_over@1.0,random_under+gan"`` -> one entry per item.

    An item is a strategy of ``components.rebalance`` (combined with ``+``), optionally ``@R``:
    a scalar target ratio for that item instead of ``--target-ratio``.
    """
    specs, seen = [], set()
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        name, at, ratio_text = item.partition("@")
        steps = parse_strategy(name)  # ValueError on unknown names
        resamples = any(s in RESAMPLERS for s in steps)
        if at and not resamples:
            raise ValueError(f"{item!r}: a target ratio only applies to {RESAMPLERS}")
        ratio = (float(ratio_text) if at else default_ratio) if resamples else None
        label = "+".join(steps) + (f"@{ratio_text}" if at else "")
        if label in seen:
            raise ValueError(f"--strategies lists {label!r} twice")
        seen.add(label)
        specs.append({"label": label, "strategy": "+".join(steps), "steps": list(steps), "target_ratio": ratio,
                      "class_weight": "balanced" if "class_weight" in steps else "none"})
    if not specs:
        raise ValueError("--strategies needs at least one strategy")
    return specs


def rebalanced_shards(train, out: Path, num_classes: int, spec: dict, seed: int, generator: Path | None,
                      image_size: int, smote: dict) -> dict:
    """The training rows rebalanced by ``spec`` with ``rebalance_frame`` (as the rebalance stage calls it)
    and written shuffled; GAN rows resized to the training size."""
    cols = [c for c in train.columns if c not in ("cell_type", "probability")]
    t0 = time.perf_counter()
    res = rebalance_frame(train[cols], num_classes, strategy=spec["steps"],
                          target_ratio=spec["target_ratio"] if spec["target_ratio"] is not None else 1.0,
                          class_weight="none", seed=seed, generator=generator if "gan" in spec["steps"] else None,
                          gan_size=image_size, smote_size=smote["size"], smote_k_neighbors=smote["k_neighbors"],
                          in_chans=1)
    seconds = time.perf_counter() - t0
    write_shards(res.frame.sample(frac=1.0, random_state=seed), out, rows_per_shard=512)
    sources = res.frame["source"].fillna("real").value_counts() if "source" in res.frame else None
    return {"rows": len(res.frame), "counts_before": res.counts_before, "counts_after": res.counts_after,
            "added": res.added, "class_weights": res.class_weights, "generator_version": res.generator_version,
            "rows_by_source": {str(k): int(v) for k, v in sources.items()} if sources is not None else None,
            "rebalance_seconds": seconds}


# ---------------------------------------------------------------------------------- GAN
def train_generator(real, names: list[str], work: Path, grid_path: Path, image_size: int, epochs: int,
                    seed: int) -> dict:
    """One GAN on the real training rows (Ray must be running), its sample grid and quality report."""
    from components.rebalance.gan import generate, save_sample_grid, train_gan
    from components.rebalance.quality import quality_report

    real = real[[c for c in real.columns if c not in ("cell_type", "probability")]]
    say(f"training the GAN on {len(real)} real training images: {epochs} epochs at {image_size}px")
    t0 = time.perf_counter()
    from components.config import GanConfig, section

    cfg = section(GanConfig, dict(GAN_DEFAULTS, image_size=image_size, epochs=epochs, max_failures=0, keep_checkpoints=1,
                                  storage_path=str(work / "gan-storage"), quality=dict(QUALITY_DEFAULTS, **QUALITY_GATES)))
    res = train_gan(real, work / "gan", cfg, in_chans=1, num_classes=len(names), class_names=names, seed=seed,
                    max_pixels=DEFAULT_MAX_PIXELS, run_name=f"bench-gan-{time.time_ns()}")
    train_seconds = time.perf_counter() - t0
    shutil.rmtree(res.run_dir, ignore_errors=True)
    epoch_seconds = sum(h["seconds"] for h in res.history)
    say(f"GAN {res.version[:12]}: {len(res.history)} epochs in {train_seconds:.0f} s wall "
        f"({epoch_seconds:.0f} s in the epochs, the rest Ray Train start-up and export)")
    t1 = time.perf_counter()
    grid = save_sample_grid(res.generator_path, real, grid_path, seed=seed)
    q = QUALITY_DEFAULTS
    fakes = generate(res.generator_path, {k: q["samples_per_class"] for k in range(len(names))}, seed=seed + 1)
    quality = quality_report(real, fakes, num_classes=len(names), image_size=q["image_size"], in_chans=1,
                             epochs=q["epochs"], seed=seed, threads=TRAIN_DEFAULTS["threads_per_worker"])
    quality_seconds = time.perf_counter() - t1
    fd, base = quality["fd"], quality["fd_real_holdout"]
    say(f"GAN quality: Frechet distance {fd if fd is None else round(fd, 2)} (real held-out vs real: "
        f"{base if base is None else round(base, 2)}), classifier accuracy on generated images per class "
        f"{quality['class_accuracy']} (held-out real: {quality['real_holdout_class_accuracy']}); "
        f"sample grid {grid} ({quality_seconds:.0f} s)")
    return {"generator_path": str(res.generator_path), "version": res.version,
            "settings": {"image_size": image_size, "epochs": epochs, "seed": seed, **GAN_DEFAULTS,
                         "betas": list(GAN_DEFAULTS["betas"]), "trained_on": "real training rows of the run "
                         "(after --max-train-images), once per run; generated rows resized to the training size"},
            "train_wall_seconds": train_seconds, "epoch_seconds_total": epoch_seconds,
            "seconds_per_epoch": epoch_seconds / max(1, len(res.history)), "history": res.history,
            "sample_grid": str(grid), "quality_settings": dict(QUALITY_DEFAULTS, seed=seed, generated_seed=seed + 1),
            "quality": quality, "quality_seconds": quality_seconds}


# -------------------------------------------------------------------------------- output
def versions() -> dict:
    import imblearn
    import numpy
    import pandas
    import sklearn

    out = {"numpy": numpy.__version__, "pandas": pandas.__version__, "scikit-learn": sklearn.__version__,
           "imbalanced-learn": imblearn.__version__}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def summarise(runs: list[dict], names: list[str]) -> dict:
    agg = {k: mean_std([r["test"][k] for r in runs]) for k in METRICS}
    agg["recall"] = {n: mean_std([r["test_per_class"][n]["recall"] for r in runs]) for n in names}
    agg["train_wall_seconds"] = mean_std([r["train_wall_seconds"] for r in runs])
    return agg


def table(specs: list[dict], results: dict, names: list[str]) -> str:
    headers = ["strategy", "rows after", "accuracy", "balanced acc", "macro-F1", "MCC",
               *[f"recall {n}" for n in names]]
    rows = []
    for spec in specs:
        runs = results[spec["label"]]["runs"]
        if not runs:
            continue
        sizes = sorted({r["data"]["rows"] for r in runs})
        counts = runs[0]["data"]["counts_after"]
        counts = {int(k): v for k, v in counts.items()}  # runs read back from JSON (--resume) have str keys
        rows_cell = "/".join(map(str, sizes)) + " (" + "/".join(str(counts.get(i, 0)) for i in range(len(names))) + ")"
        rows.append([spec["label"], rows_cell, *[fmt_mean_std([r["test"][k] for r in runs]) for k in METRICS],
                     *[fmt_mean_std([r["test_per_class"][n]["recall"] for r in runs]) for n in names]])
    return markdown_table(headers, rows)


def write_quiet(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                    help=f"comma-separated; each one of {STRATEGIES} or a '+' combination, optionally @RATIO "
                         "(e.g. random_over@1.0, random_under+gan)")
    ap.add_argument("--target-ratio", default=str(DEFAULT_TARGET_RATIO),
                    help="target ratio of the resampling strategies without @RATIO: a number, or a JSON object "
                         "per class as params.yaml allows")
    ap.add_argument("--model", default="resnet18", choices=list_models())
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    ap.add_argument("--seeds", default="42,43,44", help="comma-separated; each seed: resampling and training")
    ap.add_argument("--max-train-images", type=int, default=None,
                    help="stratified subset of the training split before rebalancing and GAN training (smoke runs)")
    ap.add_argument("--smote-size", type=int, default=SMOTE_DEFAULTS["size"], help="SMOTE pixel feature size")
    ap.add_argument("--gan-epochs", type=int, default=60,
                    help="params.yaml gan.epochs; ~2 s per epoch at 32 px on 2 cores (full training split)")
    ap.add_argument("--gan-image-size", type=int, default=32, help="power of two")
    ap.add_argument("--gan-seed", type=int, default=SPLIT_SEED)
    ap.add_argument("--work", default=None,
                    help="work dir: prepared ELPV is cached there and each run's models and generator kept; "
                         "default a temp dir")
    ap.add_argument("--out", default=str(RESULTS / "rebalance.json"))
    ap.add_argument("--resume", default=None, metavar="JSON",
                    help="an earlier result (a .partial.json too) of the same settings: its runs are kept, its "
                         "generator is reused when its file still exists, and only the missing seed x strategy "
                         "runs are trained")
    ap.add_argument("--samples-png", default=None,
                    help="GAN sample grid; default <out dir>/<out stem>_gan_samples.png")
    return ap


def run_settings(args: argparse.Namespace, specs: list[dict], seeds: list[int], names: list[str],
                 smote: dict) -> dict:
    """The settings block of the JSON (also what ``--resume`` compares)."""
    return {
        "dataset": "elpv", "task": "4class", "split_seed": SPLIT_SEED, "model": args.model,
        "epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch_size, "seeds": seeds,
        "max_train_images": args.max_train_images, "strategies": specs,
        "default_target_ratio": parse_target_ratio(args.target_ratio), "smote": smote,
        "train_recipe": {k: v for k, v in train_config(args.model, names, args.image_size, args.epochs, seeds[0],
                                                       batch_size=args.batch_size).items()
                         if k not in ("model_name", "seed", "wandb", "class_names", "class_weights")},
        "class_weights": "balanced for strategies with class_weight, none otherwise",
        "augmentation": {"offline_augmented_copies": 0, "online_policy": ONLINE_POLICY,
                         "note": "no offline copies (params.yaml augment.offline_copies is not used, so "
                                 "rebalancing works on the real training rows only); the same online "
                                 f"'{ONLINE_POLICY}' augmentation in training for every strategy, applied to "
                                 "real and synthetic rows alike; none at validation/test"},
        "seed_use": "each seed: the resampling (rows repeated/dropped, SMOTE/GAN images drawn) and the training "
                    "(initialisation, augmentation, shuffling); the GAN itself is trained once per run",
        "budget": "the same number of epochs for every strategy: strategies with more rows also get more "
                  "optimiser steps (see steps_per_epoch per run)",
        "ray_resources": RAY_RESOURCES, "ray_init": RAY_INIT,
        "model_selection": "weights after the last epoch (no early stopping); test split used once per model",
    }


def resume_runs(ap: argparse.ArgumentParser, args: argparse.Namespace, result: dict, seeds: list[int],
                uses_gan: bool, train, grid_path: Path) -> Path | None:
    """Keep the runs (and the generator, when its file still exists) of ``--resume``; returns that generator."""
    settings = result["settings"]
    generator = None
    prev = json.loads(Path(args.resume).read_text())
    same = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  (tuples -> lists, as stored)
    differ = [k for k in settings if k != "seeds" and same(settings[k]) != prev["settings"].get(k)]
    if differ:
        ap.error(f"--resume {args.resume}: settings differ ({', '.join(differ)}); results would not compare")
    for label, r in prev["results"].items():
        result["results"][label]["runs"] = [run for run in r["runs"] if run["seed"] in seeds]
    if uses_gan and prev.get("gan") and Path(prev["gan"]["generator_path"]).exists():
        from components.rebalance.gan import save_sample_grid

        result["gan"] = prev["gan"]
        generator = Path(prev["gan"]["generator_path"])
        result["gan"]["sample_grid"] = str(save_sample_grid(generator, train, grid_path,
                                                            seed=prev["gan"]["settings"]["seed"]))
        say(f"reusing generator {prev['gan']['version'][:12]} of {args.resume}; samples {grid_path}")
    kept = sum(len(r["runs"]) for r in result["results"].values())
    result["resumed_from"] = {"file": str(args.resume), "runs_kept": kept, "environment": prev["environment"]}
    say(f"resuming {args.resume}: {kept} run(s) kept")
    return generator


def train_and_test(args: argparse.Namespace, spec: dict, seed: int, train, names: list[str], prepared: Path,
                   run_dir: Path, generator: Path | None, smote: dict) -> dict:
    """One strategy x seed: rebalanced shards, one training run, the test split once; the run's JSON entry."""
    label = spec["label"]
    shards = run_dir / f"train-{label.replace('+', '_').replace('@', '_r')}-s{seed}"
    data = rebalanced_shards(train, shards, len(names), spec, seed, generator, args.image_size, smote)
    say(f"{label}, seed {seed}: {data['counts_before']} -> {data['counts_after']} "
        f"({data['rows']} rows, {data['rebalance_seconds']:.1f} s), class weights "
        f"{data['class_weights']}; training {args.model} {args.epochs} epochs at {args.image_size}px")
    cfg = train_config(args.model, names, args.image_size, args.epochs, seed, batch_size=args.batch_size)
    cfg["class_weights"] = data["class_weights"]
    model_path = run_dir / f"{shards.name.removeprefix('train-')}.pt"
    tr = train_model(cfg, shards, prepared / "shards", model_path, run_dir / "ray-storage")
    shutil.rmtree(shards, ignore_errors=True)  # rebuilt from the seed on demand; ~0.1-0.2 GB each
    t0 = time.perf_counter()
    m = evaluate_model_file(tr["model_path"], prepared / "shards", "test")
    eval_seconds = time.perf_counter() - t0
    recalls = {n: round(m["per_class"][n]["recall"], 3) for n in names}
    say(f"{label} seed {seed}: test accuracy {m['accuracy']:.3f}, balanced "
        f"{m['balanced_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, MCC {m['mcc']:.3f}, "
        f"recall {recalls}; trained in {tr['wall_seconds']:.0f} s")
    return {
        "seed": seed, "data": data,
        "steps_per_epoch": -(-data["rows"] // args.batch_size),
        "train_wall_seconds": tr["wall_seconds"],
        "train_images_per_second_last_epoch": tr["train_images_per_second_last_epoch"],
        "eval_seconds": eval_seconds, "model_path": tr["model_path"] if args.work else None,
        "test": headline(m), "test_per_class": m["per_class"],
        "test_confusion_matrix": m["confusion_matrix"], "test_roc_auc_ovr": m["roc_auc_ovr"],
        "history": tr["history"]}


def run_all(args: argparse.Namespace, result: dict, specs: list[dict], seeds: list[int], train, names: list[str],
            prepared: Path, run_dir: Path, generator: Path | None, uses_gan: bool, grid_path: Path, smote: dict,
            partial: Path) -> None:
    """The GAN (unless resumed) and every missing seed x strategy run, each saved to ``partial`` as it ends."""
    start_ray()
    try:
        if uses_gan and generator is None:
            result["gan"] = train_generator(train, names, run_dir, grid_path, args.gan_image_size,
                                            args.gan_epochs, args.gan_seed)
            generator = Path(result["gan"]["generator_path"])
            write_quiet(partial, result)
        for seed in seeds:
            for spec in specs:
                label = spec["label"]
                if any(run["seed"] == seed for run in result["results"][label]["runs"]):
                    continue  # kept from --resume
                result["results"][label]["runs"].append(
                    train_and_test(args, spec, seed, train, names, prepared, run_dir, generator, smote))
                write_quiet(partial, result)
    finally:
        stop_ray()


def print_report(args: argparse.Namespace, result: dict, specs: list[dict], seeds: list[int], train,
                 names: list[str], env: dict) -> None:
    first = next(iter(result["results"].values()))["runs"][0]["test"]
    support = {n: v["support"] for n, v in next(iter(result["results"].values()))["runs"][0]["test_per_class"].items()}
    print(f"\nELPV 4-class, {args.model}, {args.epochs} epochs, {args.image_size}x{args.image_size} grayscale, batch "
          f"{args.batch_size}, training split {len(train)} images {label_counts(train)}; test split "
          f"{first['num_samples']} images {support} (majority rate {first['majority_rate']:.3f}); "
          f"online '{ONLINE_POLICY}' augmentation, no offline copies; torch {env['torch']}, ray {env['ray']}, "
          f"{env['cpus']} CPUs")
    if result["gan"]:
        g, q = result["gan"], result["gan"]["quality"]
        fd = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"GAN: {g['settings']['epochs']} epochs at {g['settings']['image_size']}px on the real training rows, "
              f"{g['train_wall_seconds']:.0f} s wall ({g['seconds_per_epoch']:.1f} s/epoch), once per run; "
              f"Frechet distance {fd(q['fd'])} (real held-out vs real: {fd(q['fd_real_holdout'])}); "
              f"samples {g['sample_grid']}")
    print("rows after: training rows per epoch (per class in class order); metrics on the test split, "
          f"mean ± std over seeds {seeds}; total {result['total_wall_seconds'] / 60:.1f} min.\n")
    print(table(specs, result["results"], names))


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    try:
        seeds = parse_ints(args.seeds, "--seeds")
        specs = parse_specs(args.strategies, parse_target_ratio(args.target_ratio))
    except ValueError as exc:
        ap.error(str(exc))
    out = Path(args.out)
    grid_path = Path(args.samples_png) if args.samples_png else out.with_name(f"{out.stem}_gan_samples.png")
    partial = out.with_name(f"{out.stem}.partial.json")
    smote = dict(SMOTE_DEFAULTS, size=args.smote_size)
    uses_gan = any("gan" in s["steps"] for s in specs)
    common.setup_environment()
    env = {**environment_info(), **versions()}
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="resops-bench-rebalance-") as tmp:
        work = Path(args.work or tmp)
        prepared = prepared_elpv(work, "4class", SPLIT_SEED)
        names = class_names(prepared)
        train = elpv_frame(prepared, "train")
        train = stratified_subset(train, args.max_train_images, SPLIT_SEED)
        run_dir = work / f"rebalance-{time.strftime('%Y%m%d-%H%M%S')}"
        say(f"training split: {len(train)} images {label_counts(train)}; strategies "
            f"{[s['label'] for s in specs]}; seeds {seeds}")

        settings = run_settings(args, specs, seeds, names, smote)
        result = {"benchmark": "rebalance", "complete": False, "settings": settings,
                  "data": {"class_names": names, "train_counts": label_counts(train), "train_images": len(train)},
                  "environment": env, "gan": None,
                  "results": {s["label"]: {"spec": s, "runs": []} for s in specs}}

        generator = None
        if args.resume:
            generator = resume_runs(ap, args, result, seeds, uses_gan, train, grid_path)
        run_all(args, result, specs, seeds, train, names, prepared, run_dir, generator, uses_gan, grid_path, smote,
                partial)

    for label, r in result["results"].items():
        r["test_mean_std"] = summarise(r["runs"], names)
    env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["total_wall_seconds"] = time.perf_counter() - t_start
    result["complete"] = True
    print_report(args, result, specs, seeds, train, names, env)
    common.write_json(out, result)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
