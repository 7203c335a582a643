"""Training throughput: the resops Ray Train loop against a plain single-process PyTorch loop, same
model, image size, batch size, augmentation policy and precision, in one run.

* plain loop: images decoded and resized once, the augmentation policy applied per batch in the
  loop (what a single-file script does);
* resops Ray Train, ``train.data_cache: memory`` (the default): each worker reads its shard once
  through Ray Data, keeps it at the training size, and augments in a background thread;
* resops Ray Train, ``stream``: Ray Data decodes and augments every epoch (for data sets that do not
  fit in memory), and 2 workers (DDP, gloo) with the memory cache;
* fp32 and bf16 autocast for the plain loop and the 1-worker memory path, whatever this CPU is
  (``train.precision: auto`` picks bf16 only where the CPU has native bf16: see ``cpu``).

    python benchmarks/train_throughput.py [--images 960] [--image-size 128] [--batch-size 32] [--epochs 3]

Ray Train figures are the mean of the epochs after the first (steady state); the wall time of each run, Ray start-up and the
one-off data load included, is reported beside them. Prints a table and writes
benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from components.augment.operator import AugmentOperator
from components.data.images import DEFAULT_MAX_PIXELS
from components.data.prepare import prepare_dataset
from components.data.shards import read_shards, write_shards
from components.data.sources import get_source
from components.models import create_model
from components.train import fit, image_dataset
from components.train.memory import standardise
from components.train.precision import autocast
from components.train.settings import RECIPE_OFF

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def elpv_train_subset(n: int, work: Path, seed: int = 42) -> Path:
    """The first ``n`` images of ELPV's training split as shards (the real data, real decoding)."""
    prepared = work / "prepared"
    get_source("elpv").ingest(work / "raw")
    prepare_dataset(work / "raw", prepared, "elpv", "4class", seed=seed)
    train = read_shards(prepared / "shards", split="train").sample(n=n, random_state=seed)
    write_shards(train, work / "subset", rows_per_shard=256)
    return work / "subset"


def plain_loop(shards: Path, image_size: int, batch_size: int, threads: int, steps: int, policy: str | None,
               precision: str) -> float:
    """A plain PyTorch loop in this process: images decoded and resized up front, ``policy`` applied
    per batch in the loop (albumentations, as resops does), ``precision`` autocast."""
    torch.set_num_threads(threads)
    df = read_shards(shards)
    op = AugmentOperator(policy, "tensor", image_size, seed=0)
    images = AugmentOperator(None, "uint8", image_size)({"image": df["image"].to_numpy(),
                                                         "label": df["label"].to_numpy()})["image"]
    labels = df["label"].to_numpy()
    model = create_model("resnet18", 4, 1).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    n = len(df)
    done, t0 = 0, None
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            t0, done = time.perf_counter(), 0
        idx = np.random.default_rng(step).choice(n, batch_size, replace=False)
        x = torch.from_numpy(standardise(np.stack([op._augment(im) for im in images[idx]])))
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels[idx])
        opt.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), precision):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        done += batch_size
    return done / (time.perf_counter() - t0)


def data_pipeline_only(shards: Path, image_size: int, batch_size: int, policy: str) -> float:
    ds = image_dataset(shards, None, policy=policy, image_size=image_size, in_chans=1, seed=0,
                       cpus_per_task=0.5, batch_size=batch_size)
    ds.materialize()  # warm the read path once; the timed pass streams again
    t0, n = time.perf_counter(), 0
    for b in ds.iter_torch_batches(batch_size=batch_size):
        n += len(b["label"])
    return n / (time.perf_counter() - t0)


def ray_train(shards: Path, work: Path, image_size: int, batch_size: int, workers: int, epochs: int, *,
              cache: str, precision: str, policy: str) -> dict:
    threads = max(1, 2 // workers)
    cfg = dict(RECIPE_OFF, schedule="cosine", max_pixels=DEFAULT_MAX_PIXELS, model_name="resnet18", num_classes=4, class_names=["0", "1", "2", "3"], in_chans=1,
               image_size=image_size, epochs=epochs, batch_size=batch_size, lr=1e-3, weight_decay=0.05,
               label_smoothing=0.1, shuffle_buffer=0, class_weights=None, threads_per_worker=threads, seed=0,
               wandb={"mode": "disabled"}, data_cache=cache, precision=precision,
               run_name=f"bench-{workers}w-{cache}-{precision}-{time.time_ns()}")
    t0 = time.perf_counter()
    res = fit(cfg, shards, shards, work / "ckpt", work / f"model-{workers}.pt", num_workers=workers,
              cpus_per_worker=1.0 / workers, data_cpus=0.5, max_failures=0, keep_checkpoints=2, online_policy=policy,
              use_gpu=False, select_by="last")
    wall = time.perf_counter() - t0
    per_epoch = [h["images_per_second"] for h in res.history]
    steady = float(np.mean(per_epoch[1:] or per_epoch))  # after the first epoch: no start-up in it
    return {"images_per_second": steady, "wall_seconds": wall, "threads_per_worker": threads,
            "cpus_per_worker": 1.0 / workers, "data_cache": cache, "precision": res.history[-1]["precision"],
            "per_epoch": per_epoch,
            "train_seconds": res.history[-1]["train_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--plain-steps", type=int, default=60)
    ap.add_argument("--worker-niceness", type=int, default=0, help="Ray worker priority (Ray's default: 15)")
    ap.add_argument("--policy", default="el", help="augmentation policy of every arm (components/augment/policies.py)")
    ap.add_argument("--out", default=str(ROOT / "results" / "train_throughput.json"))
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import ray.data

    from benchmarks.common import _free_port, cpu_info, say

    size, bs, pol = args.image_size, args.batch_size, args.policy
    rows, ray_rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = elpv_train_subset(args.images, work)
        native = cpu_info()["native_bf16"]
        plain_fp32 = []  # measured before and after the Ray Train runs: the machine drifts by ~10 %

        def plain(prec: str) -> float:
            # without native bf16 the arithmetic is emulated (about 10x slower): a few steps tell
            steps = args.plain_steps if prec == "fp32" or native else max(4, args.plain_steps // 8)
            v = plain_loop(shards, size, bs, 2, steps, pol, prec)
            say(f"plain loop {prec}: {v:.1f} img/s ({steps} steps)")
            return v

        plain_fp32.append(plain("fp32"))
        # The dashboard is on, as in the pipeline (ray.include_dashboard): Ray Train V2's placement-group
        # cleaner polls its State API and retries when there is none. A free port: never another Ray's.
        # Workers at the daemons' priority, as init_ray starts the local Ray (params ray.worker_niceness);
        # --worker-niceness 15 is Ray's own default.
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
        ray.init(num_cpus=2, include_dashboard=True, dashboard_port=_free_port(), logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        arms = [("resops Ray Train, 1 worker, memory cache, fp32", 1, "memory", "fp32"),
                ("resops Ray Train, 1 worker, memory cache, bf16", 1, "memory", "bf16"),
                ("resops Ray Train, 1 worker, streamed (Ray Data every epoch), fp32", 1, "stream", "fp32"),
                ("resops Ray Train, 2 workers x 1 thread (DDP, gloo), memory, fp32", 2, "memory", "fp32")]
        if not native:  # emulated bf16 would take most of an hour here and tell nothing about resops
            arms = [a for a in arms if a[3] != "bf16"]
        for name, workers, cache, prec in arms:
            say(f"{name} ...")
            ray_rows[name] = ray_train(shards, work, size, bs, workers, args.epochs, cache=cache, precision=prec,
                                       policy=pol)
            say(f"{name}: {ray_rows[name]['per_epoch']} img/s per epoch")
        data_only = data_pipeline_only(shards, size, bs, pol)  # last: its Ray Data workers stay behind
        ray.shutdown()
        plain_fp32.append(plain("fp32"))
        rows["plain PyTorch loop, fp32"] = float(np.mean(plain_fp32))
        rows["plain PyTorch loop, bf16"] = plain("bf16")

    report(args, rows, ray_rows, data_only, plain_fp32)


def report(args, rows: dict, ray_rows: dict, data_only: float, plain_fp32: list[float]) -> None:
    """Print the table and write the JSON: every arm against the plain loop of its precision."""
    import ray

    from benchmarks.common import cpu_info

    size, bs, pol = args.image_size, args.batch_size, args.policy
    table = []
    for name, v in rows.items():
        table.append((name, v, 1.0, None))
    for name, r in ray_rows.items():
        base = rows[f"plain PyTorch loop, {r['precision']}"]  # equal precision
        table.append((name, r["images_per_second"], r["images_per_second"] / base, r["wall_seconds"]))
    table.insert(2, ("Ray Data pipeline alone (decode + augment, no model)", data_only,
                     data_only / rows["plain PyTorch loop, fp32"], None))
    cpu = cpu_info()
    print(f"\nResNet18, {size}x{size} grayscale, batch {bs}, policy {pol}, {args.images} ELPV training images, "
          f"{os.cpu_count()} CPUs ({cpu['model']}, {cpu['torch_cpu_capability']}, native bf16: {cpu['native_bf16']}), "
          f"torch {torch.__version__}")
    print(f"{'configuration':68s} {'img/s':>8s} {'vs plain, same precision':>25s} {'run wall s':>11s}")
    for name, v, ratio, wall in table:
        print(f"{name:68s} {v:8.1f} {ratio:24.2f}x {'' if wall is None else f'{wall:11.0f}'}")
    bf16_speedup = rows["plain PyTorch loop, bf16"] / rows["plain PyTorch loop, fp32"]
    print(f"bf16 autocast / fp32, plain loop: {bf16_speedup:.2f}x")
    result = {
        "benchmark": "train_throughput", "image_size": size, "batch_size": bs, "policy": pol,
        "images": args.images, "epochs": args.epochs, "ray_worker_niceness": args.worker_niceness, "cpus": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
        "ray": ray.__version__, "machine": platform.machine(), "started_load_average": os.getloadavg(),
        "results": {name: {"images_per_second": v, "ratio_to_plain_same_precision": ratio, "run_wall_seconds": wall}
                    for name, v, ratio, wall in table},
        "bf16_over_fp32_plain": bf16_speedup, "ray_runs": ray_rows, "plain_fp32_before_after": plain_fp32,
        "note": None if cpu["native_bf16"] else "no native bf16 on this CPU: bf16 autocast is emulated, so "
                "train.precision auto trains in fp32 here and the Ray Train bf16 run is skipped",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
