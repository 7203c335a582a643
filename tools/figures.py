"""README tables rendered from the JSON the pipeline and the benchmarks wrote.

Each table sits in README.md between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``; this
script renders it from its source file (``metrics/*.json`` of the last ``dvc repro``, or
``benchmarks/results/*.json``) and writes it there, with a line naming the source, the model version
and the machine. ``--check`` writes nothing and exits 1 when a table in README.md differs from what
its JSON renders (tests/test_figures.py runs it), so a number edited by hand, or a JSON re-measured
without re-rendering, fails the tests.

The renderers of the training-recipe tables (AVX2 accuracy runs, ablation, model zoo, transfer,
rebalancing) are in tools/figures_training.py, those of the EEG, edge-model and detection tables in
tools/figures_edge.py; tests/test_figures.py also fails on a table of figures outside any block.

    python tools/figures.py           # re-render every table in README.md
    python tools/figures.py --check   # exit 1 and name the tables that are stale
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script (python tools/figures.py) or imported as tools.figures
from tools.figlib import load, markdown_table, mean_std, runs_source, source  # noqa: E402
from tools import figures_edge, figures_training  # noqa: E402

README = ROOT / "README.md"
ACCURACY_BF16 = "benchmarks/results/accuracy_bf16.json"
BLOCK = re.compile(r"(<!-- figures:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)


def _ci(m: dict, key: str) -> str:
    lo, hi = m["ci95"][key]
    return f"**{m[key]:.3f}** [{lo:.3f}, {hi:.3f}]"


def promoted_version_of(evaluate: dict) -> str | None:
    """The registry entry whose recorded test metrics are those of metrics/evaluate.json (None: no such entry)."""
    registry = load("models/registry.json")
    for entry in reversed(registry.get("entries", [])):
        m = entry.get("metrics", {})
        if all(abs(float(m.get(k, -1)) - float(evaluate["full"][k])) < 1e-6 for k in ("accuracy", "macro_f1")):
            return entry["version"]
    return None


def default_pipeline() -> str:
    ev = load("metrics/evaluate.json")
    full = ev["full"]
    rows = [["majority class", f"{full['majority_rate']:.3f}", f"{1 / len(full['per_class']):.3f}", "-", "0", "-"]]
    prune = load("metrics/prune.json")
    how = prune["method"]
    if prune.get("macs_before") and prune.get("macs_after"):
        how += f", MACs -{1 - prune['macs_after'] / prune['macs_before']:.0%}"
    if (prune.get("distill") or {}).get("enabled"):
        how += ", distilled"
    names = {"full": "resops full model (`models/train/model.pt`), the cloud tier",
             "pruned": f"resops edge model: {how} (`models/prune/{prune.get('edge_file', 'model.pt')}`)",
             "int8": "resops edge model, int8 ONNX (`models/prune/model.int8.onnx`), the edge tier"}
    for key in ("full", "pruned", "int8"):
        m = ev[key]
        auc = f"{m['roc_auc_ovr']:.3f}" if m.get("roc_auc_ovr") is not None else "-"
        rows.append([names[key], _ci(m, "accuracy"), _ci(m, "balanced_accuracy"), _ci(m, "macro_f1"),
                     f"{m['mcc']:.3f}", auc])
    version = promoted_version_of(ev)
    note = "" if version else " (**not** the promoted version: metrics/evaluate.json matches no registry entry)"
    table = markdown_table(["model", "accuracy", "balanced acc.", "macro-F1", "MCC", "ROC-AUC (OvR)"], rows)
    train = load("metrics/train.json")
    machine = f"on a CPU with torch capability {train.get('cpu_capability', '?')}, in {train.get('precision', '?')}"
    return (f"{table}\n\nSource: `metrics/evaluate.json` ({full['num_samples']} test images) of model "
            f"**{version or '?'}**{note}; trained {machine}. **One run** (one training seed): single runs of "
            f"this recipe move by about 0.02-0.03 between seeds.")


def default_pipeline_run() -> str:
    """The sentences about the default run that quote its figures: training, the edge tier against the
    full model, the calibrated cascade (metrics/train.json, evaluate.json, serve.json)."""
    ev, train, serve = load("metrics/evaluate.json"), load("metrics/train.json"), load("metrics/serve.json")
    full, int8, pruned = ev["full"], ev["int8"], ev["pruned"]
    lo, hi = full["ci95"]["accuracy"]
    rate = serve["test_escalation_rate"]
    return (f"Model **{promoted_version_of(ev) or '?'}** trained {train['epochs_run']} epochs in "
            f"{train['train_seconds'] / 60:.1f} min ({train['images_per_second']:.0f} img/s, {train['precision']}). "
            f"The 95 % interval of the full model's accuracy spans {hi - lo:.3f}: on this test split two recipes "
            f"closer than about +-{(hi - lo) / 2:.3f} cannot be told apart. The edge tier (int8 ONNX) scores "
            f"{int8['accuracy']:.3f} accuracy and {int8['balanced_accuracy']:.3f} balanced accuracy against the full "
            f"model's {full['accuracy']:.3f} and {full['balanced_accuracy']:.3f} (the pruned torch model "
            f"{pruned['accuracy']:.3f} and {pruned['balanced_accuracy']:.3f}). The calibrated cascade (threshold "
            f"{serve['threshold']:.3f}, `metrics/serve.json`) escalates {rate:.0%} of the test images, so the edge "
            f"answers {1 - rate:.0%}, and scores {serve['test_cascade_accuracy']:.3f} against "
            f"{serve['test_cloud_accuracy']:.3f} for the cloud alone.")


def accuracy_bf16() -> str:
    d = load(ACCURACY_BF16)
    s = d["summary"]
    names = {"plain@30": "plain script, 128 px", "quality": "resops `quality` preset",
             "plain@10": "plain script, 128 px", "default": "resops default (`params.yaml`)"}
    rows = []
    pairs = [("plain@30", "quality"), ("plain@10", "default")]
    for pair in pairs:
        for arm in pair:
            if arm not in s:
                continue
            other = s.get(pair[1] if arm == pair[0] else pair[0])
            cells = []
            for key in ("accuracy", "balanced_accuracy", "macro_f1", "mcc", "binary_accuracy"):
                better = other is None or s[arm][key]["mean"] >= other[key]["mean"]
                cells.append(mean_std(s[arm], key, bold=better))
            rows.append([names[arm], ", ".join(map(str, s[arm]["seeds"])), f"{s[arm]['training_minutes']['mean']:.1f} min",
                         "/".join(s[arm]["precision"]), f"{s[arm]['images_per_second']['mean']:.1f}", *cells])
    table = markdown_table(["system", "seeds", "training", "precision", "img/s", "accuracy", "balanced acc.", "macro-F1",
                    "MCC", "binary acc."], rows)
    return f"{table}\n\n{runs_source(ACCURACY_BF16, d, lambda arm: arm in names)}"


def accuracy_variants() -> str:
    """Recipe variants tried on the quality preset (``quality+KEY=VALUE`` arms): validation (where the
    choice is made) next to test, against the preset itself on the same seeds."""
    d = load(ACCURACY_BF16)
    rows = []
    seeds = sorted({r["seed"] for r in d["runs"].values() if r["arm"].startswith("quality+")})
    for arm in ["quality", *sorted(a for a in d["summary"] if a.startswith("quality+"))]:
        for seed in seeds:
            r = d["runs"].get(f"{arm}|{seed}")
            if r is None:
                continue
            v = r["validation"]
            rows.append([arm.replace("quality+", "quality + ") if arm != "quality" else "quality (64 px)", str(seed),
                         str(r["epochs"]), str(r["selected_epoch"]), f"{r['images_per_second']:.1f}",
                         *(f"{v[k]:.3f}" for k in ("accuracy", "balanced_accuracy", "macro_f1")),
                         *(f"{r[k]:.3f}" for k in ("accuracy", "balanced_accuracy", "macro_f1"))])
    table = markdown_table(["arm", "seed", "epochs", "selected", "img/s", "val acc.", "val bal. acc.", "val macro-F1",
                    "test acc.", "test bal. acc.", "test macro-F1"], rows)
    return f"{table}\n\n{runs_source(ACCURACY_BF16, d, lambda arm: arm == 'quality' or arm.startswith('quality+'))}"


def default_variants() -> str:
    """Variants of the default pipeline (``default+KEY=VALUE`` arms) next to the default itself: validation
    (where the choice is made) and test, mean +- std over the seeds each arm ran."""
    d = load(ACCURACY_BF16)
    s = d["summary"]
    rows = []
    for arm in ["default", *sorted(a for a in s if a.startswith("default+"))]:
        runs = [r for r in d["runs"].values() if r["arm"] == arm]
        if not runs:
            continue
        name = "default (`params.yaml`)" if arm == "default" else arm.replace("default+", "default + ")
        rows.append([name, ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])),
                     f"{s[arm]['training_minutes']['mean']:.1f} min",
                     *(mean_std(s[arm]["validation"], k) for k in ("accuracy", "balanced_accuracy", "macro_f1")),
                     *(mean_std(s[arm], k) for k in ("accuracy", "balanced_accuracy", "macro_f1"))])
    table = markdown_table(["arm", "seeds", "training", "val acc.", "val bal. acc.", "val macro-F1", "test acc.",
                    "test bal. acc.", "test macro-F1"], rows)
    return f"{table}\n\n{runs_source(ACCURACY_BF16, d, lambda arm: arm == 'default' or arm.startswith('default+'))}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def serve() -> str:
    """The serving benchmark: every cell, the soak and outage, the goals, and the replay agreement."""
    d = load("benchmarks/results/serve.json")
    rows = []
    for r in d["results"]:
        hops = r.get("hops_ms") or {}
        rows.append([r["system"], r["mode"], str(r["concurrency"]), f"{r['accuracy']:.3f}",
                     "-" if r.get("edge_share") is None else f"{r['edge_share']:.2f}",
                     *(_ms(r["latency_ms"][k]) for k in ("mean", "p50", "p99")), f"{r['throughput_rps']:.1f}",
                     _ms(hops.get("total_ms")), _ms(hops.get("outside_ms"))])
    table = markdown_table(["system", "mode", "c", "accuracy", "edge share", "mean ms", "p50 ms", "p99 ms", "req/s",
                    "in ingress ms", "outside ms"], rows)
    goals = markdown_table(["goal", "measured", "limit", ""], [
        [c["check"], "-" if c["value"] is None else (f"{c['value']:.3f}" if isinstance(c["value"], float) else str(c["value"])),
         f"{c['limit']:.3f}" if isinstance(c["limit"], float) else str(c["limit"]),
         {True: "passes", False: "**fails**", None: "not measured"}[c["passed"]]] for c in d["acceptance"]])
    lines = [table, "", goals]
    s, o, a = d.get("soak"), d.get("outage"), d.get("replay_agreement")
    if s:
        lines += ["", f"Soak: {d['settings']['soak_seconds']:g} s of cascade at 32 clients against the Serve app: "
                      f"{s['ok']} answers, {s['http_5xx']} 5xx, p99 {s['latency_ms']['p99']:.0f} ms."]
    if o:
        lines += ["", f"Outage: `resops edge` in cascade mode at {o['concurrency']} clients while the cloud's front door "
                      f"was killed after a third of {o['sent']} requests: {o['ok']} answers 200, "
                      f"{o['answers_not_200_or_4xx']} neither 200 nor 4xx, {o['degraded']} degraded, "
                      f"{o['queued_during_run']} inputs queued, {o['resent_after']} resent once the cloud was back "
                      f"({o['drain_seconds']:.0f} s), {o['dropped']} dropped."]
    if a:
        lines += ["", f"Offline replay (the calibrate stage's `models/serve/replay.json`, model "
                      f"{a['replayed_model_version']}): of {a['n']} test images sent once in cascade mode at threshold "
                      f"{a['threshold']:.3f}, the served answer has the replayed class for {a['label_agreement']:.1%} and "
                      f"the replayed tier for {a['tier_agreement']:.1%}; served versions {', '.join(a['served_model_versions'])}."]
    version = d.get("app", {}).get("model_version")
    return "\n".join(lines) + f"\n\n{source(['benchmarks/results/serve.json'], version, d.get('environment'))}"


def train_throughput() -> str:
    d = load("benchmarks/results/train_throughput.json")
    rows = [[name, f"{r['images_per_second']:.1f}", f"{r['ratio_to_plain_same_precision']:.2f}x"]
            for name, r in d["results"].items()]
    table = markdown_table(["configuration", "img/s", "vs plain loop, same precision"], rows)
    return f"{table}\n\n{source(['benchmarks/results/train_throughput.json'], None, {'cpu': d.get('cpu')})}"


def drift() -> str:
    d = load("benchmarks/results/drift.json")
    rows = [[name, f"{a['intensity_score_median']:.2f}", f"{a['embedding_score_median']:.2f}",
             f"{a['score_median']:.2f} [{a['score_min']:.2f}, {a['score_max']:.2f}]", f"{a['declared_rate']:.0%}"]
            for name, a in d["arms"].items()]
    table = markdown_table(["inputs", "intensity score", "embedding score", "score, median [min, max]",
                    "windows declared drifted"], rows)
    return f"{table}\n\n{source(['benchmarks/results/drift.json'], d.get('model_version'), d.get('environment'))}"


RENDERERS = {"default-pipeline": default_pipeline, "default-pipeline-run": default_pipeline_run, "accuracy-bf16": accuracy_bf16, "accuracy-variants": accuracy_variants,
             "default-variants": default_variants, "serve": serve,
             "train-throughput": train_throughput, "drift": drift,
             **figures_training.RENDERERS, **figures_edge.RENDERERS}


def render_readme(text: str) -> tuple[str, list[str], list[str]]:
    """(README with every block re-rendered, names of blocks that changed, names of unknown blocks)."""
    changed, unknown = [], []

    def sub(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            unknown.append(name)
            return match[0]
        body = RENDERERS[name]() + "\n"
        if body != match["body"]:
            changed.append(name)
        return match[1] + body + match[4]

    return BLOCK.sub(sub, text), changed, unknown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table is stale")
    ap.add_argument("--readme", default=str(README))
    args = ap.parse_args(argv)
    path = Path(args.readme)
    new, changed, unknown = render_readme(path.read_text())
    if unknown:
        print(f"figures: no renderer for {unknown}; known: {sorted(RENDERERS)}", file=sys.stderr)
        return 1
    if args.check:
        for name in changed:
            print(f"figures: README table {name!r} differs from what its JSON renders (python tools/figures.py)")
        return 1 if changed else 0
    path.write_text(new)
    print(f"figures: {len(BLOCK.findall(new))} tables rendered, {len(changed)} changed: {changed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
