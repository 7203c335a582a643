"""ELPV accuracy: resops' presets against the plain single-file script, on the same split and machine.

    python benchmarks/accuracy.py                       # every main arm over seeds 42, 43, 44 (~3.3 h)
    python benchmarks/accuracy.py --arms plain@10,default --seeds 42
    python benchmarks/accuracy.py --arms ablation --seeds 42
    python benchmarks/accuracy.py --resume              # continue a partial result: finished runs are kept

Arms (``--arms``: names or the groups ``main``, ``short``, ``ablation``, ``all``):

* ``plain@M``: ``benchmarks/plain_baseline.py`` (torchvision ResNet18 from scratch, no resops), M minutes
  of training on the whole 75 % training split;
* ``quality``: the ``presets/quality.yaml`` recipe through resops' own stages (augment, gan, rebalance,
  train on Ray Train), its 30-minute training budget; ``default``: ``params.yaml`` as it is (what
  ``make run`` trains);
* ``abl:<step>``: the ablation, each step adding one recipe option to the previous, at a short budget;
* ``quality+KEY=VALUE[+KEY=VALUE...]`` (or ``default+...``): a variant of that arm with params.yaml keys
  changed (values parsed as YAML), e.g. ``quality+model.image_size=128``; run over ``--seeds`` like the
  arm it varies. Use it to try a recipe change before it goes into a preset.

Every resops arm runs the real stages (``resops run STAGE`` in a work directory of its own) on one
shared ``prepare`` output (split seed 42, whatever the training seed), selects its checkpoint on the
validation split only, and scores the test split once, with the arm's ``evaluate.tta``. Each finished
run is written to ``benchmarks/results/accuracy.json`` at once, so an interrupted benchmark loses at most
the run in progress; ``--resume`` skips the runs already there. Never run it beside another timing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from components.progress import bar  # noqa: E402
from pipelines.presets import load_preset, set_arguments  # noqa: E402
from benchmarks.common import (ROOT, RESULTS, environment_info, evaluate_model_file, fmt_mean_std, markdown_table,  # noqa: E402
                               mean_std, parse_ints, say, setup_environment, start_ray, stop_ray, write_json)

OUT = RESULTS / "accuracy.json"
WORK = ROOT / "benchmarks" / "work" / "accuracy"
RESOPS_STAGES = ("augment", "gan", "rebalance", "train")
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "mcc")

# The ablation: each step adds its overrides to all the previous ones (short budget, one seed). The
# first step is params.yaml's recipe given the same training time as the others.
ABLATION_MINUTES = 6
ABLATION = [
    ("abl:base", {"train.budget_minutes": ABLATION_MINUTES, "train.epochs": 1000}),
    ("abl:+128px", {"model.image_size": 128}),
    ("abl:+el", {"augment.policy": "el", "augment.offline_copies": 0}),
    ("abl:+ema+select", {"train.ema_decay": 0.998, "train.select_by": "val_macro_f1"}),
    ("abl:+tta+bias", {"evaluate.tta": "dihedral", "train.decision_bias": "macro_f1"}),
    ("abl:+ordinal", {"model.head": "ordinal"}),
]
GROUPS = {"main": ["plain@30", "quality", "plain@10", "default"], "short": ["plain@10", "default"],
          "ablation": [name for name, _ in ABLATION]}
GROUPS["all"] = GROUPS["main"] + GROUPS["ablation"]


def arm_overrides(arm: str) -> dict:
    base, _, changes = arm.partition("+")
    if changes and base in ("quality", "default"):
        import yaml

        merged = dict(arm_overrides(base))
        for change in changes.split("+"):
            key, eq, value = change.partition("=")
            if not eq or not key:
                raise ValueError(f"arm {arm!r}: {change!r} is not KEY=VALUE")
            merged[key] = yaml.safe_load(value)
        return merged
    if arm == "default":
        return {}
    if arm == "quality":
        return load_preset("quality")
    if arm.startswith("abl:"):
        names = [n for n, _ in ABLATION]
        if arm not in names:
            raise ValueError(f"unknown ablation step {arm!r}; known: {names}")
        merged: dict = {}
        for name, step in ABLATION[:names.index(arm) + 1]:
            merged.update(step)
        return merged
    raise ValueError(f"unknown arm {arm!r}")


def expand_arms(text: str) -> list[str]:
    arms: list[str] = []
    for part in [a for a in text.split(",") if a]:
        for arm in GROUPS.get(part, [part]):
            if arm not in arms:
                arms.append(arm)
    for arm in arms:
        if not arm.startswith("plain@"):
            arm_overrides(arm)  # fails now on an unknown arm, not after hours
    return arms


def shared_prepared(work: Path) -> Path:
    """ELPV ingested and prepared once with params.yaml's data settings (split seed 42)."""
    done = work / "shared" / "data" / "prepared" / "report.json"
    if not done.exists():
        shared = work / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "params.yaml", shared / "params.yaml")
        for stage in ("ingest", "prepare"):
            _resops(shared, stage, {})
    return work / "shared" / "data" / "prepared"


def _resops(cwd: Path, stage: str, overrides: dict) -> None:
    sets = set_arguments(overrides)
    cmd = [str(Path(sys.executable).parent / "resops"), *sets, "run", "--local", stage]
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
    log = cwd / "log.txt"
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}); see {log}")


def scaled(overrides: dict, scale: float) -> dict:
    """``--scale`` (smoke runs only): budgets times ``scale``; an epoch-based arm trains one epoch."""
    if scale == 1.0:
        return overrides
    out = dict(overrides)
    if out.get("train.budget_minutes"):
        out["train.budget_minutes"] = out["train.budget_minutes"] * scale
    else:
        out["train.epochs"] = 1
    return out


def run_resops(arm: str, seed: int, work: Path, scale: float = 1.0) -> dict:
    overrides = scaled({**arm_overrides(arm), "seed": seed}, scale)
    prepared = shared_prepared(work)
    run_dir = work / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in arm)}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "prepared").symlink_to(prepared)  # the one split; prepare never re-runs here
    shutil.copy2(ROOT / "params.yaml", run_dir / "params.yaml")
    t0 = time.perf_counter()
    for stage in RESOPS_STAGES:
        _resops(run_dir, stage, overrides)
    wall = time.perf_counter() - t0
    train = json.loads((run_dir / "metrics" / "train.json").read_text())
    from pipelines.params import load_params

    params = load_params(run_dir / "params.yaml", set_arguments(overrides)[1::2])
    tta = params("evaluate.tta")
    start_ray()
    model_file, threads = run_dir / "models" / "train" / "model.pt", params("train.threads_per_worker")
    val = evaluate_model_file(model_file, prepared / "shards", "val", threads=threads, tta=tta)
    metrics = evaluate_model_file(model_file, prepared / "shards", "test", threads=threads, tta=tta)
    stop_ray()
    result = {"system": "resops", "arm": arm, "seed": seed, "overrides": overrides, "tta": tta,
              "training_minutes": train["train_seconds"] / 60, "stages_wall_minutes": wall / 60,
              "epochs": train["epochs_run"], "selected_epoch": train.get("selected_epoch"),
              "images_per_second": train["images_per_second"], "precision": train["precision"],
              "decision_bias": train.get("decision_bias"),
              "validation": {k: float(val[k]) for k in METRIC_KEYS}, **_scores(metrics)}
    shutil.rmtree(run_dir / "models" / "train" / "checkpoints", ignore_errors=True)
    return result


def _scores(m: dict) -> dict:
    """The reported figures of classification_metrics (test split)."""
    names = list(m["per_class"])
    out = {k: float(m[k]) for k in METRIC_KEYS}
    cm = [[int(v) for v in row] for row in m["confusion_matrix"]]
    k = len(cm)
    # binary: functional / possibly (classes 0, 1) against likely / defective (2, 3), as Deitsch et al.
    correct_binary = sum(cm[i][j] for i in range(k) for j in range(k) if (i >= k // 2) == (j >= k // 2))
    out["binary_accuracy"] = correct_binary / max(1, sum(map(sum, cm)))
    out["recall_per_class"] = {names[i]: m["per_class"][names[i]]["recall"] for i in range(k)}
    out["confusion_matrix"] = cm
    return out


def run_plain(minutes: float, seed: int) -> dict:
    from benchmarks.plain_baseline import run

    r = run(minutes=minutes, seed=seed)
    return {"system": "plain", "arm": f"plain@{minutes:g}", "seed": seed, "tta": "none",
            "training_minutes": r["train_minutes"], "epochs": r["epochs"], "images_per_second": r["images_per_s"],
            "precision": r["precision"], "image_size": r["image_size"],
            **{k: r[k] for k in (*METRIC_KEYS, "binary_accuracy")}, "recall_per_class": r["per_class_recall"]}


def summarise(runs: dict) -> dict:
    by_arm: dict[str, list[dict]] = {}
    for r in runs.values():
        by_arm.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, rs in by_arm.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        out[arm] = {"seeds": [r["seed"] for r in rs], "precision": sorted({r["precision"] for r in rs}),
                    **{k: mean_std([r[k] for r in rs]) for k in
                       (*METRIC_KEYS, "binary_accuracy", "training_minutes", "images_per_second")},
                    "recall_per_class": {c: mean_std([r["recall_per_class"][c] for r in rs])
                                         for c in rs[0]["recall_per_class"]}}
        if all("validation" in r for r in rs):
            out[arm]["validation"] = {k: mean_std([r["validation"][k] for r in rs]) for k in METRIC_KEYS}
    return out


def ablation_table(summary: dict) -> str:
    """Each step's validation figures (what the recipe choices were made on) and its test figures."""
    rows = []
    for arm, _ in ABLATION:
        if arm in summary:
            s = summary[arm]
            v = s.get("validation", {})
            rows.append([arm, f"{s['training_minutes']['mean']:.1f}",
                         *(f"{v[k]['mean']:.3f}" if k in v else "-" for k in ("accuracy", "balanced_accuracy", "macro_f1")),
                         *(f"{s[k]['mean']:.3f}" for k in ("accuracy", "balanced_accuracy", "macro_f1"))])
    return markdown_table(["step (adds to the previous)", "train min", "val acc.", "val bal. acc.", "val macro-F1",
                           "test acc.", "test bal. acc.", "test macro-F1"], rows)


def table(summary: dict) -> str:
    order = [a for a in GROUPS["all"] if a in summary] + [a for a in summary if a not in GROUPS["all"]]
    rows = []
    for arm in order:
        s = summary[arm]
        rows.append([arm, ",".join(map(str, s["seeds"])), f"{s['training_minutes']['mean']:.1f}",
                     "/".join(s["precision"]), f"{s['images_per_second']['mean']:.1f}",
                     *(fmt_mean_std(s[k]["values"]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "mcc",
                                                              "binary_accuracy"))])
    return markdown_table(["arm", "seeds", "train min", "precision", "img/s", "accuracy", "balanced acc.",
                           "macro-F1", "MCC", "binary acc."], rows)


def picture(runs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colours: dict[str, str] = {}
    for r in sorted(runs.values(), key=lambda r: r["arm"]):
        c = colours.setdefault(r["arm"], f"C{len(colours) % 10}")
        for ax, key in zip(axes, ("accuracy", "balanced_accuracy")):
            ax.scatter(r["training_minutes"], r[key], color=c, label=r["arm"], marker="o" if r["system"] == "resops" else "x")
    for ax, key, ref in zip(axes, ("accuracy", "balanced_accuracy"), ((0.824, "Deitsch SVM 0.824"), (None, ""))):
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel(f"test {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        if ref[0]:
            ax.axhline(ref[0], color="grey", ls="--", lw=1)
            ax.text(ax.get_xlim()[0], ref[0], ref[1], va="bottom", fontsize=8, color="grey")
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    axes[1].legend(uniq.values(), uniq.keys(), fontsize=8, loc="lower right")
    fig.suptitle("ELPV 4-class, test split (656 images): resops (o) vs plain script (x)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="main", help="comma list of arms or groups (main, short, ablation, all)")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--short-seeds", default="42", help="seeds of plain@10, default and the ablation")
    ap.add_argument("--resume", action="store_true", help="keep the finished runs of --out and run the rest")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--scale", type=float, default=1.0, help="smoke runs only: multiply every training budget")
    args = ap.parse_args()
    setup_environment()
    out, work = Path(args.out), Path(args.work)
    arms, seeds, short_seeds = expand_arms(args.arms), parse_ints(args.seeds), parse_ints(args.short_seeds, "--short-seeds")
    result = json.loads(out.read_text()) if args.resume and out.exists() else {}
    runs = result.get("runs", {})
    result.setdefault("environment_first_run", environment_info())
    todo = [(arm, seed) for arm in arms for seed in (seeds if arm == "plain@30" or arm.split("+")[0] == "quality" else short_seeds)]
    for arm, seed in bar(todo, desc="accuracy", unit="run"):
        key = f"{arm}|{seed}"
        if key in runs:
            say(f"{key}: kept from {out}")
            continue
        say(f"{key}: running")
        t0 = time.perf_counter()
        if arm.startswith("plain@"):
            r = run_plain(float(arm.split("@", 1)[1]) * args.scale, seed)
            r["arm"] = arm
        else:
            r = run_resops(arm, seed, work, args.scale)
        r["scale"] = args.scale
        r["environment"] = environment_info()
        r["wall_minutes"] = (time.perf_counter() - t0) / 60
        runs[key] = r
        result.update(benchmark="accuracy", dataset="elpv 4class, split seed 42 (test 656)", runs=runs,
                      summary=summarise(runs))
        write_json(out, result)
        say(f"{key}: accuracy {r['accuracy']:.3f}  balanced {r['balanced_accuracy']:.3f}  "
            f"macro-F1 {r['macro_f1']:.3f}  ({r['training_minutes']:.1f} training minutes)")
    if not runs:
        say("no runs")
        return
    result["summary"] = summarise(runs)
    result["picture"] = str(picture(runs, out.with_suffix(".png")))  # beside the JSON
    write_json(out, result)
    print(table(result["summary"]))
    if any(a in result["summary"] for a, _ in ABLATION):
        print(f"\nAblation ({ABLATION_MINUTES} minutes of training each, seed {short_seeds[0]}):")
        print(ablation_table(result["summary"]))


if __name__ == "__main__":
    main()
