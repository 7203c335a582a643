"""Shared pieces of the ELPV benchmarks (benchmarks/models.py, benchmarks/transfer.py).

* :func:`setup_environment` / :func:`start_ray`: the environment and the local Ray both scripts use;
* :func:`prepared_elpv`: ELPV ingested and prepared once into a work directory, reused afterwards;
* :func:`rebalanced_train_shards`, :func:`stratified_subset`, :func:`write_split_shards`: training
  and evaluation shards built with the components' own functions (``rebalance_frame``, ``write_shards``);
* :func:`train_config` and :func:`train_model`: one Ray Train run (``components.train.fit``);
* :func:`evaluate_model_file`: a model file on one split of a shard directory
  (``components.evaluate.predict_dataset`` + ``classification_metrics``);
* :func:`count_macs`, :func:`measure_latency`: model cost on the CPU;
* :func:`markdown_table`, :func:`write_json`, :func:`mean_std`, :func:`environment_info`: output.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from components.data.prepare import load_report, prepare_dataset  # noqa: E402
from components.data.shards import read_shards, write_shards  # noqa: E402
from components.data.sources import get_source  # noqa: E402
from components.evaluate import classification_metrics, predict_dataset  # noqa: E402
from components.models import count_parameters, load_model  # noqa: E402
from components.rebalance import rebalance_frame  # noqa: E402
from components.train import fit, image_dataset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SPLIT_SEED = 42  # params.yaml `seed`: the prepared split every benchmark uses

# The training recipe of params.yaml (train.*, rebalance.*, augment.*) at the time of writing, fixed
# here so a benchmark does not change when someone edits params.yaml; every value goes into the JSON.
TRAIN_DEFAULTS = dict(batch_size=32, lr=1e-3, weight_decay=0.05, label_smoothing=0.1, shuffle_buffer=256,
                      threads_per_worker=2)
REBALANCE_DEFAULTS = dict(sampler="random_over", target_ratio=0.35, class_weight="none")
ONLINE_POLICY = "industrial"
RAY_RESOURCES = dict(num_workers=1, cpus_per_worker=1.0, data_cpus=0.5)  # params.yaml train/augment defaults
RAY_INIT = dict(address="local", num_cpus=2, include_dashboard=False)  # + dashboard_port: see start_ray


# ------------------------------------------------------------------------------ runtime
def setup_environment() -> None:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as pipelines.runtime.init_ray (params ray.worker_niceness)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray():
    """A new local Ray with 2 CPUs, isolated from any other Ray running on this machine.

    ``address="local"`` never joins another job's Ray. ``dashboard_port``: even with
    ``include_dashboard=False`` Ray advertises ``127.0.0.1:8265`` as its State API address, and Ray
    Train V2's PlacementGroupCleaner asks that address whether our training controller is alive.
    When another Ray instance with a dashboard (e.g. a ``dvc repro`` stage) listens on 8265 it answers
    "unknown actor", the cleaner concludes our controller is dead and removes the placement group,
    killing the training worker ("A worker health check failed"). An unused port makes the query
    fail instead, which the cleaner tolerates.
    """
    setup_environment()
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(**RAY_INIT, dashboard_port=_free_port(), logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ---------------------------------------------------------------------------------- data
def prepared_elpv(work: Path, task: str = "4class", seed: int = SPLIT_SEED) -> Path:
    """``work/prepared-<task>-s<seed>``: ELPV ingested and prepared (split ``seed``), made once and reused.

    ``prepare_dataset`` writes ``report.json`` last, so its presence marks a complete preparation.
    """
    work = Path(work)
    raw = work / "raw-elpv"
    if not (raw / "labels.csv").exists():
        get_source("elpv").ingest(raw)
    out = work / f"prepared-{task}-s{seed}"
    if (out / "report.json").exists() and list((out / "shards").glob("part-*.parquet")):
        say(f"reusing prepared ELPV ({task}, split seed {seed}) in {out}")
        return out
    t0 = time.perf_counter()
    res = prepare_dataset(raw, out, "elpv", task, in_chans=1, seed=seed)
    say(f"prepared ELPV ({task}, split seed {seed}): {res.report['num_prepared']} images, counts "
        f"{res.report['counts']} in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def elpv_frame(prepared: Path, split: str | None = None) -> pd.DataFrame:
    """The prepared rows (image bytes included) with ``cell_type`` (mono/poly) and ``probability``
    taken from the ``attrs`` JSON ELPV's source writes."""
    df = read_shards(Path(prepared) / "shards", split=split)
    attrs = df["attrs"].map(json.loads)
    df["cell_type"] = attrs.map(lambda a: a["cell_type"])
    df["probability"] = attrs.map(lambda a: a["probability"])
    return df


def class_names(prepared: Path) -> list[str]:
    return list(load_report(prepared)["class_names"])


def stratified_subset(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """``n`` rows stratified on ``label`` (seeded); all rows when ``n`` is None or not smaller.

    Falls back to a plain seeded sample when some class has a single row (stratification impossible).
    """
    if n is None or n >= len(frame):
        return frame.reset_index(drop=True)
    from sklearn.model_selection import train_test_split

    counts = frame["label"].value_counts()
    strat = frame["label"] if counts.min() >= 2 and n >= len(counts) and len(frame) - n >= len(counts) else None
    idx, _ = train_test_split(np.arange(len(frame)), train_size=n, random_state=seed, stratify=strat)
    return frame.iloc[np.sort(idx)].reset_index(drop=True)


def rebalanced_train_shards(train: pd.DataFrame, out: Path, num_classes: int, seed: int,
                            sampler: str = REBALANCE_DEFAULTS["sampler"],
                            target_ratio: float = REBALANCE_DEFAULTS["target_ratio"]) -> dict:
    """The training rows resampled with ``rebalance_frame`` and written shuffled, as the rebalance stage does."""
    cols = [c for c in train.columns if c not in ("cell_type", "probability")]
    res = rebalance_frame(train[cols], num_classes, strategy=sampler, target_ratio=target_ratio,
                          class_weight=REBALANCE_DEFAULTS["class_weight"], seed=seed)
    write_shards(res.frame.sample(frac=1.0, random_state=seed), out, rows_per_shard=512)
    return {"dir": str(out), "sampler": sampler, "target_ratio": target_ratio, "seed": seed,
            "counts_before": res.counts_before, "counts_after": res.counts_after, "rows": len(res.frame)}


def write_split_shards(frame: pd.DataFrame, out: Path) -> Path:
    """Write rows (with their ``split`` column) as shards, e.g. one cell type's val or test images."""
    if frame.empty:
        raise ValueError(f"no rows to write to {out}")
    cols = [c for c in frame.columns if c not in ("cell_type", "probability")]
    write_shards(frame[cols].reset_index(drop=True), out, rows_per_shard=512)
    return Path(out)


def label_counts(frame: pd.DataFrame) -> dict[int, int]:
    return {int(k): int(v) for k, v in sorted(frame["label"].value_counts().items())}


# ------------------------------------------------------------------------------ training
def train_config(model_name: str, names: list[str], image_size: int, epochs: int, seed: int, *,
                 batch_size: int = TRAIN_DEFAULTS["batch_size"], lr: float = TRAIN_DEFAULTS["lr"],
                 pretrained: str | None = None, freeze_backbone_epochs: int = 0, backbone_lr_scale: float = 1.0,
                 model_kwargs: dict | None = None) -> dict:
    """The worker config of ``components.train.loop.train_loop_per_worker`` (every key of
    ``components.train.settings.LOOP_KEYS``): streamed data, fp32, cosine, no recipe option, as measured."""
    from components.data.images import DEFAULT_MAX_PIXELS
    from components.train.settings import RECIPE_OFF

    return {
        **RECIPE_OFF, "precision": "fp32", "data_cache": "stream", "schedule": "cosine", "max_pixels": DEFAULT_MAX_PIXELS,
        "model_name": model_name, "model_kwargs": dict(model_kwargs or {}), "num_classes": len(names),
        "class_names": list(names), "in_chans": 1, "image_size": image_size, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "weight_decay": TRAIN_DEFAULTS["weight_decay"],
        "label_smoothing": TRAIN_DEFAULTS["label_smoothing"], "shuffle_buffer": TRAIN_DEFAULTS["shuffle_buffer"],
        "class_weights": None, "threads_per_worker": TRAIN_DEFAULTS["threads_per_worker"], "seed": seed,
        "wandb": {"mode": "disabled"}, "freeze_backbone_epochs": freeze_backbone_epochs,
        "backbone_lr_scale": backbone_lr_scale, "pretrained": pretrained,
    }


def train_model(cfg: dict, train_dir: Path, val_dir: Path, out_model: Path, storage: Path, *,
                online_policy: str | None = ONLINE_POLICY) -> dict:
    """One Ray Train run; returns the history and the wall time (Ray Train start-up included).

    The run name is unique, so a reused work directory never resumes an old run; the run's
    checkpoints are deleted afterwards (the final weights are copied to ``out_model``).
    """
    cfg = dict(cfg, run_name=f"bench-{cfg['model_name']}-s{cfg['seed']}-{time.time_ns()}")
    t0 = time.perf_counter()
    res = fit(cfg, train_dir, val_dir, storage, out_model, num_workers=RAY_RESOURCES["num_workers"],
              cpus_per_worker=RAY_RESOURCES["cpus_per_worker"], data_cpus=RAY_RESOURCES["data_cpus"],
              max_failures=0, keep_checkpoints=1, online_policy=online_policy, use_gpu=False, select_by="last")
    wall = time.perf_counter() - t0
    shutil.rmtree(res.run_dir, ignore_errors=True)
    return {"model_path": str(out_model), "wall_seconds": wall, "history": res.history,
            "train_images_per_second_last_epoch": res.history[-1]["images_per_second"]}


# ---------------------------------------------------------------------------- evaluation
def evaluate_model_file(model_path: str | Path, shards_dir: str | Path, split: str = "test",
                        batch_size: int = 128, threads: int = 2, tta: str = "none") -> dict:
    """``classification_metrics`` of a model file on one split of a shard directory (Ray must be running).

    The images are decoded and resized exactly as in training's validation (``image_dataset``, no
    augmentation); the model is in eval mode, channels_last (``predict_dataset``).
    """
    torch.set_num_threads(threads)
    model, meta = load_model(model_path)
    ds = image_dataset(shards_dir, split, policy=None, image_size=meta["image_size"], in_chans=meta["in_chans"],
                       seed=None, cpus_per_task=RAY_RESOURCES["data_cpus"], batch_size=batch_size)
    batches = ds.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64})
    y, proba = predict_dataset(model.to(memory_format=torch.channels_last), batches, tta=tta)
    return classification_metrics(y, proba, meta["class_names"])


HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1")


def headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in (*HEADLINE, "mcc", "majority_rate", "num_samples")}


# ------------------------------------------------------------------------------ CPU cost
def count_macs(model: torch.nn.Module, image_size: int, in_chans: int = 1) -> int:
    """Multiply-accumulates of one forward pass at batch 1, from ``torch.utils.flop_counter.FlopCounterMode``.

    MACs = counted FLOPs / 2. FlopCounterMode counts matrix products and convolutions
    (conv, linear/addmm, bmm...); element-wise work (BatchNorm, ReLU, pooling, SE's sigmoid
    gating, SimAM's statistics) is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(1, in_chans, image_size, image_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops()) // 2


def _timed_runs(model: torch.nn.Module, x: torch.Tensor, warmup: int, runs: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return times


def measure_latency(model: torch.nn.Module, image_size: int, in_chans: int = 1, threads: int = 2,
                    runs: int = 50, warmup: int = 10, batch: int = 32, batch_runs: int = 20) -> dict:
    """CPU latency at batch 1 and throughput at ``batch``: eval mode, channels_last, ``torch.inference_mode``,
    ``threads`` intra-op threads; medians of ``runs`` / ``batch_runs`` timed forward passes after ``warmup``."""
    if runs < 30:
        raise ValueError("latency needs at least 30 timed runs")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.eval().to(memory_format=torch.channels_last)
        x1 = torch.randn(1, in_chans, image_size, image_size).contiguous(memory_format=torch.channels_last)
        xb = torch.randn(batch, in_chans, image_size, image_size).contiguous(memory_format=torch.channels_last)
        t1 = _timed_runs(model, x1, warmup, runs)
        tb = _timed_runs(model, xb, max(3, warmup // 3), batch_runs)
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": threads, "runs": runs, "warmup": warmup,
        "latency_ms_median": 1e3 * statistics.median(t1), "latency_ms_p90": 1e3 * float(np.percentile(t1, 90)),
        "latency_ms_min": 1e3 * min(t1),
        "throughput_batch": batch, "throughput_runs": batch_runs,
        "throughput_images_per_second_median": batch / statistics.median(tb),
    }


def model_cost(model_path: str | Path, image_size: int, threads: list[int], runs: int, batch_runs: int) -> dict:
    """Parameters, MACs, and latency/throughput for each torch thread count, of a model file."""
    model, meta = load_model(model_path)
    return {"params": count_parameters(model), "macs": count_macs(model, image_size, meta["in_chans"]),
            "mac_counter": "torch.utils.flop_counter.FlopCounterMode, MACs = FLOPs / 2",
            "load_average_before": os.getloadavg(),  # 1/5/15 min: other work on the machine skews latency
            "cpu": {str(t): measure_latency(model, image_size, meta["in_chans"], threads=t, runs=runs,
                                            batch_runs=batch_runs) for t in threads}}


# -------------------------------------------------------------------------------- output
def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value) of a list of numbers."""
    vals = [float(v) for v in values]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def fmt_mean_std(values: list[float], digits: int = 3) -> str:
    s = mean_std(values)
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])


def cpu_info() -> dict:
    """The CPU this ran on: model name, the vector / bf16 features that decide precision, capability."""
    from components.train.precision import cpu_flags, cpu_has_native_bf16

    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": model or platform.processor(), "cores": os.cpu_count(),
            "flags": [f for f in wanted if f in cpu_flags()], "native_bf16": cpu_has_native_bf16(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def environment_info() -> dict:
    import ray
    import torchvision

    return {"cpu": cpu_info(), "torch": torch.__version__, "torchvision": torchvision.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "RAY_TRAIN_V2_ENABLED": os.environ.get("RAY_TRAIN_V2_ENABLED"), "load_average_at_start": os.getloadavg(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def wait_healthy(base: str, timeout_s: float = 120.0, proc=None) -> None:
    """Until ``{base}/healthz`` answers 200; fails when ``proc`` (the server's subprocess) exits first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"{base}/healthz", timeout=5.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base}/healthz did not answer 200 within {timeout_s:.0f} s")


def write_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
    say(f"wrote {path}")
    return path


def parse_ints(text: str, what: str = "--seeds") -> list[int]:
    """``"42,43"`` -> ``[42, 43]``."""
    values = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    if not values:
        raise ValueError(f"{what} needs at least one integer")
    return values
