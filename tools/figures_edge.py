"""README tables of the EEG, edge-model (pruning, int8, distillation) and detection sections, rendered from
``benchmarks/results/{eeg,prune,prune.distill,detect}.json`` (see tools/figures.py for the block markers).

    python tools/figures_edge.py          # print every table rendered here
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script or imported as tools.figures_edge
from tools.figlib import load, markdown_table, mean_std, source  # noqa: E402

EEG = "benchmarks/results/eeg.json"
PRUNE = "benchmarks/results/prune.json"
DISTILL = "benchmarks/results/prune.distill.json"
DETECT = "benchmarks/results/detect.json"
TARGET = {"macs": "MACs", "params": "params"}


def _full_model_version(d: dict) -> str | None:
    """The registry version of the pipeline model a compression benchmark started from, else its sha256
    (None: the benchmark trained its own full model)."""
    full = d["settings"]["full_model"]
    if full.get("trained_here") or not full.get("sha256"):
        return None
    try:
        entries = load("models/registry.json").get("entries", [])
    except FileNotFoundError:
        entries = []
    for e in entries:
        if e.get("files_sha256", {}).get("full") == full["sha256"]:
            return e["version"]
    return f"sha256 {full['sha256'][:8]}"


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def eeg_cwt() -> str:
    """The CWT timings: one full segment (FFT and direct), one training window, prepare's Ray Data map."""
    d = load(EEG)
    c = d["cwt"]
    fft, conv, win = c["cwt_fft_full_segment"], c["cwt_conv_full_segment"], c["scalogram_png_per_window"]
    ray = c["ray_data_map_batches"]
    warm = ray["warm"]
    w, h = win["out_size"]
    rows = [[f"`pywt.cwt`, FFT method (what prepare uses), {c['signal_length']:,} samples x {c['num_scales']} scales",
             f"{fft['ms_median']:.1f} ms", _rate(fft["segments_per_second"])],
            ["`pywt.cwt`, direct convolution, same segment", f"{conv['ms_median']:.1f} ms",
             _rate(conv["segments_per_second"])],
            [f"one training window: CWT + log + resize to {w} x {h} + PNG, one process", f"{win['ms_median']:.1f} ms",
             _rate(win["segments_per_second"])],
            [f"prepare's Ray Data `map_batches` over {warm['windows']} windows, {ray['cluster_cpus']} CPUs, "
             f"{ray['cpus_per_task']:g} CPU per task (machine shared with other work)", "",
             _rate(warm["segments_per_second"])]]
    table = markdown_table(["CWT step", "per segment", "segments/s"], rows)
    return f"{table}\n\n{source([EEG], None, d.get('environment'))}"


def eeg_tasks() -> str:
    """Each task on synthetic signals, without and with reassembled windows (``a / b`` per cell)."""
    d = load(EEG)
    arms = d["settings"]["reassemble_per_class"]
    by = {(s["task"], s["reassemble_per_class"]): s for s in d["summary"]}
    rows = []
    for task in d["settings"]["tasks"]:
        ss = [by[(task, a)] for a in arms if (task, a) in by]
        if not ss:
            continue
        name = "3 classes" if task == "3class" else task.replace("_", " ")
        train = str(ss[0]["train_windows"])
        if len(ss) > 1:
            train += f" ({', '.join(str(s['train_windows']) for s in ss[1:])})"
        tests = sorted({s["test_windows"] for s in ss})
        test = str(tests[0]) if len(tests) == 1 else ", ".join(map(str, tests))
        rows.append([name, " / ".join(str(s["reassemble_per_class"]) for s in ss), f"{train} / {test}",
                     *(" / ".join(mean_std(s, k) for s in ss) for k in ("accuracy", "balanced_accuracy"))])
    table = markdown_table(["task (synthetic signals)", "reassembled windows per class", "train / test windows",
                            "test accuracy", "balanced accuracy"], rows)
    return f"{table}\n\n{source([EEG], None, d.get('environment'))}"


def _prune_label(r: dict, full_file: str | None, target: str) -> str:
    kind = r["kind"]
    of_full = r.get("source_file") == full_file
    if kind == "full":
        text = "full"
    elif kind == "unstructured":
        text = f"unstructured {r['sparsity']:.0%}"
    elif kind == "structured":
        text = f"structured, {target} -{r['ratio']:.0%}"
    elif kind == "int8":
        text = "full, int8 ONNX" if of_full else f"{r['name']}, int8 ONNX"
    elif kind == "structured+int8":
        text = f"structured -{r['ratio']:.0%} + int8 ONNX"
    elif kind == "reference":
        text = "(reference) full, fp32 ONNX" if of_full else f"(reference) {r['name']}"
    else:
        text = r["name"]
    return f"{text} (torch)" if r.get("runtime") == "torch" else text


def _speedups(r: dict, threads: list[int], met: list[int] | None) -> str:
    """``a / b`` over thread counts; bold where the row meets the acceptance goal (whole cell when all do)."""
    sp = [r["speedup_vs_full"][str(t)] for t in threads]
    digits = 2 if sp[0] < 10 else 1
    parts = [f"{v:.{digits}f}x" for v in sp]
    if met and set(threads) <= set(met):
        return f"**{' / '.join(parts)}**"
    return " / ".join(f"**{p}**" if met and t in met else p for p, t in zip(parts, threads))


def prune() -> str:
    """Each edge model of benchmarks/prune.py: size, MACs, latency and speed-up per thread count, batch
    throughput, test accuracy; the fp32 ONNX reference of the full model last."""
    d = load(PRUNE)
    st = d["settings"]
    lat = st["latency"]
    threads = lat["threads"]
    top = str(max(threads))
    target = TARGET.get(st["structured"]["target"], st["structured"]["target"])
    meeting = {m["name"]: m["threads"] for m in d.get("acceptance", {}).get("rows_meeting", [])}
    full_file = next((r["file"] for r in d["results"] if r["kind"] == "full"), None)
    results = [r for r in d["results"] if r["kind"] != "reference"]
    results += [r for r in d["results"] if r["kind"] == "reference" and r.get("source_file") == full_file]
    rows = []
    for r in results:
        params = (f"{r['nonzero_params'] / 1e6:.2f} non-zero" if r["kind"] == "unstructured"
                  else f"{r['params'] / 1e6:.2f}")
        rows.append([_prune_label(r, full_file, target), params, f"{r['macs'] / 1e6:.0f}", f"{r['file_bytes'] / 1e6:.1f}",
                     " / ".join(f"{r['cpu'][str(t)]['latency_ms_median']:.2f}" for t in threads),
                     _speedups(r, threads, meeting.get(r["name"])),
                     f"{r['cpu'][top]['throughput_images_per_second_median']:.0f}",
                     f"{r['test']['accuracy']:.3f}", f"{r['test']['macro_f1']:.3f}"])
    ts = " / ".join(map(str, threads))
    table = markdown_table(["edge model", "params (M)", f"MMACs @{st['image_size']} px", "file (MB)",
                            f"batch-1 ms, {ts} threads", f"speed-up, {ts} threads",
                            f"batch-{lat['throughput_batch']} img/s, {top} threads", "test acc.", "macro-F1"], rows)
    return f"{table}\n\n{source([PRUNE], _full_model_version(d), d.get('environment'))}"


def distill() -> str:
    """Structured pruning fine-tuned with distillation from the full model against labels only (the better
    of each pair bold)."""
    d = load(DISTILL)
    st = d["settings"]["structured"]
    target = TARGET.get(st["target"], st["target"])
    rows = []
    for ratio in st["ratios"]:
        arms = {r["distilled"]: r for r in d["results"] if r["kind"] == "structured" and r.get("ratio") == ratio}
        if True not in arms or False not in arms:
            continue
        cells = []
        for key in ("accuracy", "macro_f1"):
            kd, ce = arms[True]["test"][key], arms[False]["test"][key]
            cells.append(" / ".join(f"**{v:.3f}**" if v >= o else f"{v:.3f}" for v, o in ((kd, ce), (ce, kd))))
        rows.append([f"{target} -{ratio:.0%}", *cells])
    epochs = d["settings"]["finetune"]["epochs"]
    table = markdown_table([f"structured, fine-tuned {epochs} epoch{'' if epochs == 1 else 's'}",
                            "test acc., distilled / labels only", "macro-F1, distilled / labels only"], rows)
    return f"{table}\n\n{source([DISTILL], _full_model_version(d), d.get('environment'))}"


def _detect_label(name: str, m: dict, settings: dict) -> str:
    if name == "full":
        return "resnet18_yolo"
    if "sparsity" in m:
        return f"unstructured {m['sparsity']['target_sparsity_measured'] * 100:.0f} %"
    if "structured" in m:
        return f"structured, MACs -{settings['structured_ratio'] * 100:.0f} %"
    return name.replace(")", ", untrained)") if "untrained" in m.get("how", "") else name


def detect() -> str:
    """The detector, its pruned variants and YOLOv3 Darknet-53 (counted): mAP, size, MACs, CPU time per frame."""
    d = load(DETECT)
    st = d["settings"]
    size = st["image_size"]
    models = d["models"]
    sizes = sorted({int(k[3:]) for m in models.values() for k in m if k.startswith("at_")})
    rows = []
    for name, m in models.items():
        sparse = "sparsity" in m
        params = f"{(m['nonzero_params'] if sparse else m['params']) / 1e6:.2f} M" + (" non-zero" if sparse else "")
        rows.append([_detect_label(name, m, st),
                     *("-" if m.get(k) is None else f"{m[k]:.3f}" for k in ("map_50", "map_50_95")),
                     params, f"{m[f'at_{size}']['macs'] / 1e9:.2f} G", f"{m['file_bytes'] / 1e6:.1f} MB",
                     *(f"{m[f'at_{s}']['ms_per_frame']:.1f}" if f"at_{s}" in m else "-" for s in sizes)])
    table = markdown_table(["model", "test mAP@0.5", "mAP@0.5:0.95", "parameters", f"MACs @{size}", "file",
                            *(f"ms/frame @{s}" for s in sizes)], rows)
    return f"{table}\n\n{source([DETECT], None, d.get('environment'))}"


RENDERERS = {"eeg-cwt": eeg_cwt, "eeg-tasks": eeg_tasks, "prune": prune, "distill": distill, "detect": detect}


if __name__ == "__main__":
    for key, render in RENDERERS.items():
        print(f"<!-- figures:{key} -->\n{render()}\n<!-- /figures:{key} -->\n")
