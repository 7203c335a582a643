"""Batches of a prepared split for the stages that run a model in-process (fine-tune, evaluate, drift)."""
from __future__ import annotations

from pathlib import Path

from pipelines.params import Params
from pipelines.runtime import init_ray


def split_batches(p: Params, shards: Path, split: str | None, policy: str | None, meta: dict, batch_size: int):
    """Torch batches ({"image": float32 NCHW, "label": int64}) of ``split`` of ``shards`` (all rows for
    None), augmented by ``policy`` (None: the validation transform), through Ray Data."""
    from components.train import image_dataset

    init_ray(p)
    ds = image_dataset(shards, split, policy=policy, image_size=meta["image_size"], in_chans=meta["in_chans"],
                       seed=p("seed") if policy else None, cpus_per_task=p("augment.cpus_per_task"),
                       max_pixels=p("data.max_image_pixels"), batch_size=batch_size)
    import torch

    return ds.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64})
