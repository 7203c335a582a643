"""The per-worker training loop run by Ray Train (and the single-epoch helpers prune re-uses).

The worker plumbing the detector and GAN loops share with this one (rank and device, progress
lines, checkpoints, all-reduce, wandb) is in :mod:`components.train.worker`; its names stay
importable from here.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
from torch import nn

from components.evaluate.metrics import summary_from_confusion
from components.models.checkpoint import unwrap
from components.models.registry import create_model
from components.models.transfer import backbone_parameters, head_parameters, load_pretrained
from components.train.precision import autocast, grad_scaler
from components.train.worker import (MODEL_FILE, STATE_FILE, BoardPoster, WandbSink, Worker, all_reduce, model_meta,
                                     progress, report_epoch, restore_checkpoint, start_worker, weights_spread)

__all__ = ["MODEL_FILE", "SCHEDULES", "SELECT_BY", "STATE_FILE", "WandbSink", "all_reduce", "batch_mixer", "confusion",
           "lr_factor", "model_meta", "progress", "report_epoch", "restore_checkpoint", "train_loop_per_worker",
           "train_one_epoch"]

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




class _Schedule:
    """The run's progress and the learning rate it sets before every step.

    Progress is the steps done of ``epochs`` x ``steps_per_epoch`` or, with ``budget_minutes``, the
    training time spent of the budget, whichever is further (training time counts the training
    steps with their data, not validation or checkpointing); the rate follows ``schedule``.
    ``after_step`` updates the weight EMA and posts to the driver's progress bar.
    """

    def __init__(self, cfg: dict, w: Worker, optimizer, base_lrs: list[float], steps_per_epoch: int, ema,
                 model: nn.Module, history: list[dict], step: int = 0, seconds_done: float = 0.0):
        self.epochs, self.w, self.optimizer, self.base_lrs = int(cfg["epochs"]), w, optimizer, base_lrs
        self.total_steps = max(1, self.epochs * steps_per_epoch)
        self.budget = float(cfg["budget_minutes"]) * 60 if cfg["budget_minutes"] else None
        self.schedule, self.warmup = cfg["schedule"], float(cfg["warmup"])
        self.ema, self.model, self.history = ema, model, history
        self.step, self.seconds_done, self.epoch = step, seconds_done, 0
        self.epoch_start = None  # set while an epoch runs: its time counts towards the budget
        self.post = BoardPoster(cfg, w.rank)

    def progress(self) -> float:
        done = self.step / self.total_steps
        if self.budget:
            running = time.perf_counter() - self.epoch_start if self.epoch_start is not None else 0.0
            done = max(done, (self.seconds_done + running) / self.budget)
        return done

    def spent(self) -> bool:
        """Whether the run's steps or budget are used up."""
        return self.progress() >= 1.0 - 1e-9

    def before_step(self) -> bool:
        prog = self.progress()
        if self.budget and self.w.world > 1:  # every rank stops at the same step
            prog = float(all_reduce([prog], self.w.device, "max")[0])
        if prog >= 1.0:
            return False
        factor = lr_factor(prog, self.schedule, self.warmup)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor
        self.step += 1
        return True

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.model))
        self.post(self.progress, lambda: f"epoch {self.epoch + 1}/{self.epochs}" + (
            f", val_f1 {self.history[-1]['val_macro_f1']:.3f}" if self.history else ""))


class _EpochData:
    """The worker's training batches of an epoch and its validation batches: from memory
    (``data_cache: memory``: read once, decoded at the training size, augmented here every epoch)
    or streamed from the Ray Data shards."""

    def __init__(self, cfg: dict, w: Worker):
        import ray.train

        from components.augment.operator import AugmentOperator
        from components.train.memory import MemorySplit

        self.cfg, self.w, self.batch_size = cfg, w, int(cfg["batch_size"])
        self.seed, self.memory = int(cfg["seed"]), cfg["data_cache"] == "memory"
        if not self.memory:
            self.train_shard, self.val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
            self.train_mem = self.val_mem = None
            self.steps_per_epoch = max(1, math.ceil(int(cfg.get("train_rows", 0)) / w.world / self.batch_size))
            return
        t_load = time.perf_counter()
        common = dict(rank=w.rank, world=w.world, image_size=cfg["image_size"], in_chans=cfg["in_chans"],
                      max_pixels=int(cfg["max_pixels"]), threads=int(cfg["threads_per_worker"]))
        self.train_mem = MemorySplit.from_files(cfg["train_files"], None, **common)
        self.val_mem = MemorySplit.from_files(cfg["val_files"], "val", **common).tensors()
        self.train_shard = self.val_shard = None
        self.steps_per_epoch = int(all_reduce([math.ceil(len(self.train_mem) / self.batch_size)], w.device, "min")[0])
        self.operator = AugmentOperator(cfg.get("online_policy"), "tensor", cfg["image_size"], cfg["in_chans"],
                                        seed=self.seed * 7919 + w.rank)
        if w.rank == 0:
            progress(f"[train] {len(self.train_mem)} training and {len(self.val_mem[1])} validation images in memory "
                     f"at {cfg['image_size']} px ({time.perf_counter() - t_load:.1f} s); precision {w.precision}")

    def train_batches(self, epoch: int):
        if self.memory:
            from components.train.memory import epoch_order

            order = epoch_order(len(self.train_mem), self.steps_per_epoch, self.batch_size,
                                self.seed * 100_003 + epoch * 101 + self.w.rank)
            return self.train_mem.batches(order, self.batch_size, self.operator)
        shuffle = int(self.cfg["shuffle_buffer"]) or None
        return self.train_shard.iter_torch_batches(batch_size=self.batch_size,
                                                   dtypes={"image": torch.float32, "label": torch.int64},
                                                   local_shuffle_buffer_size=shuffle, drop_last=False,
                                                   prefetch_batches=2)

    def val_batches(self):
        return _val_batches(self.val_mem, self.val_shard)


def _classifier(cfg: dict, w: Worker, checkpoint):
    """The worker's model (pretrained weights loaded unless it resumes) and its AdamW with two groups.

    Fine-tuning: the backbone may learn at a fraction of the head's rate (``backbone_lr_scale``), or
    not at all for the first ``freeze_backbone_epochs`` epochs (linear probing before full
    fine-tuning). Returns (model, optimizer, the groups' base learning rates, backbone parameters).
    """
    model = create_model(cfg["model_name"], cfg["num_classes"], cfg["in_chans"], **cfg["model_kwargs"])
    if cfg["pretrained"] and not checkpoint:  # a resumed run has its own weights
        report = load_pretrained(model, cfg["pretrained"], in_chans=cfg["in_chans"])
        if w.rank == 0:
            progress("[train] " + report.summary().replace("\n", "\n[train] "))
    model = model.to(memory_format=torch.channels_last)
    backbone, head = backbone_parameters(model), head_parameters(model)
    lr, scale = float(cfg["lr"]), float(cfg["backbone_lr_scale"])
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": lr * scale}, {"params": head, "lr": lr}],
                                  lr=lr, weight_decay=float(cfg["weight_decay"]))
    return model, optimizer, [g["lr"] for g in optimizer.param_groups], backbone


def _resume(cfg: dict, w: Worker, checkpoint, model: nn.Module, optimizer) -> tuple[dict | None, object]:
    """Restore the checkpoint a (re)started worker finds (model, optimizer; the raw weights under
    the EMA's) and build the weight EMA; returns (the training state or None, the EMA or None)."""
    state = None
    if checkpoint:
        state = restore_checkpoint(checkpoint, model)
        optimizer.load_state_dict(state["optimizer"])
        if w.rank == 0:
            progress(f"[train] resuming from the checkpoint of epoch {int(state['epoch']) + 1} of {int(cfg['epochs'])}")
    ema = _ema_model(model, cfg["ema_decay"])
    if ema is not None and state is not None:  # the checkpoint's model file holds the EMA weights
        ema.module.load_state_dict(unwrap(model).state_dict())
        ema.n_averaged.fill_(int(state["ema_n_averaged"]))
        model.load_state_dict(state["raw_state_dict"])
    return state, ema


def _epoch_record(tr: dict, cm: np.ndarray, vloss: float, vn: int, k: int, w: Worker, **fields) -> dict:
    """One epoch's metrics, summed over the ranks: training loss and accuracy, validation loss,
    accuracy, balanced accuracy and macro F1, images per second; ``fields`` first."""
    tot = all_reduce([tr["samples"], tr["loss_sum"], tr["correct"], vloss, vn, *cm.ravel()], w.device)
    samples = max(1.0, tot[0])
    val = summary_from_confusion(tot[5:].reshape(k, k))
    record = {
        **fields, "precision": w.precision,
        "train_loss": tot[1] / samples, "train_accuracy": tot[2] / samples,
        "val_loss": tot[3] / max(1.0, tot[4]), "val_accuracy": val["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_f1": val["macro_f1"],
        "images_per_second": tot[0] / max(tr["seconds"], 1e-9) if w.world == 1 else
        float(all_reduce([tr["samples"] / max(tr["seconds"], 1e-9)], w.device)[0]),
    }
    return {key: (float(v) if isinstance(v, (np.floating, float)) else v) for key, v in record.items()}


def _epoch_line(record: dict, epochs: int, budget: float | None) -> str:
    return (f"[train] epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.3f}  "
            f"acc {record['train_accuracy']:.3f}  val_loss {record['val_loss']:.3f}  "
            f"val_acc {record['val_accuracy']:.3f}  val_bal_acc {record['val_balanced_accuracy']:.3f}  "
            f"val_f1 {record['val_macro_f1']:.3f}  {record['images_per_second']:.1f} img/s  lr {record['lr']:.2e}"
            + (f"  {record['train_seconds'] / 60:.1f}/{budget / 60:.1f} min" if budget else ""))


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

    w = start_worker(cfg)
    seed = int(cfg["seed"])
    torch.manual_seed(seed + w.rank)
    checkpoint = ray.train.get_checkpoint()
    model, optimizer, base_lrs, backbone = _classifier(cfg, w, checkpoint)
    state, ema = _resume(cfg, w, checkpoint, model, optimizer)
    model = ray.train.torch.prepare_model(model)
    exported = (lambda: ema.module) if ema is not None else (lambda: model)
    weights = cfg["class_weights"]
    loss_fn = nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32, device=w.device) if weights else None,
        label_smoothing=float(cfg["label_smoothing"]))
    scaler = grad_scaler(w.device, w.precision)
    mix_cfg = cfg["mix"]
    mix = batch_mixer(cfg["num_classes"], float(mix_cfg["mixup"]), float(mix_cfg["cutmix"]), float(mix_cfg["prob"]),
                      seed=seed * 1000 + w.rank)
    sink = WandbSink(cfg) if w.rank == 0 else None
    data = _EpochData(cfg, w)
    start_epoch = int(state["epoch"]) + 1 if state else 0
    history = json.loads(state["history"]) if state else []
    run = _Schedule(cfg, w, optimizer, base_lrs, data.steps_per_epoch, ema, model, history,
                    int(state["step"]) if state else 0, float(state["train_seconds"]) if state else 0.0)
    epochs, freeze_epochs = run.epochs, int(cfg["freeze_backbone_epochs"])
    epoch = start_epoch
    # A resumed run goes on while its schedule has room: more epochs or a larger budget than the run
    # that wrote the checkpoint continue it; a spent budget or the last epoch ends it.
    finished = run.spent()
    while epoch < epochs and not finished:
        run.epoch = epoch
        batches = data.train_batches(epoch)
        run.epoch_start = time.perf_counter()
        tr = train_one_epoch(model, batches, optimizer, loss_fn, w.device, scaler, precision=w.precision,
                             frozen=backbone if epoch < freeze_epochs else None, before_step=run.before_step,
                             after_step=run.after_step, mix=mix)
        run.seconds_done += tr["seconds"]
        run.epoch_start = None
        finished = run.spent() or epoch + 1 >= epochs
        if run.budget and w.world > 1:
            finished = bool(all_reduce([float(finished)], w.device, "max")[0])
        lr_now = optimizer.param_groups[-1]["lr"]  # the head's
        cm, vloss, vn = confusion(exported(), data.val_batches(), cfg["num_classes"], w.device, w.precision)
        record = _epoch_record(tr, cm, vloss, vn, cfg["num_classes"], w, epoch=epoch + 1, start_epoch=start_epoch,
                               lr=lr_now, step=run.step, train_seconds=run.seconds_done)
        if w.world > 1:  # DDP: the ranks' weights must agree after every epoch
            record["weights_spread_across_workers"] = weights_spread(unwrap(model), w.device)
        history.append(record)
        if w.rank == 0:
            progress(_epoch_line(record, epochs, run.budget))
            sink.log(record, step=epoch + 1)
        report_epoch(record, exported(), cfg, w.rank, epoch, lambda: {
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": run.step, "train_seconds": run.seconds_done,
            "history": json.dumps(history), "finished": finished,
            **({"raw_state_dict": unwrap(model).state_dict(), "ema_n_averaged": int(ema.n_averaged)}
               if ema is not None else {})})
        epoch += 1
    if sink is not None:
        sink.finish()
