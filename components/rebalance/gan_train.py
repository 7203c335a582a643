"""Training the class-conditional DCGAN (:mod:`components.rebalance.gan_model`) with Ray Train.

:func:`train_gan` runs :func:`gan_loop_per_worker` in a ``TorchTrainer``. The real training rows
(from a frame or Parquet shards) are decoded once on the driver to a uint8 array at the GAN's
size - a few MB for ELPV - and shared through the object store: cheaper than a Ray Data pipeline
for data this small (its start-up dominated a short run) and it lets every rank take a disjoint,
equal slice of one per-epoch permutation, as DDP needs. Every epoch the worker reports a
checkpoint (both networks, both optimisers, the history), so a failed worker or a re-run with
the same settings resumes from the last epoch; raising ``epochs`` continues the same run. The
worker plumbing (rank and device, progress lines, checkpoint reports, all-reduce) is the
classifier's (:mod:`components.train.worker`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from components import storage as _storage
from components.config import GanConfig
from components.data.images import DEFAULT_MAX_PIXELS, decode_image
from components.models.checkpoint import unwrap
from components.progress import RemoteBar
from components.rebalance.gan_model import (FORMAT, GENERATOR_FILE, LOSSES, Discriminator, Generator, check_chans,
                                            check_image_size, d_loss, g_loss, weights_version)
from components.train.naming import config_digest
from components.train.precision import autocast
from components.train.worker import (BoardPoster, Worker, all_reduce, load_state, progress, report_checkpoint,
                                     start_worker)

STATE_FILE = "gan_state.pt"
SYNTHETIC_SOURCES = ("smote", "gan")  # never used as GAN training data


# ----------------------------------------------------------------------------- data
def to_uint8_chw(img: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 HxWxC -> uint8 CxSxS (area resize)."""
    import cv2

    if img.shape[0] != image_size or img.shape[1] != image_size:
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA).reshape(
            image_size, image_size, img.shape[2])
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def real_train_mask(split, source, n: int) -> np.ndarray:
    """Rows of the training split (all, without ``split``) that are not synthetic (``source``)."""
    keep = np.ones(n, dtype=bool)
    if split is not None:
        keep &= np.asarray(split, dtype=object) == "train"
    if source is not None:
        keep &= ~np.isin(np.asarray(source, dtype=object), SYNTHETIC_SOURCES)
    return keep


def _real_train_rows(frame_or_shards) -> pd.DataFrame:
    """The real training rows (image, label[, sha256]) of a frame, a shards directory or Parquet files."""
    if isinstance(frame_or_shards, pd.DataFrame):
        f = frame_or_shards
    else:
        import pyarrow.parquet as pq

        from components.data.shards import shard_files

        if isinstance(frame_or_shards, (str, os.PathLike)):
            p = Path(frame_or_shards)
            files = shard_files(p) if p.is_dir() else [str(p.resolve())]
        else:
            files = [str(Path(p).resolve()) for p in frame_or_shards]
        names = set(pq.read_schema(files[0]).names)
        cols = [c for c in ("image", "label", "split", "source", "sha256") if c in names]
        filters = [("split", "=", "train")] if "split" in names else None
        f = pq.read_table(files, columns=cols, filters=filters).to_pandas()
    keep = real_train_mask(f["split"] if "split" in f else None, f["source"] if "source" in f else None, len(f))
    return f.loc[keep, [c for c in ("image", "label", "sha256") if c in f]].reset_index(drop=True)


def load_training_images(frame_or_shards, image_size: int, in_chans: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                         threads: int = 2) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode the real training rows to uint8 (N, C, S, S), labels (N,) and a digest of the data.

    A GAN's training set at 32-64 px is small (ELPV: ~1.5k x 64 x 64 bytes = 6 MB), so it is
    decoded once on the driver and shared with the workers through the object store.
    """
    from concurrent.futures import ThreadPoolExecutor

    rows = _real_train_rows(frame_or_shards)
    if not len(rows):
        raise ValueError("no real training rows (split 'train', source not smote/gan) to train the GAN on")
    with ThreadPoolExecutor(max(1, threads)) as pool:
        images = list(pool.map(lambda b: to_uint8_chw(decode_image(b, in_chans, max_pixels), image_size),
                               rows["image"]))
    labels = rows["label"].to_numpy().astype(np.int64)
    h = hashlib.sha256()
    shas = rows["sha256"] if "sha256" in rows and rows["sha256"].notna().all() else None
    for i in range(len(rows)):
        h.update((shas.iloc[i] if shas is not None else hashlib.sha256(rows["image"].iloc[i]).hexdigest()).encode())
        h.update(f":{labels[i]};".encode())
    return np.stack(images), labels, h.hexdigest()


# ----------------------------------------------------------------------------- worker
def _arch(cfg: dict) -> dict:
    return dict(num_classes=cfg["num_classes"], image_size=cfg["image_size"], in_chans=cfg["in_chans"])


def _networks(cfg: dict) -> tuple[Generator, Discriminator, torch.optim.Optimizer, torch.optim.Optimizer]:
    """Generator, discriminator and their Adam optimisers (``lr``, ``lr_d``, ``betas``)."""
    gen = Generator(**_arch(cfg), z_dim=cfg["z_dim"], base_channels=cfg["base_channels"], embed_dim=cfg["embed_dim"])
    disc = Discriminator(**_arch(cfg), base_channels=cfg["base_channels"])
    betas = tuple(float(b) for b in cfg["betas"])
    opt_g = torch.optim.Adam(gen.parameters(), lr=float(cfg["lr"]), betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(cfg["lr_d"]), betas=betas)
    return gen, disc, opt_g, opt_d


def _resume(checkpoint, gen, disc, opt_g, opt_d) -> tuple[int, list[dict]]:
    """Load a checkpoint's networks and optimisers; returns (epochs done, history)."""
    state = load_state(checkpoint, STATE_FILE)
    gen.load_state_dict(state["generator"])
    disc.load_state_dict(state["discriminator"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    return int(state["epochs_done"]), json.loads(state["history"])


def _train_epoch(gen, disc, opt_g, opt_d, images: np.ndarray, labels: np.ndarray, cfg: dict, w: Worker, epoch: int,
                 tick) -> tuple[np.ndarray, int]:
    """``steps_per_epoch`` updates (``d_steps`` D updates, then one G update) on this rank's slice of
    the epoch's permutation; ``tick(done)`` after each. Returns this rank's sums (samples, D loss, G
    loss, D right on real, D right on fake) and the steps done."""
    gen.train()
    disc.train()
    steps, bs, zd, kind = int(cfg["steps_per_epoch"]), int(cfg["batch_size"]), int(cfg["z_dim"]), cfg["loss"]
    device, precision = w.device, w.precision
    done, sums = 0, np.zeros(5)
    # One permutation per epoch, the same on every rank; rank r takes every world-th row, so
    # the ranks see disjoint rows and run the same number of steps (as DDP needs).
    order = np.random.default_rng([int(cfg["seed"]), epoch]).permutation(len(labels))[w.rank::w.world]
    for step in range(steps):
        idx = np.sort(order[step * bs:(step + 1) * bs])
        x = torch.from_numpy(images[idx]).to(device=device, dtype=torch.float32).div_(127.5).sub_(1.0)
        y = torch.from_numpy(labels[idx]).to(device)
        for _ in range(int(cfg["d_steps"])):
            with torch.no_grad(), autocast(device, precision):
                fake = gen(torch.randn(len(y), zd, device=device), y)
            with autocast(device, precision):
                logits = disc(torch.cat([x, fake]), torch.cat([y, y])).float()
            real_logits, fake_logits = logits[:len(y)], logits[len(y):]
            loss_d = d_loss(real_logits, fake_logits, kind)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        with autocast(device, precision):
            fake = gen(torch.randn(len(y), zd, device=device), y)
            fake_scores = disc(fake, y).float()
        loss_g = g_loss(fake_scores, kind)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        done += 1
        tick(done)
        sums += [len(y), float(loss_d) * len(y), float(loss_g) * len(y),
                 float((real_logits > 0).float().sum()), float((fake_logits < 0).float().sum())]
    return sums, done


def gan_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker: alternating D / G updates, a checkpoint and a report every epoch.

    Resumes from ``ray.train.get_checkpoint()`` (networks, optimisers, history). Every rank runs
    exactly ``steps_per_epoch`` updates on its slice of a per-epoch permutation of the images
    (``cfg["data"]``: an object ref of ``{"images": uint8 NCHW, "labels": int64}``).
    """
    import ray
    import ray.train
    import ray.train.torch

    w = start_worker(cfg)
    gen, disc, opt_g, opt_d = _networks(cfg)
    start, history, epochs = 0, [], int(cfg["epochs"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        start, history = _resume(checkpoint, gen, disc, opt_g, opt_d)
        if w.rank == 0:
            progress(f"[gan] resuming after epoch {start} of {cfg['epochs']}")
    torch.manual_seed(int(cfg["seed"]) * 1000 + w.rank * 100 + start)  # fresh noise stream per rank and resume
    gen = ray.train.torch.prepare_model(gen)
    disc = ray.train.torch.prepare_model(disc)
    data = ray.get(cfg["data"]) if isinstance(cfg["data"], ray.ObjectRef) else cfg["data"]
    steps = int(cfg["steps_per_epoch"])
    post = BoardPoster(cfg, w.rank)  # the driver's bar (components.progress)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        sums, done = _train_epoch(gen, disc, opt_g, opt_d, data["images"], data["labels"], cfg, w, epoch,
                                  lambda d: post(lambda: (epoch * steps + d) / (epochs * steps),
                                                 lambda: f"epoch {epoch + 1}/{cfg['epochs']}"))
        t = all_reduce(sums, w.device)
        n = max(1.0, float(t[0]))
        record = {"epoch": epoch + 1, "start_epoch": start, "steps": done, "samples": int(t[0]),
                  "d_loss": float(t[1]) / n, "g_loss": float(t[2]) / n, "d_real_accuracy": float(t[3]) / n,
                  "d_fake_accuracy": float(t[4]) / n, "seconds": time.perf_counter() - t0}
        history.append(record)
        if w.rank == 0:
            progress(f"[gan] epoch {epoch + 1}/{cfg['epochs']}  d_loss {record['d_loss']:.3f}  "
                     f"g_loss {record['g_loss']:.3f}  D(real) acc {record['d_real_accuracy']:.2f}  "
                     f"D(fake) acc {record['d_fake_accuracy']:.2f}  {record['seconds']:.1f}s")

        def write(directory: Path) -> None:
            torch.save({"generator": {k: v.detach().cpu() for k, v in unwrap(gen).state_dict().items()},
                        "discriminator": {k: v.detach().cpu() for k, v in unwrap(disc).state_dict().items()},
                        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "epochs_done": epoch + 1,
                        "history": json.dumps(history)}, directory / STATE_FILE)

        report_checkpoint(record, w.rank, epoch, write)


# ----------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class GanResult:
    generator_path: Path
    version: str
    history: list[dict]
    run_dir: Path | str  # a local directory, or a URI when the storage path is one
    meta: dict


def gan_run_name(cfg: dict, data_digest: str) -> str:
    """Same settings and data -> same run -> resume. ``epochs`` and resources are left out, so
    raising ``epochs`` continues a finished run instead of starting over."""
    skip = ("epochs", "threads_per_worker", "steps_per_epoch", "class_names")
    return f"gan-{config_digest(cfg, skip, data_digest)}"


def _check_settings(image_size: int, in_chans: int, loss: str, epochs: int) -> None:
    check_image_size(image_size)
    check_chans(in_chans)
    if loss not in LOSSES:
        raise ValueError(f"GAN loss must be one of {LOSSES}, got {loss!r}")
    if int(epochs) < 1:
        raise ValueError(f"GAN epochs must be >= 1, got {epochs}")


def _check_rows(counts: dict[int, int], rows: int, num_classes: int, num_workers: int) -> None:
    bad = [c for c in counts if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside 0..{num_classes - 1}")
    if rows < num_workers:
        raise ValueError(f"{rows} real training rows cannot feed {num_workers} GAN workers")


def _fit(cfg: dict, name: str, storage, num_workers: int, cpus_per_worker: float, max_failures: int,
         keep_checkpoints: int) -> dict:
    """Run :func:`gan_loop_per_worker` in a ``TorchTrainer``; returns the last checkpoint's state."""
    import ray.train
    from ray.train.torch import TorchTrainer

    with RemoteBar("gan") as board:  # a bar on the driver's terminal (None: no terminal, no bar)
        trainer = TorchTrainer(
            gan_loop_per_worker, train_loop_config=dict(cfg, progress_board=board) if board is not None else cfg,
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=False,
                                                   resources_per_worker={"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=name, **_storage.ray_storage(storage),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints)),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"GAN run {name} finished without a checkpoint")
    return load_state(result.checkpoint, STATE_FILE)


def _export(state: dict, cfg: dict, out_dir, *, rows: int, counts: dict[int, int], digest: str,
            name: str) -> tuple[Path, dict, list[dict]]:
    """Write ``out_dir/generator.pt`` (weights and meta, atomically) and ``out_dir/gan.json``;
    returns (the generator file, its meta, the history)."""
    history = json.loads(state["history"])
    weights = {k: v.contiguous() for k, v in state["generator"].items()}
    meta = {"format": FORMAT, "version": weights_version(weights), "num_classes": cfg["num_classes"],
            "class_names": cfg["class_names"], "image_size": cfg["image_size"], "in_chans": cfg["in_chans"],
            "z_dim": cfg["z_dim"], "embed_dim": cfg["embed_dim"], "base_channels": cfg["base_channels"],
            "train": {"epochs": int(state["epochs_done"]), "batch_size": cfg["batch_size"], "lr": cfg["lr"],
                      "lr_d": cfg["lr_d"], "betas": cfg["betas"], "loss": cfg["loss"], "d_steps": cfg["d_steps"],
                      "seed": cfg["seed"], "num_workers": cfg["num_workers"], "rows": rows,
                      "counts": {str(k): v for k, v in counts.items()}, "data_digest": digest, "run_name": name}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / GENERATOR_FILE
    tmp_path = path.with_suffix(".pt.tmp")
    torch.save({"state_dict": weights, "meta": meta}, tmp_path)
    os.replace(tmp_path, path)
    (out / "gan.json").write_text(json.dumps({"meta": meta, "history": history}, indent=2))
    return path, meta, history


def train_gan(frame_or_shards: pd.DataFrame | str | os.PathLike | Sequence[str], out_dir: str | os.PathLike,
              cfg: GanConfig, *, in_chans: int, num_classes: int, seed: int, max_pixels: int,
              class_names: Sequence[str] | None = None, decode_threads: int = 2, run_name: str | None = None) -> GanResult:
    """Train a class-conditional DCGAN on the real training rows and write ``out_dir/generator.pt``.

    ``cfg`` is params.yaml's ``gan`` section (:class:`components.config.GanConfig`: every training
    setting, no defaults here). ``frame_or_shards``: a frame (image, label[, split, source]) or a shards
    directory / list of Parquet files; only rows with split "train" (when present) and a non-synthetic
    source are used, decoded once on the driver (:func:`load_training_images`) and shared with the
    ``cfg.num_workers`` Ray Train workers (DDP when > 1) through the object store.
    ``cfg.batch_size`` is per worker (capped by the rows a worker has); one epoch is one pass over the
    real rows. Adam with ``betas`` (0, 0.9) and spectral norm suit the hinge loss; ``lr_d`` (null:
    ``lr``) and ``d_steps`` D updates per G update tune the balance.
    Checkpoints go to ``cfg.storage_path/<run name>/epoch_NNNN`` (a re-run resumes, see
    :func:`gan_run_name`). Also writes ``out_dir/gan.json`` (metadata and per-epoch history).
    """
    import ray

    image_size, num_workers = cfg.image_size, cfg.num_workers
    _check_settings(image_size, in_chans, cfg.loss, cfg.epochs)
    images, labels, digest = load_training_images(frame_or_shards, image_size, in_chans, max_pixels, decode_threads)
    counts = {int(k): int(v) for k, v in sorted(pd.Series(labels).value_counts().items())}
    rows = len(labels)
    _check_rows(counts, rows, num_classes, num_workers)
    bs = max(1, min(cfg.batch_size, rows // num_workers))
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    loop = dict(num_classes=int(num_classes), image_size=image_size, in_chans=int(in_chans), z_dim=cfg.z_dim,
                base_channels=cfg.base_channels, embed_dim=cfg.z_dim, loss=cfg.loss, betas=list(cfg.betas),
                lr=cfg.lr, lr_d=cfg.lr_d if cfg.lr_d is not None else cfg.lr, d_steps=cfg.d_steps, batch_size=bs,
                seed=int(seed), num_workers=num_workers, epochs=cfg.epochs, threads_per_worker=cfg.threads_per_worker,
                steps_per_epoch=max(1, rows // (bs * num_workers)), class_names=names, precision=cfg.precision)
    name = run_name or gan_run_name(loop, digest)
    storage = _storage.resolve(cfg.storage_path)  # an absolute path or a URI (s3://...)
    state = _fit(dict(loop, data=ray.put({"images": images, "labels": labels})), name, storage, num_workers,
                 cfg.cpus_per_worker, cfg.max_failures, cfg.keep_checkpoints)
    path, meta, history = _export(state, loop, out_dir, rows=rows, counts=counts, digest=digest, name=name)
    run_dir = _storage.join(storage, name)
    return GanResult(path, meta["version"], history, run_dir if _storage.is_uri(run_dir) else Path(run_dir), meta)


__all__ = ["GanResult", "STATE_FILE", "SYNTHETIC_SOURCES", "gan_loop_per_worker", "gan_run_name",
           "load_training_images", "real_train_mask", "to_uint8_chw", "train_gan"]
