"""EEG benchmark: CWT scalogram throughput, and ResNet18 accuracy per task on synthetic EEG.

**The signals are synthetic** (``components.data.eeg.synthetic_eeg``: background rhythms over 1/f
noise, interictal spikes, ictal spike-and-wave). They are not recordings: the accuracies below
check that the EEG path of the pipeline learns what it is shown; they are not clinical results and
are not comparable with Dubey et al.'s Bonn figures (98.4 / 99.1 / 98.2 %), which the JSON lists
for reference only. The real-data path is the Bonn University set (``data.dataset: bonn_eeg``,
``data.eeg.path``), which does not ship in a package.

1. **CWT throughput** (``--cwt-segments`` synthetic signals, in-process, one process):

   * ``cwt_magnitude`` of a full 4,097-sample segment at 64 scales (``pywt.cwt(method="fft")``,
     the method the pipeline uses), and the same with ``method="conv"`` on a few segments, for
     comparison;
   * ``scalogram`` of one training window (params.yaml ``data.eeg``: 1,024 samples, 64 scales,
     log magnitude, resized to 64 x 64) plus PNG encoding: what prepare stores per window;
   * the prepare step's Ray Data ``map_batches`` (``components.data.eeg_prepare.scalograms``)
     over all windows of those signals on a 2-CPU local Ray, 0.5 CPU per task (params.yaml
     ``augment.cpus_per_task``), first (cold workers) and second call.

2. **Accuracy per task** (``--tasks``): synthetic signals written in the Bonn layout
   (``--n-per-set`` files per set Z, O, N, F, S), read back with ``read_bonn`` for the task,
   prepared with ``prepare_eeg`` (split by recording, then windows; ``--reassemble`` windows per
   class added to training only), then ResNet18 (in_chans 1, 64 x 64, no image augmentation) trained
   with Ray Train (``components.train.fit``) for ``--epochs`` and evaluated on the test windows.
   One run per seed x task x reassembly setting; the split is fixed (seed 42).

    python benchmarks/eeg.py [--tasks 3class,ictal_vs_interictal,...] [--n-per-set 20] [--epochs 4]
        [--seeds 42] [--reassemble 0,100] [--cwt-segments 64] [--work DIR] [--out FILE]

Prints Markdown tables and writes benchmarks/results/eeg.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # benchmarks/common.py (also puts the repository root on sys.path)
from common import (RESULTS, SPLIT_SEED, environment_info, fmt_mean_std, headline, markdown_table, mean_std,
                    parse_ints, say, start_ray, stop_ray, train_config, train_model, write_split_shards)
import numpy as np
import pywt

from components.data.cwt import cwt_frequencies, cwt_kwargs, cwt_magnitude, scalogram_batch
from components.data.eeg import BONN_FS, BONN_LENGTH, BONN_TASKS, read_bonn, segment, synthetic_bonn, synthetic_eeg
from components.data.eeg import write_bonn_layout
from components.data.eeg_prepare import prepare_eeg, scalograms
from components.data.shards import read_shards

# params.yaml data.eeg at the time of writing, fixed here so the benchmark does not move when
# someone edits params.yaml; every value goes into the JSON.
EEG_DEFAULTS = dict(fs=BONN_FS, length=BONN_LENGTH, window=1024, overlap=512, parts=4,
                    cwt=dict(wavelet="cmor1.5-1.0", freqs=[0.5, 40.0], num_scales=64, out_size=[64, 64], log=True))
DEFAULT_TASKS = "ictal_vs_interictal,normal_vs_ictal,normal_vs_interictal,3class"
# Dubey et al., standard ResNet18 on CWT images of the Bonn sets (reported, real EEG): reference only.
PAPER_BONN_ACCURACY = {"ictal_vs_interictal": 0.984, "normal_vs_ictal": 0.991, "normal_vs_interictal": 0.982}
CPUS_PER_TASK = 0.5  # params.yaml augment.cpus_per_task


# ------------------------------------------------------------------------------ CWT speed
def _per_call_seconds(fn, items) -> list[float]:
    times = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def _timing(times: list[float]) -> dict:
    med = statistics.median(times)
    return {"segments": len(times), "ms_median": 1e3 * med, "ms_p90": 1e3 * float(np.percentile(times, 90)),
            "segments_per_second": 1.0 / med}


def cwt_throughput(n_segments: int, seed: int) -> dict:
    fs, cwt = EEG_DEFAULTS["fs"], EEG_DEFAULTS["cwt"]
    kw = cwt_kwargs(cwt)
    signals = synthetic_eeg(max(1, -(-n_segments // 3)), seed=seed).signals[:n_segments].astype(np.float64)
    full = dict(wavelet=kw["wavelet"], freqs=kw["freqs"], num_scales=kw["num_scales"])
    cwt_magnitude(signals[0], fs, **full)  # warm-up: wavelet tables, FFT plans
    res = {"signal_length": signals.shape[1], "num_scales": kw["num_scales"], "wavelet": kw["wavelet"]}
    res["cwt_fft_full_segment"] = _timing(_per_call_seconds(lambda x: cwt_magnitude(x, fs, **full), signals))

    scales, _ = cwt_frequencies(fs, wavelet=kw["wavelet"], freqs=kw["freqs"], num_scales=kw["num_scales"])
    wavelet = pywt.ContinuousWavelet(kw["wavelet"])
    conv = lambda x: pywt.cwt(x, scales, wavelet, sampling_period=1.0 / fs, method="conv")  # noqa: E731
    res["cwt_conv_full_segment"] = _timing(_per_call_seconds(conv, signals[:min(5, len(signals))]))

    window, overlap = EEG_DEFAULTS["window"], EEG_DEFAULTS["overlap"]
    windows = np.concatenate([segment(s, window, overlap) for s in signals]).astype(np.float32)
    one = lambda w: scalogram_batch({"signal": w[None]}, fs=fs, **kw)  # noqa: E731
    res["scalogram_png_per_window"] = dict(_timing(_per_call_seconds(one, windows)), window=window,
                                           out_size=list(kw["out_size"]))

    import pandas as pd

    frame = pd.DataFrame({"row": np.arange(len(windows))})
    ray_runs = []
    for _ in range(2):  # first call starts the Ray Data workers, second reuses them
        t0 = time.perf_counter()
        out = scalograms(frame, windows, fs, cwt, use_ray=True, cpus_per_task=CPUS_PER_TASK)
        wall = time.perf_counter() - t0
        assert len(out) == len(windows) and out["image"].map(len).min() > 0
        ray_runs.append({"windows": len(windows), "seconds": wall, "segments_per_second": len(windows) / wall})
    res["ray_data_map_batches"] = {"cpus_per_task": CPUS_PER_TASK, "cluster_cpus": 2, "cold": ray_runs[0],
                                   "warm": ray_runs[1]}
    return res


# ------------------------------------------------------------------------------ accuracy
def task_runs(raw: Path, work: Path, tasks: list[str], reassemble: list[int], seeds: list[int], epochs: int,
              image_size: int) -> list[dict]:
    e = EEG_DEFAULTS
    runs = []
    for task in tasks:
        ds = read_bonn(raw, task, length=e["length"], fs=e["fs"])
        for extra in reassemble:
            prepared = work / f"prepared-{task}-r{extra}"
            t0 = time.perf_counter()
            prep = prepare_eeg(ds, prepared, dataset="eeg_synthetic", task=task, window=e["window"],
                               overlap=e["overlap"], reassemble_per_class=extra, parts=e["parts"], cwt=e["cwt"],
                               seed=SPLIT_SEED, use_ray=True, cpus_per_task=CPUS_PER_TASK).report
            prep_s = time.perf_counter() - t0
            train_dir = write_split_shards(read_shards(prepared / "shards", split="train"), prepared / "train-only")
            names = prep["class_names"]
            for seed in seeds:
                say(f"{task}, {extra} reassembled/class, seed {seed}: training on {sum(prep['counts']['train'].values())} "
                    f"windows ({prep['counts']['train']})")
                cfg = train_config("resnet18", names, image_size, epochs, seed)
                out_model = work / f"model-{task}-r{extra}-s{seed}.pt"
                tr = train_model(cfg, train_dir, prepared / "shards", out_model, work / "ray", online_policy=None)
                m = common.evaluate_model_file(out_model, prepared / "shards", "test")
                say(f"  test accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f}, "
                    f"macro-F1 {m['macro_f1']:.3f} in {tr['wall_seconds']:.0f} s")
                runs.append({"task": task, "reassemble_per_class": extra, "seed": seed, "class_names": names,
                             "recordings": prep["recordings"], "windows": prep["counts"],
                             "prepare_seconds": prep_s, "train_wall_seconds": tr["wall_seconds"],
                             "train_images_per_second_last_epoch": tr["train_images_per_second_last_epoch"],
                             "final_val_accuracy": tr["history"][-1].get("val_accuracy"),
                             "test": headline(m), "confusion_matrix": m.get("confusion_matrix")})
    return runs


def summarise(runs: list[dict]) -> list[dict]:
    rows = {}
    for r in runs:
        rows.setdefault((r["task"], r["reassemble_per_class"]), []).append(r)
    out = []
    for (task, extra), rs in rows.items():
        out.append({"task": task, "reassemble_per_class": extra, "seeds": [r["seed"] for r in rs],
                    "test_windows": sum(rs[0]["windows"]["test"].values()),
                    "train_windows": sum(rs[0]["windows"]["train"].values()),
                    **{k: mean_std([r["test"][k] for r in rs]) for k in ("accuracy", "balanced_accuracy", "macro_f1")},
                    "paper_bonn_accuracy_reported": PAPER_BONN_ACCURACY.get(task)})
    return out


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--n-per-set", type=int, default=20, help="synthetic files per Bonn set (Z, O, N, F, S)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--reassemble", default="0,100", help="reassembled training windows per class, comma separated")
    ap.add_argument("--data-seed", type=int, default=SPLIT_SEED, help="seed of the synthetic signals")
    ap.add_argument("--cwt-segments", type=int, default=64)
    ap.add_argument("--skip-accuracy", action="store_true", help="CWT throughput only")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS / "eeg.json"))
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(BONN_TASKS))
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {sorted(BONN_TASKS)}")
    seeds, reassemble = parse_ints(args.seeds), parse_ints(args.reassemble, "--reassemble")

    start_ray()
    env = environment_info()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resops-eeg-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        say(f"CWT throughput over {args.cwt_segments} synthetic segments")
        speed = cwt_throughput(args.cwt_segments, args.data_seed)
        runs = []
        if not args.skip_accuracy:
            raw = work / f"raw-synthetic-n{args.n_per_set}-s{args.data_seed}"
            write_bonn_layout(raw, synthetic_bonn(args.n_per_set, length=EEG_DEFAULTS["length"], fs=EEG_DEFAULTS["fs"],
                                                  seed=args.data_seed))
            runs = task_runs(raw, work, tasks, reassemble, seeds, args.epochs, args.image_size)
    stop_ray()

    result = {
        "benchmark": "eeg", "data": "SYNTHETIC EEG-like signals (components.data.eeg.synthetic_eeg): not clinical data",
        "settings": {"eeg": EEG_DEFAULTS, "tasks": tasks, "n_per_set": args.n_per_set, "data_seed": args.data_seed,
                     "split_seed": SPLIT_SEED, "epochs": args.epochs, "image_size": args.image_size, "seeds": seeds,
                     "reassemble_per_class": reassemble, "model": "resnet18", "in_chans": 1,
                     "image_augmentation": None, "train_defaults": common.TRAIN_DEFAULTS,
                     "ray_resources": common.RAY_RESOURCES},
        "environment": env, "cwt": speed, "runs": runs, "summary": summarise(runs),
        "paper_reference": {"source": "Dubey et al., ResNet18 on CWT scalograms of the Bonn EEG sets (reported)",
                            "accuracy": PAPER_BONN_ACCURACY},
        "total_seconds": time.perf_counter() - t_start,
    }
    print()
    print(markdown_table(["step", "segment", "ms (median)", "segments/s"], [
        ["CWT, FFT (pipeline)", f"{speed['signal_length']} samples x {speed['num_scales']} scales",
         f"{speed['cwt_fft_full_segment']['ms_median']:.1f}", f"{speed['cwt_fft_full_segment']['segments_per_second']:.0f}"],
        ["CWT, direct convolution", f"{speed['signal_length']} samples x {speed['num_scales']} scales",
         f"{speed['cwt_conv_full_segment']['ms_median']:.1f}",
         f"{speed['cwt_conv_full_segment']['segments_per_second']:.1f}"],
        ["scalogram + PNG (1 process)", f"{EEG_DEFAULTS['window']} samples -> 64 x 64",
         f"{speed['scalogram_png_per_window']['ms_median']:.1f}",
         f"{speed['scalogram_png_per_window']['segments_per_second']:.0f}"],
        ["Ray Data map_batches, warm (2 CPUs)", f"{EEG_DEFAULTS['window']} samples -> 64 x 64", "",
         f"{speed['ray_data_map_batches']['warm']['segments_per_second']:.0f}"],
    ]))
    if runs:
        print()
        print(markdown_table(
            ["task", "reassembled/class", "train / test windows", "accuracy", "balanced acc.", "macro-F1"],
            [[s["task"], s["reassemble_per_class"], f"{s['train_windows']} / {s['test_windows']}",
              fmt_mean_std(s["accuracy"]["values"]), fmt_mean_std(s["balanced_accuracy"]["values"]),
              fmt_mean_std(s["macro_f1"]["values"])] for s in result["summary"]]))
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
