"""What every Ray Train worker loop of resops shares (the classifier's :mod:`components.train.loop`,
the detector's :mod:`components.train.detect`, the GAN's :mod:`components.rebalance.gan_train`): the
worker's rank, device and precision, one progress line per epoch, the driver's progress bar, sums
over the ranks, wandb metrics, and the checkpoint each epoch reports and a restart resumes from."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from components.models.checkpoint import save_model
from components.progress import post
from components.train.precision import resolve_precision

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


def model_meta(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("model_name", "num_classes", "in_chans", "image_size", "class_names")} | {
        "model_kwargs": cfg.get("model_kwargs", {})}


@dataclass(frozen=True)
class Worker:
    """This Ray Train worker: its rank of ``world``, its device and the resolved precision."""

    rank: int
    world: int
    device: torch.device
    precision: str


def start_worker(cfg: dict) -> Worker:
    """Set the worker's torch threads (``threads_per_worker``) and read its rank, world size, device
    and precision (``cfg["precision"]`` resolved for the device)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(int(cfg["threads_per_worker"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    return Worker(rank, world, device, resolve_precision(cfg["precision"], device))


def all_reduce(values: list[float] | np.ndarray, device: torch.device, op: str = "sum") -> np.ndarray:
    """``values`` summed (or min, max) over the ranks, as float64; the values themselves without DDP."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op={"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
                                            "max": torch.distributed.ReduceOp.MAX}[op])
    return t.cpu().numpy()


def weights_spread(model: nn.Module, device: torch.device) -> float:
    """How far the ranks' parameters are apart: max - min over the ranks of the sum of every parameter's
    absolute values (0.0 when DDP keeps them in sync, as it must; 0.0 without DDP). Batch-norm running
    statistics are left out: each rank updates them with its own last batch."""
    with torch.no_grad():
        checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    return float(all_reduce([checksum], device, "max")[0] - all_reduce([checksum], device, "min")[0])


class WandbSink:
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


class BoardPoster:
    """Posts to the driver's progress bar (``cfg["progress_board"]``, :mod:`components.progress`)
    from rank 0, at most every ``every`` seconds; a no-op on other ranks and without a board."""

    def __init__(self, cfg: dict, rank: int, every: float = 0.5):
        self.board = cfg.get("progress_board") if rank == 0 else None
        self.every, self.posted = every, 0.0

    def __call__(self, fraction: Callable[[], float], text: Callable[[], str]) -> None:
        """Post ``fraction()`` and ``text()`` (evaluated only when a post is due)."""
        if self.board is not None and time.perf_counter() - self.posted >= self.every:
            self.posted = time.perf_counter()
            post(self.board, fraction(), text())


def load_state(checkpoint, name: str = STATE_FILE) -> dict:
    """The training state file ``name`` of a Ray Train checkpoint."""
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / name, map_location="cpu", weights_only=True)


def restore_checkpoint(checkpoint, model: nn.Module) -> dict:
    """Load a Ray Train checkpoint's weights into ``model``; return its training state
    (optimizer, epoch, history, and what else the loop saved)."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)["state_dict"])
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def report_checkpoint(record: dict, rank: int, epoch: int, write: Callable[[Path], None]) -> None:
    """``ray.train.report`` one epoch's metrics; rank 0 attaches the checkpoint ``epoch_NNNN``, the
    files ``write(directory)`` puts in a temporary directory (called on rank 0 only)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            write(Path(tmp))
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        else:
            ray.train.report(record, checkpoint=None)


def report_epoch(record: dict, model: nn.Module, cfg: dict, rank: int, epoch: int, state) -> None:
    """:func:`report_checkpoint` with the model file and ``state()`` (the training state, built only
    on rank 0) as the checkpoint."""
    def write(directory: Path) -> None:
        save_model(directory / MODEL_FILE, model, model_meta(cfg))
        torch.save(state(), directory / STATE_FILE)

    report_checkpoint(record, rank, epoch, write)
