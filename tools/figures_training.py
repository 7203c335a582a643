"""README tables of the training benchmarks, rendered from their result JSON (as tools/figures.py does).

* ``accuracy-avx2``: the quality preset against the plain script at 30 minutes (``benchmarks/results/accuracy.json``,
  arms ``plain@30`` and ``quality``);
* ``default-avx2``: the default pipeline against the plain script at 10 minutes (arms ``plain@10`` and ``default``);
* ``ablation-avx2``: the ablation steps (``abl:*`` arms) of the same file;
* ``models``: the model-zoo ablation (``benchmarks/results/models.json``);
* ``transfer``: transfer from mono to poly cells (``benchmarks/results/transfer.json``);
* ``rebalance``: the class-rebalancing strategies (``benchmarks/results/rebalance.json``).

Every figure comes from the JSON; the code holds only labels and the choice of columns.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.figlib import load, markdown_table, mean_std, runs_source, source  # noqa: E402

ACCURACY = "benchmarks/results/accuracy.json"
MODELS = "benchmarks/results/models.json"
TRANSFER = "benchmarks/results/transfer.json"
REBALANCE = "benchmarks/results/rebalance.json"
PAIR_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "mcc", "binary_accuracy")
PAIR_HEADER = ["system", "training", "img/s", "accuracy", "balanced acc.", "macro-F1", "MCC", "binary acc."]
METRIC_NAMES = {"macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy"}


def _cell(s: dict, key: str, bold: bool = False, per_seed: bool = False) -> str:
    """mean +- std with only the mean in bold, and optionally the per-seed values after it."""
    text = mean_std(s, key)
    if bold:
        head, sep, rest = text.partition(" ")
        text = f"**{head}**{sep}{rest}"
    if per_seed and s[key]["n"] > 1:
        text += " (" + " / ".join(f"{v:.3f}" for v in s[key]["values"]) + ")"
    return text


def _common(d: dict, arm: str, key: str) -> str:
    """The value of a run field (or of an override) that every run of ``arm`` recorded, '/'-joined if they differ."""
    values = []
    for r in d["runs"].values():
        if r["arm"] == arm:
            v = r[key] if key in r else (r.get("overrides") or {}).get(key)
            if v is not None and str(v) not in values:
                values.append(str(v))
    return "/".join(values) or "?"


def _pair_labels(d: dict) -> dict:
    select = _common(d, "quality", "train.select_by").removeprefix("val_")
    plain = "plain script (`benchmarks/plain_baseline.py`), {px} px"
    return {"plain@30": plain.format(px=_common(d, "plain@30", "image_size")),
            "plain@10": plain.format(px=_common(d, "plain@10", "image_size")),
            "quality": f"resops `quality` preset (64 px, EMA {_common(d, 'quality', 'train.ema_decay')}, best epoch by "
                       f"validation {METRIC_NAMES.get(select, select)})",
            "default": f"resops default (`params.yaml`: 64 px, {_common(d, 'default', 'epochs')} epochs, oversampling, "
                       f"one offline copy)"}


def _pair_table(pair: tuple[str, str], bold_keys: tuple[str, ...], per_seed_keys: tuple[str, ...]) -> str:
    """The plain script against a resops arm of accuracy.json: one row each, the better value of a bold_keys column bold."""
    d = load(ACCURACY)
    s, labels = d["summary"], _pair_labels(d)
    rows = []
    for arm in pair:
        if arm not in s:
            continue
        other = s.get(pair[1] if arm == pair[0] else pair[0])
        cells = [_cell(s[arm], k, bold=k in bold_keys and other is not None and s[arm][k]["mean"] >= other[k]["mean"],
                       per_seed=k in per_seed_keys) for k in PAIR_KEYS]
        rows.append([labels.get(arm, arm), f"{s[arm]['training_minutes']['mean']:.1f} min",
                     f"{s[arm]['images_per_second']['mean']:.1f}", *cells])
    table = markdown_table(PAIR_HEADER, rows)
    return f"{table}\n\n{runs_source(ACCURACY, d, lambda arm: arm in pair)}"


def accuracy_avx2() -> str:
    """30 minutes of training: the plain script against the quality preset, mean +- std over the seeds run."""
    return _pair_table(("plain@30", "quality"), PAIR_KEYS, ("accuracy", "balanced_accuracy"))


def default_avx2() -> str:
    """The plain script at 10 minutes against the default pipeline."""
    return _pair_table(("plain@10", "default"), ("accuracy", "balanced_accuracy", "macro_f1"), ())


ABLATION_LABELS = {  # arm -> label from the arm's overrides (the order of benchmarks/accuracy.py's ABLATION)
    "abl:base": lambda o: "params.yaml's recipe (64 px, `industrial` policy, one offline copy, random oversampling)",
    "abl:+128px": lambda o: f"+ {o['model.image_size']} px",
    "abl:+el": lambda o: f"+ `{o['augment.policy']}` policy, no offline copy",
    "abl:+ema+select": lambda o: f"+ EMA {o['train.ema_decay']} and `select_by: {o['train.select_by']}`",
    "abl:+tta+bias": lambda o: f"+ {o['evaluate.tta']} TTA and `decision_bias: {o['train.decision_bias']}`",
    "abl:+ordinal": lambda o: f"+ {o['model.head']} head",
}


def ablation_avx2() -> str:
    """Each ablation step (adding its options to the previous ones): validation and test figures."""
    d = load(ACCURACY)
    s = d["summary"]
    arms = [a for a in ABLATION_LABELS if a in s] + [a for a in s if a.startswith("abl:") and a not in ABLATION_LABELS]
    rows = []
    for arm in arms:
        overrides = next((r.get("overrides") or {} for r in d["runs"].values() if r["arm"] == arm), {})
        try:
            label = ABLATION_LABELS[arm](overrides) if arm in ABLATION_LABELS else arm
        except KeyError:
            label = arm
        v = s[arm].get("validation", {})
        rows.append([label, f"{s[arm]['images_per_second']['mean']:.1f}",
                     *(mean_std(v, k) if k in v else "-" for k in ("accuracy", "balanced_accuracy")),
                     *(mean_std(s[arm], k) for k in ("accuracy", "balanced_accuracy", "macro_f1"))])
    table = markdown_table(["step (adds to the previous)", "img/s", "val acc.", "val bal. acc.", "test acc.",
                            "test bal. acc.", "test macro-F1"], rows)
    return f"{table}\n\n{runs_source(ACCURACY, d, lambda arm: arm in arms)}"


def models() -> str:
    """The model zoo: cost (parameters, MACs, latency, throughput) and test figures of each variant."""
    d = load(MODELS)
    lat = d["settings"]["latency"]
    threads = [str(t) for t in lat["threads"]]
    rows = []
    for name, r in d["results"].items():
        cost, t = r["cost"], r["test_mean_std"]
        cpu = [cost["cpu"][k] for k in threads]
        rows.append([f"`{name}`", f"{cost['params'] / 1e6:.3f}", f"{cost['macs'] / 1e6:.1f}",
                     " / ".join(f"{c['latency_ms_median']:.2f}" for c in cpu),
                     " / ".join(f"{c['throughput_images_per_second_median']:.0f}" for c in cpu),
                     *(mean_std(t, k) for k in ("accuracy", "balanced_accuracy", "macro_f1")),
                     f"{t['train_wall_seconds']['mean']:.0f}"])
    table = markdown_table(["variant", "params (M)", f"MMACs @{d['settings']['image_size']} px",
                            f"batch-1 ms, {' / '.join(threads)} threads",
                            f"batch-{lat['throughput_batch']} img/s, {' / '.join(threads)} threads",
                            "test acc.", "balanced acc.", "macro-F1", "train (s)"], rows)
    return f"{table}\n\n{source([MODELS], None, d.get('environment'))}"


def _transfer_arm(label: str) -> str:
    """Which record of per_seed a summary label of benchmarks/transfer.py describes."""
    if label.startswith("source") and "zero-shot" in label:
        return "zero-shot"
    if label.startswith("source"):
        return "source_pretrain"
    if label.startswith("from scratch, all"):
        return "ceiling"
    return "scratch" if label.startswith("from scratch") else "finetune"


def transfer() -> str:
    """The source model in-domain and zero-shot, and the target subset learnt from scratch or fine-tuned."""
    d = load(TRANSFER)
    st, s, rec = d["settings"], d["summary"], d["per_seed"][0]
    src, tgt = st["source"], st["target"]
    keys = ("accuracy", "balanced_accuracy", "macro_f1")
    kinds = {label: _transfer_arm(label) for label in s}
    contenders = [label for label, kind in kinds.items() if kind in ("scratch", "finetune")]
    best = {k: max(s[label][k]["mean"] for label in contenders) for k in keys} if contenders else {}
    rows = []
    for label, kind in kinds.items():
        if kind == "zero-shot":
            name, images = f"{src} model zero-shot on {tgt}", "none"
        else:
            n = sum(rec[kind]["train_data"]["counts_before"].values())
            images = f"{n} {src if kind == 'source_pretrain' else tgt}"
            name = {"source_pretrain": f"{src} model on {src} test (in-domain reference)",
                    "scratch": f"from scratch on {n} {tgt} images",
                    "finetune": f"fine-tuned from {src} on {n} {tgt} images",
                    "ceiling": f"from scratch on all {n} {tgt} training images (ceiling)"}[kind]
        rows.append([name, images, *(mean_std(s[label], k, bold=label in contenders and s[label][k]["mean"] >= best[k])
                                     for k in keys)])
    table = markdown_table(["arm", "training images", "test acc.", "balanced acc.", "macro-F1"], rows)
    return f"{table}\n\n{source([TRANSFER], None, d.get('environment'))}"


def _pm(s: dict, key: str, bold: bool = False) -> str:
    return mean_std(s, key, bold=bold).replace(" +- ", " ± ")


def rebalance() -> str:
    """Each rebalancing strategy: rows per epoch, test figures (mean ± std over seeds) and per-class recall."""
    d = load(REBALANCE)
    classes = d["data"]["class_names"]
    res = d["results"]
    bold_keys = ("balanced_accuracy", "macro_f1")
    best = {k: max(r["test_mean_std"][k]["mean"] for r in res.values()) for k in bold_keys}
    rows = []
    for name, r in res.items():
        t, data = r["test_mean_std"], r["runs"][0]["data"]
        counts = "/".join(str(data["counts_after"][k]) for k in sorted(data["counts_after"], key=int))
        rows.append([r["spec"].get("label", name), f"{data['rows']} ({counts})",
                     *(_pm(t, k, bold=k in bold_keys and t[k]["mean"] >= best[k])
                       for k in ("accuracy", "balanced_accuracy", "macro_f1", "mcc")),
                     " / ".join(f"{t['recall'][c]['mean']:.2f}" for c in classes)])
    recall = " / ".join(c.split("_")[0] for c in classes)
    table = markdown_table(["strategy", "rows per epoch (per class)", "accuracy", "balanced acc.", "macro-F1", "MCC",
                            f"recall {recall}"], rows)
    return f"{table}\n\n{source([REBALANCE], None, d.get('environment'))}"


RENDERERS = {"accuracy-avx2": accuracy_avx2, "default-avx2": default_avx2, "ablation-avx2": ablation_avx2,
             "models": models, "transfer": transfer, "rebalance": rebalance}


if __name__ == "__main__":
    for key, render in RENDERERS.items():
        print(f"<!-- figures:{key} -->\n{render()}\n<!-- /figures:{key} -->\n")
