"""The per-worker training loop run by Ray Train (and the single-epoch helpers prune re-uses)."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.evaluate.metrics import summary_from_confusion
from components.models.checkpoint import save_model, unwrap
from components.models.registry import create_model
from components.models.transfer import backbone_parameters, head_parameters, load_pretrained
from components.progress import post
from components.train.precision import autocast, describe, grad_scaler, resolve_precision

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


def model_meta(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("model_name", "num_classes", "in_chans", "image_size", "class_names")} | {
        "model_kwargs": cfg.get("model_kwargs", {})}


SCHEDULES = ("cosine", "linear", "onecycle")
SELECT_BY = ("last", "val_macro_f1", "val_balanced_accuracy", "val_accuracy", "val_loss")


def lr_factor(progress: float, schedule: str = "cosine", warmup: float = 0.0) -> float:
    """The learning-rate multiplier at ``progress`` in [0, 1] of the run (steps, or the time budget).

    ``cosine`` and ``linear``: a linear warm-up over the first ``warmup`` fraction, then cosine or
    linear decay to zero at the end. ``onecycle``: torch's OneCycleLR shape (cosine up from lr/25 over
    the first 30%, cosine down to lr/25e4), the schedule of super-convergence.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {schedule!r}")
    t = min(max(progress, 0.0), 1.0)
    if schedule == "onecycle":
        peak, start, end = 0.3, 1 / 25, 1 / 25e4
        if t < peak:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * t / peak))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (t - peak) / (1 - peak)))
    if t < warmup:
        return max(t / warmup, 1e-3)
    rest = (t - warmup) / max(1e-9, 1 - warmup)
    return 0.5 * (1 + math.cos(math.pi * rest)) if schedule == "cosine" else 1 - rest


def train_one_epoch(model: nn.Module, batches, optimizer, loss_fn, device: torch.device, scaler=None,
                    max_steps: int | None = None, frozen: list[nn.Parameter] | None = None,
                    loss_takes_inputs: bool = False, precision: str = "fp32", before_step=None, after_step=None,
                    mix=None) -> dict:
    """One pass over ``batches`` (dicts with float ``image`` NCHW and int ``label``).

    ``loss_takes_inputs``: call ``loss_fn(logits, y, inputs=x)`` (a distillation loss runs its
    teacher on the batch) instead of ``loss_fn(logits, y)``.

    ``frozen`` parameters get no update: their gradients are dropped before the optimizer step
    (AdamW skips a parameter without a gradient). Dropping rather than ``requires_grad=False``
    keeps DDP's gradient buckets identical on every epoch.

    ``precision``: a resolved precision (:func:`components.train.precision.resolve_precision`).
    ``before_step()`` runs before each step (it sets the learning rate) and returns False to end the
    epoch there (a spent time budget); ``after_step()`` runs after each optimizer step (weight EMA).
    ``mix(x, y) -> (x, soft_targets)``: mixup / cutmix.
    """
    model.train()
    seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        if before_step is not None and not before_step():
            break
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device, non_blocking=True)
        target = y
        if mix is not None:
            x, target = mix(x, y)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)
            loss = loss_fn(logits, target, inputs=x) if loss_takes_inputs else loss_fn(logits, target)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for param in frozen or ():
            param.grad = None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if after_step is not None:
            after_step()
        n = len(y)
        seen += n
        loss_sum += float(loss.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
    dt = time.perf_counter() - t0
    return {"samples": seen, "loss_sum": loss_sum, "correct": correct, "seconds": dt}


@torch.no_grad()
def confusion(model: nn.Module, batches, num_classes: int, device: torch.device,
              precision: str = "fp32") -> tuple[np.ndarray, float, int]:
    """Confusion matrix (rows = true), summed loss and count over ``batches``."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n = 0.0, 0
    for batch in batches:
        x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device)
        with autocast(device, precision):
            logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        n += len(y)
        idx = (y.cpu() * num_classes + logits.argmax(1).cpu())
        cm += torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return cm.numpy(), loss_sum, n


def _all_reduce(values: list[float] | np.ndarray, device: torch.device, op: str = "sum") -> np.ndarray:
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op={"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
                                            "max": torch.distributed.ReduceOp.MAX}[op])
    return t.cpu().numpy()


def batch_mixer(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0, seed: int = 0):
    """``mix(x, y) -> (x, soft targets)`` with torchvision's MixUp / CutMix (one of the two at random
    when both alphas are set), applied to a batch with probability ``prob``; None when both are off."""
    from torchvision.transforms import v2

    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if not ops:
        return None
    op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
    rng = np.random.default_rng(seed)

    def mix(x: torch.Tensor, y: torch.Tensor):
        if rng.random() >= prob:
            return x, nn.functional.one_hot(y, num_classes).float()
        return op(x, y)

    return mix


class _WandbSink:
    """Per-epoch metrics to wandb from rank 0; offline unless the user configured a key. ``WANDB_MODE``
    in the environment wins over params.yaml's ``wandb.mode``."""

    def __init__(self, cfg: dict):
        self.run = None
        wb = cfg.get("wandb") or {}
        mode = os.environ.get("WANDB_MODE") or wb.get("mode", "offline")
        if mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        Path(wb.get("dir", "wandb")).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=wb.get("project", "resops"), mode=mode,
                              dir=wb.get("dir"), id=cfg["run_name"], resume="allow", name=cfg["run_name"],
                              config={k: v for k, v in cfg.items() if k not in ("wandb", "class_weights", "progress_board")},
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def progress(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver once.

    Ray Train V2 patches ``print`` into its own logger, which reaches the console several
    times over; writing to the file descriptor keeps one readable line per epoch.
    """
    os.write(1, (line + "\n").encode())


def restore_checkpoint(checkpoint, model: nn.Module) -> dict:
    """Load a Ray Train checkpoint's weights into ``model``; return its training state
    (optimizer, epoch, history, and what else the loop saved)."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)["state_dict"])
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def report_epoch(record: dict, model: nn.Module, cfg: dict, rank: int, epoch: int, state) -> None:
    """``ray.train.report`` one epoch's metrics; rank 0 attaches the checkpoint ``epoch_NNNN``: the
    model file and ``state()`` (the training state, built only on rank 0)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save_model(Path(tmp) / MODEL_FILE, model, model_meta(cfg))
            torch.save(state(), Path(tmp) / STATE_FILE)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        else:
            ray.train.report(record, checkpoint=None)


def _ema_model(model: nn.Module, decay: float | None):
    """torch's weight EMA (parameters and BatchNorm buffers) of ``model``, or None."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(float(decay)), use_buffers=True)


def _val_batches(val, shard, batch_size: int = 128):
    """Validation batches: from memory (a :class:`MemorySplit`'s tensors) or streamed from the shard."""
    if val is None:
        return shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64})
    x, y = val
    return ({"image": x[i:i + batch_size], "label": y[i:i + batch_size]} for i in range(0, len(y), batch_size))


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker entry point: DDP ResNet training with a checkpoint every epoch.

    On (re)start the loop resumes from ``ray.train.get_checkpoint()``: the model, optimizer, step,
    training time spent, weight EMA and the metric history of the epochs already done.

    The learning rate follows ``schedule`` over the run's progress: steps done of ``epochs`` epochs,
    or, with ``budget_minutes``, the training time spent of the budget, whichever is further; the
    run ends when either is used up (``epochs`` is then an upper bound). Training time counts the
    training steps (with their data), not validation or checkpointing.
    """
    import ray.train
    import ray.train.torch

    from components.augment.operator import AugmentOperator
    from components.train.memory import MemorySplit, epoch_order

    torch.set_num_threads(int(cfg["threads_per_worker"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.get("precision", "fp32"), device)
    seed = int(cfg["seed"])
    torch.manual_seed(seed + rank)

    model = create_model(cfg["model_name"], cfg["num_classes"], cfg["in_chans"], **cfg.get("model_kwargs", {}))
    checkpoint = ray.train.get_checkpoint()
    if cfg.get("pretrained") and not checkpoint:  # a resumed run has its own weights
        report = load_pretrained(model, cfg["pretrained"], in_chans=cfg["in_chans"])
        if rank == 0:
            progress("[train] " + report.summary().replace("\n", "\n[train] "))
    model = model.to(memory_format=torch.channels_last)
    epochs, batch_size = int(cfg["epochs"]), int(cfg["batch_size"])
    # Fine-tuning: the backbone may learn at a fraction of the head's rate, or not at all for the
    # first `freeze_backbone_epochs` epochs (linear probing before full fine-tuning).
    backbone, head = backbone_parameters(model), head_parameters(model)
    lr, scale = float(cfg["lr"]), float(cfg.get("backbone_lr_scale", 1.0))
    freeze_epochs = int(cfg.get("freeze_backbone_epochs", 0))
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": lr * scale}, {"params": head, "lr": lr}],
                                  lr=lr, weight_decay=float(cfg["weight_decay"]))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    start_epoch, step, seconds_done, history, state = 0, 0, 0.0, [], None
    if checkpoint:
        state = restore_checkpoint(checkpoint, model)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]) + 1, json.loads(state["history"])
        step, seconds_done = int(state["step"]), float(state["train_seconds"])
        if rank == 0:
            progress(f"[train] resuming from the checkpoint of epoch {start_epoch} of {epochs}")
    ema = _ema_model(model, cfg.get("ema_decay"))
    if ema is not None and state is not None:  # the checkpoint's model file holds the EMA weights
        ema.module.load_state_dict(unwrap(model).state_dict())
        ema.n_averaged.fill_(int(state["ema_n_averaged"]))
        model.load_state_dict(state["raw_state_dict"])
    model = ray.train.torch.prepare_model(model)
    exported = (lambda: ema.module) if ema is not None else (lambda: model)
    weights = cfg.get("class_weights")
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
                                  label_smoothing=float(cfg["label_smoothing"]))
    scaler = grad_scaler(device, precision)
    mix_cfg = cfg.get("mix") or {}
    mix = batch_mixer(cfg["num_classes"], float(mix_cfg.get("mixup", 0)), float(mix_cfg.get("cutmix", 0)),
                      float(mix_cfg.get("prob", 1.0)), seed=seed * 1000 + rank)
    sink = _WandbSink(cfg) if rank == 0 else None

    memory = cfg.get("data_cache", "stream") == "memory"
    if memory:  # read once, decoded at the training size; augmented here every epoch
        t_load = time.perf_counter()
        common = dict(rank=rank, world=world, image_size=cfg["image_size"], in_chans=cfg["in_chans"],
                      max_pixels=int(cfg.get("max_pixels", 50_000_000)), threads=int(cfg["threads_per_worker"]))
        train_mem = MemorySplit.from_files(cfg["train_files"], None, **common)
        val_mem = MemorySplit.from_files(cfg["val_files"], "val", **common).tensors()
        train_shard = val_shard = None
        steps_per_epoch = int(_all_reduce([math.ceil(len(train_mem) / batch_size)], device, "min")[0])
        operator = AugmentOperator(cfg.get("online_policy"), "tensor", cfg["image_size"], cfg["in_chans"],
                                   seed=seed * 7919 + rank)
        if rank == 0:
            progress(f"[train] {len(train_mem)} training and {len(val_mem[1])} validation images in memory at "
                     f"{cfg['image_size']} px ({time.perf_counter() - t_load:.1f} s); precision {precision}")
    else:
        train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        train_mem = val_mem = None
        steps_per_epoch = max(1, math.ceil(int(cfg.get("train_rows", 0)) / world / batch_size))
    total_steps = max(1, epochs * steps_per_epoch)
    budget = float(cfg["budget_minutes"]) * 60 if cfg.get("budget_minutes") else None
    schedule, warmup = cfg.get("schedule", "cosine"), float(cfg.get("warmup", 0.0))
    k = cfg["num_classes"]
    clock = {"epoch_start": None, "posted": 0.0}  # epoch_start: set while an epoch runs (its time counts
    # towards the budget); posted: when the driver's progress bar was last told (components.progress)
    board = cfg.get("progress_board") if rank == 0 else None

    def after_step() -> None:
        if ema is not None:
            ema.update_parameters(unwrap(model))
        if board is not None and time.perf_counter() - clock["posted"] >= 0.5:
            clock["posted"] = time.perf_counter()
            post(board, run_progress(), f"epoch {epoch + 1}/{epochs}" + (f", val_f1 {history[-1]['val_macro_f1']:.3f}"
                                                                            if history else ""))

    def run_progress() -> float:
        done = step / total_steps
        if budget:
            running = time.perf_counter() - clock["epoch_start"] if clock["epoch_start"] is not None else 0.0
            done = max(done, (seconds_done + running) / budget)
        return done

    def before_step() -> bool:
        nonlocal step
        prog = run_progress()
        if budget and world > 1:  # every rank stops at the same step
            prog = float(_all_reduce([prog], device, "max")[0])
        if prog >= 1.0:
            return False
        factor = lr_factor(prog, schedule, warmup)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * factor
        step += 1
        return True

    epoch = start_epoch
    # A resumed run goes on while its schedule has room: more epochs or a larger budget than the run
    # that wrote the checkpoint continue it; a spent budget or the last epoch ends it.
    finished = run_progress() >= 1.0 - 1e-9
    while epoch < epochs and not finished:
        if memory:
            order = epoch_order(len(train_mem), steps_per_epoch, batch_size, seed * 100_003 + epoch * 101 + rank)
            batches = train_mem.batches(order, batch_size, operator)
        else:
            batches = train_shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32,
                                                                                    "label": torch.int64},
                                                     local_shuffle_buffer_size=int(cfg.get("shuffle_buffer", 0)) or None,
                                                     drop_last=False, prefetch_batches=2)
        clock["epoch_start"] = time.perf_counter()
        tr = train_one_epoch(model, batches, optimizer, loss_fn, device, scaler, precision=precision,
                             frozen=backbone if epoch < freeze_epochs else None, before_step=before_step,
                             after_step=after_step, mix=mix)
        seconds_done += tr["seconds"]
        clock["epoch_start"] = None
        finished = run_progress() >= 1.0 - 1e-9 or epoch + 1 >= epochs
        if budget and world > 1:
            finished = bool(_all_reduce([float(finished)], device, "max")[0])
        lr_now = optimizer.param_groups[-1]["lr"]  # the head's
        cm, vloss, vn = confusion(exported(), _val_batches(val_mem, val_shard), k, device, precision)
        tot = _all_reduce([tr["samples"], tr["loss_sum"], tr["correct"], vloss, vn, *cm.ravel()], device)
        samples = max(1.0, tot[0])
        val = summary_from_confusion(tot[5:].reshape(k, k))
        record = {
            "epoch": epoch + 1, "start_epoch": start_epoch, "lr": lr_now, "step": step,
            "train_seconds": seconds_done, "precision": precision,
            "train_loss": tot[1] / samples, "train_accuracy": tot[2] / samples,
            "val_loss": tot[3] / max(1.0, tot[4]), "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_f1": val["macro_f1"],
            "images_per_second": tot[0] / max(tr["seconds"], 1e-9) if world == 1 else
            float(_all_reduce([tr["samples"] / max(tr["seconds"], 1e-9)], device)[0]),
        }
        record = {key: (float(v) if isinstance(v, (np.floating, float)) else v) for key, v in record.items()}
        history.append(record)
        if rank == 0:
            progress(f"[train] epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.3f}  "
                     f"acc {record['train_accuracy']:.3f}  val_loss {record['val_loss']:.3f}  "
                     f"val_acc {record['val_accuracy']:.3f}  val_bal_acc {record['val_balanced_accuracy']:.3f}  "
                     f"val_f1 {record['val_macro_f1']:.3f}  {record['images_per_second']:.1f} img/s  lr {lr_now:.2e}"
                     + (f"  {seconds_done / 60:.1f}/{budget / 60:.1f} min" if budget else ""))
            sink.log(record, step=epoch + 1)
        report_epoch(record, exported(), cfg, rank, epoch, lambda: {
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "train_seconds": seconds_done,
            "history": json.dumps(history), "finished": finished,
            **({"raw_state_dict": unwrap(model).state_dict(), "ema_n_averaged": int(ema.n_averaged)}
               if ema is not None else {})})
        epoch += 1
    if sink is not None:
        sink.finish()
