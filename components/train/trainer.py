"""Driver side of training: Ray Data inputs, the TorchTrainer, and exporting the result."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from components import storage as _storage
from components.augment.operator import AugmentOperator
from components.data.images import DEFAULT_MAX_PIXELS
from components.data.shards import shard_files
from components.models.registry import model_task
from components.progress import RemoteBar
from components.train.loop import SELECT_BY, train_loop_per_worker
from components.train.naming import run_name
from components.train.settings import check_loop_config
from components.train.worker import MODEL_FILE, STATE_FILE

_OPERATORS: dict[tuple, AugmentOperator] = {}


def augment_batch(batch: dict, **kwargs) -> dict:
    """Stateless Ray Data task wrapper: one cached :class:`AugmentOperator` per worker process."""
    key = tuple(sorted(kwargs.items()))
    op = _OPERATORS.get(key)
    if op is None:
        op = _OPERATORS[key] = AugmentOperator(**kwargs)
    return op(batch)


def image_dataset(shards_dir: str | Path, split: str | None, *, policy: str | None, image_size: int, in_chans: int,
                  seed: int | None, cpus_per_task: float, max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 64):
    """A Ray Dataset of decoded (and, with ``policy``, augmented) float tensors from Parquet shards."""
    import ray.data

    # Reads ask for the same CPU share as the map tasks: with the default of 1 CPU a read cannot be
    # scheduled next to a training worker that holds more than half of a 2-core node (a hang).
    ds = ray.data.read_parquet(shard_files(shards_dir), columns=["image", "label", "split"],
                               num_cpus=cpus_per_task)
    if split:
        ds = ds.filter(expr=f"split == '{split}'")
    return ds.map_batches(augment_batch, batch_format="numpy", batch_size=batch_size, num_cpus=cpus_per_task,
                          fn_kwargs=dict(policy=policy, output="tensor", image_size=image_size, in_chans=in_chans,
                                         seed=seed, max_pixels=max_pixels))


def count_rows(shards_dir: str | Path) -> int:
    """Rows in a shard directory, from the Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(shards_dir))


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    history: list[dict]
    run_dir: Path | str  # a local directory, or a URI when the storage path is one
    selected_epoch: int | None = None  # the epoch whose weights were exported (select_by)


def fit(cfg: dict, train_dir: str | Path, val_dir: str | Path, storage_path: str | Path, out_model: str | Path, *,
        num_workers: int, cpus_per_worker: float, use_gpu: bool, data_cpus: float, max_failures: int,
        keep_checkpoints: int, online_policy: str | None, select_by: str, data_digest: str = "") -> TrainResult:
    """Train with Ray Train and copy the selected weights to ``out_model``.

    ``cfg`` is the worker config (a classifier's: every key of
    :data:`components.train.settings.LOOP_KEYS`, as :func:`~components.train.settings.loop_config` builds it);
    the keyword arguments are params.yaml's ``train`` resources and ``augment.policy`` (no defaults here);
    ``cfg["data_cache"] == "memory"`` keeps each worker's data in memory at the training size.
    Re-running with the same config and data resumes the run from its last checkpoint.

    ``select_by``: ``last`` exports the last epoch; a validation metric (``val_macro_f1``, ...)
    exports the best epoch by it. Ray Train keeps the ``keep_checkpoints`` best checkpoints by that
    metric (``checkpoint_score_attribute``) and always the latest one, from which a run resumes.
    """
    if select_by not in SELECT_BY:
        raise ValueError(f"train.select_by must be one of {SELECT_BY}, got {select_by!r}")
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = dict(cfg, online_policy=online_policy)
    cfg.setdefault("run_name", run_name(cfg, data_digest))
    wb = cfg.get("wandb") or {}
    if wb.get("dir") and not Path(wb["dir"]).is_absolute():
        # relative to the project (the caller's directory), not to the worker's: Ray Train starts its
        # workers in its own session folder, where a relative wandb.dir would bury the runs
        cfg["wandb"] = dict(wb, dir=str(Path(wb["dir"]).resolve()))
    common = dict(image_size=cfg["image_size"], in_chans=cfg["in_chans"], cpus_per_task=data_cpus,
                  batch_size=cfg["batch_size"])
    if model_task(cfg["model_name"]) == "detect":  # same Ray Train run, the detector's data and loop
        from components.train.detect import detect_loop_per_worker, detection_dataset
        make_dataset, loop = detection_dataset, detect_loop_per_worker
    else:
        make_dataset, loop = image_dataset, train_loop_per_worker
        check_loop_config(cfg)
        common["max_pixels"] = cfg["max_pixels"]
    if loop is train_loop_per_worker and cfg["data_cache"] == "memory":
        # each worker reads, decodes and augments its rows itself (components.train.memory)
        datasets = None
        cfg.update(train_files=[str(Path(f).resolve()) for f in shard_files(train_dir)],
                   val_files=[str(Path(f).resolve()) for f in shard_files(val_dir)])
    else:
        cfg["train_rows"] = count_rows(train_dir)  # the streamed schedule's (and the progress bar's) steps per epoch
        datasets = {
            "train": make_dataset(train_dir, None, policy=online_policy, seed=cfg["seed"], **common),
            "val": make_dataset(val_dir, "val", policy=None, seed=None, **common),
        }
    score = {} if select_by == "last" else dict(checkpoint_score_attribute=select_by,
                                                checkpoint_score_order="min" if select_by == "val_loss" else "max")
    storage = _storage.resolve(storage_path)  # an absolute path or a URI (s3://...): Ray Train handles both
    with RemoteBar("train") as board:  # a bar on the driver's terminal (None: no terminal, no bar)
        trainer = TorchTrainer(
            loop, train_loop_config=dict(cfg, progress_board=board) if board is not None else cfg, datasets=datasets,
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=cfg["run_name"], **_storage.ray_storage(storage),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints, **score)),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg['run_name']} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:  # the latest: its state holds the whole history
        history = json.loads(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)["history"])
    chosen = result.checkpoint if select_by == "last" else \
        result.get_best_checkpoint(select_by, score["checkpoint_score_order"])
    with chosen.as_directory() as d:
        out_model = Path(out_model)
        out_model.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(d) / MODEL_FILE, out_model)
        selected = json.loads(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)["history"])[-1]["epoch"]
    run_dir = _storage.join(storage, cfg["run_name"])
    return TrainResult(out_model, history, run_dir if _storage.is_uri(run_dir) else Path(run_dir), selected)
