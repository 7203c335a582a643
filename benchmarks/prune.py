"""Compression benchmark on ELPV 4-class: the full ResNet18 against its pruned and int8 edge models.

Rows (each compressed model fine-tuned for the same short budget, distilled from the full model
unless ``--no-distill``; int8 is post-training quantization of an already fine-tuned model):

* ``full``: the uncompressed model: ``--full-model PATH`` (a resops ``model.pt``), else
  ``models/train/model.pt`` from ``dvc repro`` when it exists and its image size, architecture and
  classes match, else trained here once (``--epochs`` 6 at ``--image-size`` 64, like
  benchmarks/models.py, via ``common.train_model``); ``--train-full`` always trains;
* ``unstructured s``: global magnitude pruning of every convolution to sparsity ``s``
  (``--sparsities``, one-shot, as the prune stage with ``prune.steps: 1``), fine-tuned with the
  masks in place, stored as the sparse ``.npz``. Run by dense kernels, so no faster;
* ``structured r``: torch-pruning channel pruning removing ``r`` of the MACs (``--ratios``; L1
  importance, per-layer ratio, as params.yaml's ``prune.structured``), fine-tuned, stored as ``.pt``;
  ``--distill-compare`` fine-tunes each ratio both with and without distillation;
* ``int8 (full)`` and ``structured r + int8`` (``--int8-ratio``, default 0.5): ONNX export and ONNX
  Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax),
  calibrated on ``--calibration-images`` (256) training images (stratified, not augmented);
* reference rows ``... ONNX fp32``: the float ONNX files the int8 models came from, in ONNX Runtime
  (separates the runtime's share of the speed-up from int8's; ``--no-onnx-float`` drops them).

Fine-tuning follows the prune stage (pipelines/stages.py ``_finetune``): the oversampled training
set with online augmentation, AdamW at ``--finetune-lr``, cross-entropy with label smoothing 0.1,
distillation ``alpha`` 0.5 at temperature 4, ``components.prune.finetune_epoch``, 2 torch threads.

Reported per row: parameters (non-zero ones for unstructured), MACs at batch 1, file size, CPU
latency at batch 1 (median of ``--latency-runs`` >= 50 runs after 10 warm-up runs) and throughput
at batch 32 (median of ``--throughput-runs``) with 1 and 2 threads (torch: eval mode,
channels_last, ``inference_mode``, ``torch.set_num_threads``; ONNX: ``OnnxClassifier`` with the
same intra-op thread count), speed-up over the full model's batch-1 latency, and test accuracy /
macro-F1 with their cost against the full model. Latency is measured after every model is built,
with Ray shut down.

    python benchmarks/prune.py [--full-model PATH | --train-full] [--sparsities 0.5,0.7,0.9]
        [--ratios 0.3,0.5,0.7] [--int8-ratio 0.5] [--finetune-epochs 1] [--finetune-max-steps N]
        [--no-distill | --distill-compare] [--threads 1,2] [--latency-runs 50] [--work DIR] [--out FILE]

Prints a Markdown table and writes benchmarks/results/prune.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import common  # benchmarks/common.py (also puts the repository root on sys.path)
from common import (ONLINE_POLICY, RAY_INIT, RAY_RESOURCES, REBALANCE_DEFAULTS, RESULTS, ROOT, SPLIT_SEED,
                    TRAIN_DEFAULTS, class_names, count_macs, elpv_frame, environment_info, evaluate_model_file,
                    headline, label_counts, markdown_table, parse_ints, prepared_elpv, rebalanced_train_shards, say,
                    start_ray, stop_ray, stratified_subset, train_config, train_model, write_json,
                    write_split_shards)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.evaluate import classification_metrics  # noqa: E402
from components.models import count_parameters, list_models, load_model  # noqa: E402
from components.train import image_dataset  # noqa: E402
from components.registry import file_sha256  # noqa: E402

PIPELINE_MODEL = ROOT / "models" / "train" / "model.pt"
PIPELINE_PREPARED_REPORT = ROOT / "data" / "prepared" / "report.json"
PIPELINE_TRAIN_METRICS = ROOT / "metrics" / "train.json"
LATENCY_WARMUP = 10
THROUGHPUT_BATCH = 32
SPEEDUP_GOAL = 2.0
EDGE_KINDS = ("structured", "int8", "structured+int8")  # the rows the acceptance (>= 2x) is about
FINETUNE_THREADS = TRAIN_DEFAULTS["threads_per_worker"]  # the prune stage's torch threads (train.threads_per_worker)


def parse_floats(text: str, what: str, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """``"0.5,0.7"`` -> ``[0.5, 0.7]``, each in the open interval (lo, hi); ``""`` -> ``[]``."""
    values = [float(s) for s in str(text).replace(" ", "").split(",") if s]
    bad = [v for v in values if not lo < v < hi]
    if bad:
        raise ValueError(f"{what}: values must be in ({lo}, {hi}), got {bad}")
    return values


def cpu_info() -> dict:
    """CPU model and the SIMD flags that decide ONNX Runtime's int8 kernels (VNNI or AVX2 only)."""
    info: dict = {"model": None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] is None:
            info["model"] = value.strip()
        if key.strip() == "flags":
            flags = set(value.split())
            info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"})
            break
    return info


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch_pruning

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch_pruning": torch_pruning.__version__,
            "numpy": np.__version__, "mkldnn": torch.backends.mkldnn.is_available()}


# ------------------------------------------------------------------------------ full model
def choose_full_model(args, names: list[str]) -> tuple[Path | None, str]:
    """(path, why) of the full model to use, or (None, why) when it must be trained here."""
    if args.full_model:
        return Path(args.full_model), "--full-model"
    if args.train_full:
        return None, "--train-full"
    if not PIPELINE_MODEL.exists():
        return None, f"{PIPELINE_MODEL.relative_to(ROOT)} does not exist"
    try:
        _, meta = load_model(PIPELINE_MODEL)
    except Exception as exc:  # a half-written or foreign file: train instead
        return None, f"{PIPELINE_MODEL.relative_to(ROOT)} cannot be loaded ({exc})"
    wanted = {"image_size": args.image_size or 64, "model_name": args.model, "in_chans": 1, "class_names": names}
    differs = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
    if differs or "structured" in meta or "pruning" in meta:
        return None, f"{PIPELINE_MODEL.relative_to(ROOT)} does not match (have, want): {differs or 'compressed'}"
    return PIPELINE_MODEL, f"{PIPELINE_MODEL.relative_to(ROOT)} (dvc repro's train stage), image size etc. match"


def check_full_model(path: Path, names: list[str]) -> dict:
    if not path.exists():
        raise SystemExit(f"--full-model {path} does not exist")
    if path.suffix == ".npz":
        raise SystemExit(f"--full-model {path} is a sparse (pruned) model file; give the uncompressed model.pt")
    _, meta = load_model(path)
    if "structured" in meta or "pruning" in meta:
        raise SystemExit(f"--full-model {path} is a compressed model; give the uncompressed model.pt")
    if list(meta["class_names"]) != list(names) or meta["in_chans"] != 1:
        raise SystemExit(f"--full-model {path} has classes {meta['class_names']} / {meta['in_chans']} channel(s); "
                         f"ELPV 4-class needs {names} / 1 channel")
    return meta


# ------------------------------------------------------------------------------ data
def train_batches(shards: Path, meta: dict, batch_size: int, seed: int, policy: str | None = ONLINE_POLICY):
    """Training batches as the prune stage's fine-tune reads them (``_batches``: online augmentation)."""
    ds = image_dataset(shards, None, policy=policy, image_size=meta["image_size"], in_chans=meta["in_chans"],
                       seed=seed if policy else None, cpus_per_task=RAY_RESOURCES["data_cpus"], batch_size=batch_size)
    return ds.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64})


def split_arrays(shards: Path, split: str | None, meta: dict, limit: int | None = None,
                 batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 NCHW, labels) of one split, decoded and resized as in validation (no augmentation)."""
    ds = image_dataset(shards, split, policy=None, image_size=meta["image_size"], in_chans=meta["in_chans"],
                       seed=None, cpus_per_task=RAY_RESOURCES["data_cpus"], batch_size=batch_size)
    xs, ys, n = [], [], 0
    for b in ds.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64}):
        xs.append(b["image"].numpy())
        ys.append(b["label"].numpy())
        n += len(ys[-1])
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ValueError(f"no images in split {split!r} of {shards}")
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def evaluate_onnx_file(path: Path, x: np.ndarray, y: np.ndarray, names: list[str], threads: int = 2) -> dict:
    from components.prune import OnnxClassifier

    clf = OnnxClassifier(path, threads=threads)
    return classification_metrics(y, clf.predict_proba(x, batch_size=128), names)


# ------------------------------------------------------------------------------ fine-tuning
def finetune(model: torch.nn.Module, teacher: torch.nn.Module, shards: Path, meta: dict, args, distill: bool,
             label: str) -> list[dict]:
    """The prune stage's ``_finetune`` with this benchmark's settings: same budget for every model."""
    from components.prune import DistillationLoss, finetune_epoch

    if args.finetune_epochs <= 0:
        return []
    torch.manual_seed(args.seed)  # same initial state of everything random for every compressed model
    torch.set_num_threads(FINETUNE_THREADS)
    base = torch.nn.CrossEntropyLoss(label_smoothing=TRAIN_DEFAULTS["label_smoothing"])  # class_weight: none
    loss = DistillationLoss(teacher if distill else None, temperature=args.temperature,
                            alpha=args.alpha if distill else 0.0, base_loss=base)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.finetune_lr)
    history = []
    for epoch in range(args.finetune_epochs):
        r = finetune_epoch(model, train_batches(shards, meta, TRAIN_DEFAULTS["batch_size"], args.seed + epoch),
                           opt, loss, torch.device("cpu"), max_steps=args.finetune_max_steps)
        n = max(1, r["samples"])
        history.append({"epoch": epoch + 1, "samples": r["samples"], "seconds": r["seconds"],
                        "loss": r["loss_sum"] / n, "train_accuracy": r["correct"] / n, "distilled": distill,
                        **({"soft_loss": r["soft_loss_sum"] / n, "base_loss": r["base_loss_sum"] / n} if distill else {})})
        say(f"fine-tune {label}, epoch {epoch + 1}/{args.finetune_epochs}: loss {r['loss_sum'] / n:.3f} on "
            f"{r['samples']} images in {r['seconds']:.0f} s{' (distilled)' if distill else ''}")
    if args.recalibrate_bn > 0:
        from components.prune import recalibrate_batchnorm

        seen = recalibrate_batchnorm(model, train_batches(shards, meta, TRAIN_DEFAULTS["batch_size"], args.seed,
                                                          policy=None), max_batches=args.recalibrate_bn)
        history.append({"batchnorm_recalibrated_on_images": seen})
    model.eval()
    return history


# ------------------------------------------------------------------------------ CPU cost
def _timed(fn, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _latency_summary(t1: list[float], tb: list[float], threads: int, args) -> dict:
    return {"threads": threads, "runs": args.latency_runs, "warmup": LATENCY_WARMUP,
            "latency_ms_median": 1e3 * statistics.median(t1), "latency_ms_p90": 1e3 * float(np.percentile(t1, 90)),
            "latency_ms_min": 1e3 * min(t1), "throughput_batch": THROUGHPUT_BATCH,
            "throughput_runs": args.throughput_runs,
            "throughput_images_per_second_median": THROUGHPUT_BATCH / statistics.median(tb),
            "load_average_before": os.getloadavg()}


def torch_latency(model: torch.nn.Module, image_size: int, in_chans: int, threads: int, args) -> dict:
    """As ``common.measure_latency`` (eval, channels_last, inference_mode, ``threads`` intra-op threads),
    with this benchmark's run counts (``--latency-runs`` may go below 30 for smoke runs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    try:
        model = model.eval().to(memory_format=torch.channels_last)
        x1 = torch.randn(1, in_chans, image_size, image_size, generator=gen).contiguous(memory_format=torch.channels_last)
        xb = torch.randn(THROUGHPUT_BATCH, in_chans, image_size, image_size,
                         generator=gen).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            t1 = _timed(lambda: model(x1), LATENCY_WARMUP, args.latency_runs)
            tb = _timed(lambda: model(xb), max(3, LATENCY_WARMUP // 3), args.throughput_runs)
    finally:
        torch.set_num_threads(previous)
    return _latency_summary(t1, tb, threads, args)


def onnx_latency(path: Path, image_size: int, in_chans: int, threads: int, args) -> dict:
    """ONNX Runtime on the CPU: ``OnnxClassifier(threads=threads)`` (intra-op threads, sequential
    execution, all graph optimisations), ``session.run`` timed on float32 NCHW inputs."""
    from components.prune import OnnxClassifier

    clf = OnnxClassifier(path, threads=threads)
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, in_chans, image_size, image_size), dtype=np.float32)
    xb = rng.standard_normal((THROUGHPUT_BATCH, in_chans, image_size, image_size), dtype=np.float32)
    run = lambda x: clf.session.run([clf.output_name], {clf.input_name: x})  # noqa: E731
    t1 = _timed(lambda: run(x1), LATENCY_WARMUP, args.latency_runs)
    tb = _timed(lambda: run(xb), max(3, LATENCY_WARMUP // 3), args.throughput_runs)
    return _latency_summary(t1, tb, threads, args)


def nonzero_macs(model: torch.nn.Module, image_size: int, in_chans: int) -> int:
    """MACs a sparse kernel would need: output positions x non-zero weights of every conv/linear layer."""
    from components.prune.structured import output_positions

    positions = output_positions(model, torch.zeros(1, in_chans, image_size, image_size))
    total = 0
    for name, module in model.named_modules():
        if name in positions:
            total += positions[name] * int((module.weight != 0).sum())  # conv: positions x out x in/g x kh x kw
    return total


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_argument_group("full model")
    src.add_argument("--full-model", default=None, help="a resops model.pt to compress (skips training)")
    src.add_argument("--train-full", action="store_true", help="train the full model here even if models/train/model.pt fits")
    src.add_argument("--model", default="resnet18", choices=list_models(), help="architecture when training here")
    src.add_argument("--epochs", type=int, default=6, help="training epochs of the full model when trained here")
    src.add_argument("--image-size", type=int, default=None,
                     help="default 64, or the --full-model's; models/train/model.pt is used only when it matches")
    src.add_argument("--max-train-images", type=int, default=None,
                     help="stratified subset of the training split before oversampling (smoke runs)")
    src.add_argument("--seed", type=int, default=42, help="training, fine-tuning and calibration-subset seed")
    comp = ap.add_argument_group("compression")
    comp.add_argument("--sparsities", default="0.5,0.7,0.9", help="unstructured: global magnitude sparsities ('' = none)")
    comp.add_argument("--ratios", default="0.3,0.5,0.7", help="structured: MAC reductions ('' = none)")
    comp.add_argument("--int8-ratio", type=float, default=0.5,
                      help="the structured ratio (one of --ratios) also quantized to int8; 0 = none")
    comp.add_argument("--no-int8", action="store_true", help="skip the int8 rows")
    comp.add_argument("--importance", default="l1", help="structured: torch-pruning importance (params.yaml: l1)")
    comp.add_argument("--global-pruning", action="store_true", help="structured: rank channels across layers")
    comp.add_argument("--round-to", type=int, default=None,
                      help="structured: keep channel counts multiples of N (e.g. 8; default none, as the prune stage)")
    comp.add_argument("--calibration-images", type=int, default=256, help="int8: training images for calibration")
    comp.add_argument("--reduce-range", action="store_true", help="int8: 7-bit weights (x86 CPUs without VNNI)")
    comp.add_argument("--onnx-exporter", choices=("dynamo", "torchscript"), default="dynamo",
                      help="torch.onnx.export path (the prune stage uses dynamo)")
    comp.add_argument("--no-onnx-float", action="store_true", help="skip the ONNX fp32 reference rows")
    ft = ap.add_argument_group("fine-tuning")
    ft.add_argument("--finetune-epochs", type=int, default=1, help="epochs over the oversampled training set")
    ft.add_argument("--finetune-max-steps", type=int, default=None, help="cap on steps per epoch (default: whole set)")
    ft.add_argument("--finetune-lr", type=float, default=2e-4, help="AdamW learning rate (params.yaml prune.finetune_lr)")
    ft.add_argument("--no-distill", action="store_true", help="fine-tune on the labels only")
    ft.add_argument("--distill-compare", action="store_true",
                    help="fine-tune every structured ratio both with and without distillation")
    ft.add_argument("--temperature", type=float, default=4.0)
    ft.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")
    ft.add_argument("--recalibrate-bn", type=int, default=0,
                    help="re-estimate BatchNorm statistics on N training batches after fine-tuning (0: no, as the prune stage)")
    lat = ap.add_argument_group("CPU cost")
    lat.add_argument("--threads", default="1,2", help="thread counts (torch threads; ONNX Runtime intra-op threads)")
    lat.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 runs after 10 warm-up runs (>= 50 for results)")
    lat.add_argument("--throughput-runs", type=int, default=20, help="timed batch-32 runs")
    ap.add_argument("--work", default=None, help="work dir (prepared ELPV cached there, model files kept); default a temp dir")
    ap.add_argument("--out", default=str(RESULTS / "prune.json"))
    return ap


def check_args(ap: argparse.ArgumentParser, args) -> tuple[list[float], list[float], list[int]]:
    """(sparsities, ratios, threads) parsed; the options checked against each other (``ap.error``)."""
    try:
        sparsities = parse_floats(args.sparsities, "--sparsities")
        ratios = parse_floats(args.ratios, "--ratios")
    except ValueError as exc:
        ap.error(str(exc))
    threads = parse_ints(args.threads, "--threads")
    if args.no_int8:
        args.int8_ratio = 0.0
    if args.int8_ratio and args.int8_ratio not in ratios:
        ap.error(f"--int8-ratio {args.int8_ratio} must be one of --ratios {ratios} (or 0)")
    if args.latency_runs < 1 or args.throughput_runs < 1:
        ap.error("--latency-runs and --throughput-runs must be positive")
    if args.latency_runs < 50:
        say(f"WARNING: --latency-runs {args.latency_runs} < 50: a smoke setting, not a result")
    if args.distill_compare and args.no_distill:
        say("--distill-compare with --no-distill: the main rows are the undistilled ones")
    return sparsities, ratios, threads


def environment(args) -> dict:
    common.setup_environment()
    env = environment_info() | {"versions": versions(), "cpu_info": cpu_info()}
    if "avx512_vnni" not in env["cpu_info"]["flags"] and "avx_vnni" not in env["cpu_info"]["flags"] \
            and not args.reduce_range:
        say("WARNING: no VNNI on this CPU; ONNX Runtime's u8s8 kernels may saturate: consider --reduce-range")
    return env


# ------------------------------------------------------------------------------ one run
@dataclass
class Bench:
    """What the rows of one run share: the options, the data, the full model and the rows built so far."""

    args: argparse.Namespace
    prepared: Path
    names: list[str]
    prepared_digest: str | None
    full_path: Path | None  # None until trained here (obtain_full_model); then the run directory's copy
    full_info: dict
    run_dir: Path
    train_dir: Path
    calib_dir: Path
    data: dict
    rows: list[dict] = field(default_factory=list)  # one per table row; "files" / "kind" drive the cost measurement
    errors: list[dict] = field(default_factory=list)
    structured_files: dict[float, Path] = field(default_factory=dict)  # ratio -> the main arm's file
    meta: dict = field(default_factory=dict)  # the full model's
    teacher: torch.nn.Module | None = None
    test_x: np.ndarray | None = None  # test split as arrays, for the ONNX rows
    test_y: np.ndarray | None = None

    @property
    def distill_main(self) -> bool:
        return not self.args.no_distill

    @property
    def structured_arms(self) -> list[bool]:
        return [self.distill_main, not self.distill_main] if self.args.distill_compare else [self.distill_main]

    @property
    def image_size(self) -> int:
        return self.meta["image_size"]

    @property
    def in_chans(self) -> int:
        return self.meta["in_chans"]

    def attempt(self, label: str, fn) -> None:
        """Build one row; a failure is recorded and the benchmark goes on with the others."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001: report and keep the other rows
            say(f"ERROR in {label}: {type(exc).__name__}: {exc}")
            self.errors.append({"row": label, "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()})
        say(f"{label}: {time.perf_counter() - t0:.0f} s")

    def finetune(self, model: torch.nn.Module, distill: bool, label: str) -> list[dict]:
        return finetune(model, self.teacher, self.train_dir, self.meta, self.args, distill, label)


def resolve_full_model(ap: argparse.ArgumentParser, args, names: list[str]) -> tuple[Path | None, dict]:
    """The full model's file (None: train it here) and ``full_info``; settles ``args.image_size``."""
    full_path, why = choose_full_model(args, names)
    full_info: dict = {"source": why}
    if full_path is not None:
        meta = check_full_model(full_path, names)
        if args.image_size is not None and args.image_size != meta["image_size"]:
            ap.error(f"--image-size {args.image_size} differs from {full_path}'s {meta['image_size']}")
        args.image_size = meta["image_size"]
    elif args.image_size is None:
        args.image_size = 64
    say(f"full model: {full_path or 'trained here'} ({why}); image size {args.image_size}")
    return full_path, full_info


def prepare_run(ap: argparse.ArgumentParser, args, work: Path) -> Bench:
    """The prepared ELPV split, the full model's choice, the oversampled training and the calibration shards."""
    prepared = prepared_elpv(work, "4class", SPLIT_SEED)
    names = class_names(prepared)
    prepared_digest = json.loads((prepared / "report.json").read_text()).get("data_digest")
    full_path, full_info = resolve_full_model(ap, args, names)

    train_frame = elpv_frame(prepared, "train")
    train = stratified_subset(train_frame, args.max_train_images, SPLIT_SEED)
    run_dir = work / f"prune-{time.strftime('%Y%m%d-%H%M%S')}"
    train_dir = run_dir / "train-shards"
    data = rebalanced_train_shards(train, train_dir, len(names), seed=SPLIT_SEED)
    data["train_images_before_oversampling"] = len(train)
    say(f"training set: {len(train)} images {label_counts(train)} -> oversampled {data['counts_after']}")
    calib_frame = stratified_subset(train_frame, args.calibration_images, args.seed)
    calib_dir = write_split_shards(calib_frame, run_dir / "calibration-shards")
    data["calibration"] = {"images": len(calib_frame), "counts": label_counts(calib_frame),
                           "from": "prepared training split (all of it, not the --max-train-images subset), "
                                   "stratified on the label, seeded by --seed; no augmentation"}
    return Bench(args=args, prepared=prepared, names=names, prepared_digest=prepared_digest, full_path=full_path,
                 full_info=full_info, run_dir=run_dir, train_dir=train_dir, calib_dir=calib_dir, data=data)


# ------------------------------------------------------------------------------ the rows
def obtain_full_model(b: Bench) -> None:
    """Train the full model here, or copy the chosen file into the run directory (``b.full_path``)."""
    args, full_info, full_path = b.args, b.full_info, b.full_path
    if full_path is None:
        say(f"training the full model: {args.model}, {args.epochs} epochs at {args.image_size}px, seed {args.seed}")
        cfg = train_config(args.model, b.names, args.image_size, args.epochs, args.seed)
        tr = train_model(cfg, b.train_dir, b.prepared / "shards", b.run_dir / "full.pt", b.run_dir / "ray-storage")
        full_path = Path(tr["model_path"])
        full_info.update(trained_here=True, train_config={k: v for k, v in cfg.items() if k not in ("wandb",)},
                         train_wall_seconds=tr["wall_seconds"], history=tr["history"])
    else:
        # a copy: another `dvc repro` on this machine may rewrite models/train/model.pt meanwhile
        full_info.update(trained_here=False, original_path=str(full_path),
                         original_mtime_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                          time.gmtime(full_path.stat().st_mtime)))
        if full_path.resolve() == PIPELINE_MODEL.resolve():
            if PIPELINE_TRAIN_METRICS.exists():
                full_info["pipeline_train_metrics"] = json.loads(PIPELINE_TRAIN_METRICS.read_text())
            if PIPELINE_PREPARED_REPORT.exists():  # the split it was trained on: the same as ours?
                pipe_digest = json.loads(PIPELINE_PREPARED_REPORT.read_text()).get("data_digest")
                full_info["pipeline_prepared_data_digest"] = pipe_digest
                full_info["same_split_as_pipeline"] = pipe_digest == b.prepared_digest
                if pipe_digest != b.prepared_digest:
                    say("WARNING: data/prepared is not this benchmark's ELPV split: the full model may have "
                        "seen test images in training")
        full_path = Path(shutil.copy2(full_path, b.run_dir / "full.pt"))
    b.full_path = full_path


def add_full_row(b: Bench) -> None:
    """The full model's row; it is also the teacher of the distilled fine-tunes."""
    full_model, meta = load_model(b.full_path)
    b.full_info.update(path=str(b.full_path), sha256=file_sha256(b.full_path), meta=meta)
    b.meta = meta
    b.teacher = full_model.eval().to(memory_format=torch.channels_last)
    m = evaluate_model_file(b.full_path, b.prepared / "shards", "test")
    say(f"full model: test accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
    b.rows.append({"name": "full", "kind": "full", "runtime": "torch", "file": str(b.full_path),
                   "file_format": ".pt", "distilled": None, "test": m})
    if not b.args.no_int8:
        b.test_x, b.test_y = split_arrays(b.prepared / "shards", "test", meta)


def build_unstructured(b: Bench, s: float) -> None:
    """Sparsity ``s``: the prune stage's ``unstructured`` edge builder (components/prune/edge.py) with one
    global step, no fc layer, this benchmark's fine-tune; saved as ``unstructured-{s}.npz``."""
    from components.prune import sparsity_report
    from components.prune.edge import build_edge_model

    model, _ = load_model(b.full_path)
    model = model.to(memory_format=torch.channels_last)
    settings = {"sparsity": s, "steps": 1, "scope": "global", "include_fc": False}
    staging = b.run_dir / f"unstructured-{s}"  # the builder writes model.npz: moved to this benchmark's name
    edge = build_edge_model("unstructured", model, b.meta, settings,
                            lambda m, _: b.finetune(m, b.distill_main, f"unstructured {s}"),
                            staging, b.full_path, b.args.seed)
    path = edge.file.replace(b.run_dir / f"unstructured-{s}.npz")
    staging.rmdir()
    rep = sparsity_report(model, include_fc=False)  # the builder pruned `model` in place: what it saved
    mt = evaluate_model_file(path, b.prepared / "shards", "test")
    say(f"unstructured {s}: sparsity {rep['target_sparsity_measured']:.3f}, test accuracy "
        f"{mt['accuracy']:.3f}, macro-F1 {mt['macro_f1']:.3f}")
    b.rows.append({"name": f"unstructured {s:g}", "kind": "unstructured", "sparsity": s,
                   "runtime": "torch", "file": str(path), "file_format": ".npz (sparse)",
                   "distilled": b.distill_main, "sparsity_report": rep, "finetune": edge.finetune, "test": mt})


def build_structured(b: Bench, r: float) -> None:
    """MAC ratio ``r``: pruned once, fine-tuned per distillation arm (``--distill-compare``: both)."""
    from components.models.checkpoint import save_structured
    from components.prune import structured_prune

    args = b.args
    example = torch.zeros(1, b.in_chans, b.image_size, b.image_size)
    pruned, _ = load_model(b.full_path)
    pruned = pruned.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    rep = structured_prune(pruned, example, target="macs", ratio=r, importance=args.importance,
                           global_pruning=args.global_pruning, round_to=args.round_to, seed=args.seed)
    prune_seconds = time.perf_counter() - t0
    say(rep.summary())
    pruned = pruned.to(memory_format=torch.channels_last)
    for distill in b.structured_arms:
        model = copy.deepcopy(pruned)
        tag = "" if distill == b.distill_main else (" (no distill)" if not distill else " (distilled)")
        hist = b.finetune(model, distill, f"structured {r}{tag}")
        path = save_structured(b.run_dir / f"structured-{r}{'-kd' if distill else '-ce'}.pt", model,
                               b.meta, rep)
        mt = evaluate_model_file(path, b.prepared / "shards", "test")
        say(f"structured {r}{tag}: test accuracy {mt['accuracy']:.3f}, macro-F1 {mt['macro_f1']:.3f}")
        if distill == b.distill_main:
            b.structured_files[r] = path
        b.rows.append({"name": f"structured {r:g}{tag}", "kind": "structured", "ratio": r,
                       "runtime": "torch", "file": str(path), "file_format": ".pt",
                       "distilled": distill, "main_arm": distill == b.distill_main,
                       "structured_report": rep.as_dict(), "prune_seconds": prune_seconds,
                       "finetune": hist, "test": mt})


def build_int8(b: Bench, calib_x: np.ndarray, label: str, ref_label: str, kind: str, source: Path, distilled,
               **extra) -> None:
    """ONNX export of ``source`` and its static int8 quantization (+ the float ONNX reference row)."""
    from components.prune import export_onnx, quantize_onnx

    args = b.args
    model, _ = load_model(source)  # exactly what was saved
    stem = b.run_dir / label.replace(" ", "-").replace("+", "")
    t0 = time.perf_counter()
    fp32 = export_onnx(model, f"{stem}.onnx", b.image_size, b.in_chans,
                       dynamo=args.onnx_exporter == "dynamo")
    export_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = (calib_x[i:i + 32] for i in range(0, len(calib_x), 32))
    qr = quantize_onnx(fp32, f"{stem}.int8.onnx", batches, per_channel=True,
                       reduce_range=args.reduce_range, max_images=args.calibration_images)
    quant_seconds = time.perf_counter() - t0
    mt = evaluate_onnx_file(Path(qr.int8_path), b.test_x, b.test_y, b.names)
    say(f"{label}: ONNX {qr.float_bytes / 1e6:.1f} MB -> int8 {qr.int8_bytes / 1e6:.1f} MB, test "
        f"accuracy {mt['accuracy']:.3f}, macro-F1 {mt['macro_f1']:.3f}")
    common_fields = {"source_file": str(source), "distilled": distilled, "onnx_exporter":
                     args.onnx_exporter, "export_seconds": export_seconds, **extra}
    b.rows.append({"name": label, "kind": kind, "runtime": "onnxruntime", "file": qr.int8_path,
                   "file_format": ".onnx (int8 QDQ)", "quantization": qr.as_dict(),
                   "quantize_seconds": quant_seconds, "test": mt, **common_fields})
    if not args.no_onnx_float:
        mf = evaluate_onnx_file(fp32, b.test_x, b.test_y, b.names)
        b.rows.append({"name": ref_label,
                       "kind": "reference", "runtime": "onnxruntime", "file": str(fp32),
                       "file_format": ".onnx (float32)", "test": mf, **common_fields})


def add_int8_rows(b: Bench) -> None:
    """``int8 (full)`` and ``structured --int8-ratio + int8``, calibrated on the calibration shards."""
    args = b.args
    calib_x, calib_y = split_arrays(b.calib_dir, "train", b.meta, limit=args.calibration_images)
    b.data["calibration"]["images_used"] = int(len(calib_x))
    b.attempt("int8 (full)", lambda: build_int8(b, calib_x, "int8 (full)", "full ONNX fp32", "int8", b.full_path, None))
    if args.int8_ratio:
        if args.int8_ratio in b.structured_files:
            r = args.int8_ratio
            b.attempt(f"structured {r:g} + int8",
                      lambda: build_int8(b, calib_x, f"structured {r:g} + int8", f"structured {r:g} ONNX fp32",
                                         "structured+int8", b.structured_files[r], b.distill_main, ratio=r))
        else:
            b.errors.append({"row": f"structured {args.int8_ratio:g} + int8",
                             "error": "the structured model of that ratio failed"})


def build_rows(b: Bench, sparsities: list[float], ratios: list[float]) -> None:
    """Every model of the table, built and evaluated with Ray running; Ray is shut down at the end."""
    start_ray()
    try:
        obtain_full_model(b)
        add_full_row(b)
        for s in sparsities:
            b.attempt(f"unstructured {s}", lambda s=s: build_unstructured(b, s))
        for r in ratios:
            b.attempt(f"structured {r}", lambda r=r: build_structured(b, r))
        if not b.args.no_int8:
            add_int8_rows(b)
    finally:
        stop_ray()  # the cost measurement below runs with no Ray process of ours alive


# ------------------------------------------------------------------------------ CPU cost of the rows
def measure_rows(b: Bench, threads: list[int]) -> None:
    """File size, parameters, MACs and CPU latency / throughput of every row, then the ratios to the full row."""
    args, rows, image_size, in_chans = b.args, b.rows, b.image_size, b.in_chans
    if os.getloadavg()[0] > 1.0:
        say(f"WARNING: load average {os.getloadavg()[0]:.2f} before the latency measurement: other work on this "
            f"machine skews it (recorded per measurement in the JSON)")
    for row in rows:
        path = Path(row["file"])
        row["file_bytes"] = path.stat().st_size
        say(f"measuring {row['name']} on the CPU ({threads} threads, load average {os.getloadavg()[0]:.2f})")
        if row["runtime"] == "torch":
            model, _ = load_model(path)
            row["params"] = count_parameters(model)
            row["macs"] = count_macs(model, image_size, in_chans)
            if row["kind"] == "unstructured":
                row["nonzero_params"] = row["sparsity_report"]["nonzero_params"]
                row["macs_nonzero"] = nonzero_macs(model, image_size, in_chans)
            row["cpu"] = {str(t): torch_latency(model, image_size, in_chans, t, args) for t in threads}
        else:
            origin = next(r for r in rows if r["file"] == row["source_file"])  # measured before: rows come later
            row["params"], row["macs"] = origin["params"], origin["macs"]
            row["cpu"] = {str(t): onnx_latency(path, image_size, in_chans, t, args) for t in threads}
    full_row = rows[0]
    for row in rows:
        row["speedup_vs_full"] = {str(t): full_row["cpu"][str(t)]["latency_ms_median"] /
                                  row["cpu"][str(t)]["latency_ms_median"] for t in threads}
        row["throughput_ratio_vs_full"] = {
            str(t): row["cpu"][str(t)]["throughput_images_per_second_median"] /
            full_row["cpu"][str(t)]["throughput_images_per_second_median"] for t in threads}
        row["accuracy_cost_vs_full"] = {k: full_row["test"][k] - row["test"][k]
                                        for k in ("accuracy", "balanced_accuracy", "macro_f1")}


# ------------------------------------------------------------------------------ output
def result_table(rows: list[dict], threads: list[int], image_size: int) -> tuple[list[str], list[list]]:
    """(headers, rows) of the Markdown table."""
    full_row = rows[0]
    headers = ["model", "params (M)", f"MMACs @{image_size}px", "file (MB)",
               *[f"b1 ms {t}t" for t in threads], *[f"speed-up {t}t" for t in threads],
               *[f"b32 img/s {t}t" for t in threads], "test acc", "macro-F1", "Δacc (pp)", "ΔF1", "KD"]
    table = []
    for row in rows:
        params = f"{row['params'] / 1e6:.2f}"
        macs = f"{row['macs'] / 1e6:.0f}"
        if row["kind"] == "unstructured":
            params = f"{row['nonzero_params'] / 1e6:.2f} nz"
            macs += f" ({row['macs_nonzero'] / 1e6:.0f} nz)"
        if row["runtime"] == "onnxruntime":
            params += " int8" if row["kind"] != "reference" else ""
        cost = row["accuracy_cost_vs_full"]
        table.append([row["name"] + (" †" if row["kind"] == "reference" else ""), params, macs,
                      f"{row['file_bytes'] / 1e6:.1f}",
                      *[f"{row['cpu'][str(t)]['latency_ms_median']:.2f}" for t in threads],
                      *[f"{row['speedup_vs_full'][str(t)]:.2f}x" for t in threads],
                      *[f"{row['cpu'][str(t)]['throughput_images_per_second_median']:.0f}" for t in threads],
                      f"{row['test']['accuracy']:.3f}", f"{row['test']['macro_f1']:.3f}",
                      "—" if row is full_row else f"{-100 * cost['accuracy'] + 0.0:+.1f}",  # + 0.0: no "-0.0"
                      "—" if row is full_row else f"{-cost['macro_f1'] + 0.0:+.3f}",
                      {None: "—", True: "yes", False: "no"}[row.get("distilled")]])
    return headers, table


def print_table(b: Bench, env: dict, threads: list[int]) -> None:
    """The setting notes and the Markdown table."""
    args, data, full_row = b.args, b.data, b.rows[0]
    headers, table = result_table(b.rows, threads, b.image_size)
    ft_desc = (f"{args.finetune_epochs} epoch(s)" + (f" of at most {args.finetune_max_steps} steps" if
               args.finetune_max_steps else "") + f" over the oversampled training set ({data['rows']} rows), AdamW lr "
               f"{args.finetune_lr:g}, batch {TRAIN_DEFAULTS['batch_size']}, online augmentation '{ONLINE_POLICY}'")
    print(f"\nELPV 4-class, {b.image_size}x{b.image_size} grayscale, test split {full_row['test']['num_samples']} images "
          f"(majority rate {full_row['test']['majority_rate']:.3f}). Full model: {b.full_info['source']}. "
          f"Fine-tune of every pruned model: {ft_desc}; distillation (KD) from the full model at T={args.temperature:g}, "
          f"alpha={args.alpha:g} where 'yes'. int8: ONNX Runtime static QDQ, per-channel int8 weights, uint8 "
          f"activations, MinMax, {data['calibration']['images']} training images, of the fine-tuned model, no "
          f"further fine-tune. torch {env['torch']}, onnxruntime {env['versions']['onnxruntime']}, "
          f"torch-pruning {env['versions']['torch_pruning']}, {env['cpus']} CPUs ({env['cpu_info']['model']}).")
    print(f"Latency: median of {args.latency_runs} batch-1 runs after {LATENCY_WARMUP} warm-up runs; throughput: "
          f"median of {args.throughput_runs} batch-{THROUGHPUT_BATCH} runs; {' and '.join(map(str, threads))} "
          f"thread(s) (Nt = torch.set_num_threads(N) for torch models, eval mode, channels_last, inference_mode; "
          f"ONNX Runtime intra-op threads N for .onnx). Speed-up = full model's batch-1 latency / this one's at the "
          f"same thread count. MACs: FlopCounterMode (conv + linear, FLOPs / 2); unstructured models run dense "
          f"kernels ('nz': what a sparse kernel would need); params 'nz' = non-zero. Δacc / ΔF1: against the full "
          f"model (negative = cost). † reference: the float ONNX file the int8 model was quantized from. Load "
          f"average (1 min) at start {env['load_average_at_start'][0]:.2f}, at end {env['load_average_at_end'][0]:.2f}.\n")
    print(markdown_table(headers, table))


def print_acceptance(b: Bench, threads: list[int]) -> list[dict]:
    """The edge rows reaching the speed-up goal (printed and returned), the failed rows, the smoke note."""
    rows, full_row = b.rows, b.rows[0]
    accepted = []
    print(f"\nAcceptance (a structured or int8 edge model with >= {SPEEDUP_GOAL:g}x batch-1 CPU speed-up over the full "
          f"model), accuracy cost against the full model (acc {full_row['test']['accuracy']:.3f}, "
          f"macro-F1 {full_row['test']['macro_f1']:.3f}):")
    for row in rows:
        if row["kind"] not in EDGE_KINDS:
            continue
        meets = [t for t in threads if row["speedup_vs_full"][str(t)] >= SPEEDUP_GOAL]
        if meets:
            cost = row["accuracy_cost_vs_full"]
            accepted.append({"name": row["name"], "threads": meets, "speedup": row["speedup_vs_full"],
                             "accuracy_cost": cost})
            print(f"- {row['name']}: " + ", ".join(f"{row['speedup_vs_full'][str(t)]:.2f}x at {t} thread(s)"
                                                   for t in threads)
                  + f" (>= {SPEEDUP_GOAL:g}x at {', '.join(map(str, meets))} thread(s)); accuracy cost "
                  f"{100 * cost['accuracy'] + 0.0:+.1f} pp, macro-F1 cost {cost['macro_f1'] + 0.0:+.3f}")
    if not accepted:
        print(f"- none of the structured / int8 rows reached {SPEEDUP_GOAL:g}x")
    if b.errors:
        print("\nFailed rows: " + "; ".join(f"{e['row']}: {e['error']}" for e in b.errors))
    if b.args.latency_runs < 50:
        print(f"\nNOTE: --latency-runs {b.args.latency_runs} < 50: smoke settings, the numbers are not results.")
    return accepted


def run_settings(b: Bench, sparsities: list[float], ratios: list[float], threads: list[int]) -> dict:
    """The JSON's ``settings``: everything that decides the numbers."""
    args = b.args
    return {
        "dataset": "elpv", "task": "4class", "split_seed": SPLIT_SEED, "seed": args.seed, "image_size": b.image_size,
        "max_train_images": args.max_train_images,
        "full_model": {k: v for k, v in b.full_info.items() if k != "history"},
        "unstructured": {"sparsities": sparsities, "scope": "global", "steps": 1, "include_fc": False,
                         "method": "torch.nn.utils.prune L1Unstructured (global), masks kept during fine-tune"},
        "structured": {"ratios": ratios, "target": "macs", "importance": args.importance,
                       "global_pruning": args.global_pruning, "round_to": args.round_to,
                       "distill_compare": args.distill_compare},
        "int8": None if args.no_int8 else {
            "of": ["full", f"structured {args.int8_ratio:g}" if args.int8_ratio else None],
            "format": "qdq", "per_channel": True, "activation_type": "uint8", "weight_type": "int8",
            "calibrate_method": "minmax", "reduce_range": args.reduce_range,
            "calibration_images": args.calibration_images, "onnx_exporter": args.onnx_exporter,
            "opset": 18, "finetuned_after_quantization": False},
        "finetune": {"epochs": args.finetune_epochs, "max_steps_per_epoch": args.finetune_max_steps,
                     "lr": args.finetune_lr, "optimizer": "AdamW (torch defaults otherwise)",
                     "batch_size": TRAIN_DEFAULTS["batch_size"],
                     "label_smoothing": TRAIN_DEFAULTS["label_smoothing"], "class_weight": "none",
                     "online_augmentation": ONLINE_POLICY, "torch_threads": FINETUNE_THREADS,
                     "distill": {"main_rows": b.distill_main, "temperature": args.temperature, "alpha": args.alpha},
                     "recalibrate_bn_batches": args.recalibrate_bn,
                     "loop": "components.prune.finetune_epoch (as pipelines/stages.py _finetune)"},
        "rebalance": REBALANCE_DEFAULTS, "ray_resources": RAY_RESOURCES, "ray_init": RAY_INIT,
        "latency": {"threads": threads, "runs": args.latency_runs, "warmup": LATENCY_WARMUP,
                    "throughput_batch": THROUGHPUT_BATCH, "throughput_runs": args.throughput_runs,
                    "torch": "eval, channels_last, torch.inference_mode, float32, torch.set_num_threads(N)",
                    "onnxruntime": "components.prune.OnnxClassifier(threads=N): intra-op N, inter-op 1, "
                                   "sequential, ORT_ENABLE_ALL; session.run on float32 NCHW",
                    "when": "after all models are built, Ray shut down, each model loaded from its file"},
        "mac_counter": "torch.utils.flop_counter.FlopCounterMode; MACs = FLOPs / 2 (conv, linear); int8 rows: "
                       "the source model's MACs (int8 MACs)",
        "speedup": "full model's torch batch-1 median latency / this row's, same thread count",
        "acceptance": f">= {SPEEDUP_GOAL:g}x speed-up of a row of kind {list(EDGE_KINDS)}",
        "model_selection": "weights after the last fine-tune step; test split used once per model",
    }


def result_json(b: Bench, env: dict, settings: dict, accepted: list[dict]) -> dict:
    return {
        "benchmark": "prune",
        "settings": settings,
        "data": {**b.data, "class_names": b.names, "prepared_data_digest": b.prepared_digest},
        "environment": env,
        "results": [{k: (headline(v) | {"per_class": v["per_class"], "confusion_matrix": v["confusion_matrix"],
                                        "roc_auc_ovr": v["roc_auc_ovr"]} if k == "test" else v)
                     for k, v in row.items()} for row in b.rows],
        "full_model_history": b.full_info.get("history"),
        "acceptance": {"goal_speedup": SPEEDUP_GOAL, "rows_meeting": accepted},
        "errors": b.errors,
    }


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    sparsities, ratios, threads = check_args(ap, args)
    env = environment(args)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="resops-bench-prune-") as tmp:
        b = prepare_run(ap, args, Path(args.work or tmp))
        build_rows(b, sparsities, ratios)
        measure_rows(b, threads)

    env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env["load_average_at_end"] = os.getloadavg()
    env["wall_seconds"] = time.perf_counter() - t_start
    print_table(b, env, threads)
    accepted = print_acceptance(b, threads)
    write_json(args.out, result_json(b, env, run_settings(b, sparsities, ratios, threads), accepted))


if __name__ == "__main__":
    main()
