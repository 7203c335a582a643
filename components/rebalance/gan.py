"""Class-conditional DCGAN for oversampling rare classes, trained with Ray Train.

* :class:`Generator` - a label embedding concatenated to the noise vector, a 1x1 -> 4x4
  ``ConvTranspose2d`` then stride-2 ``ConvTranspose2d`` + BatchNorm + ReLU blocks doubling the
  resolution up to ``image_size``, ``tanh`` output in [-1, 1].
* :class:`Discriminator` - stride-2 convolutions with spectral normalisation and LeakyReLU down
  to 4x4, global sum pooling, a linear output plus the projection term
  ``<embed(y), h>`` (Miyato & Koyama 2018, cGANs with projection discriminator).
* Loss: ``hinge`` (default) or ``bce`` (non-saturating).

:func:`train_gan` runs :func:`gan_loop_per_worker` in a ``TorchTrainer``. The real training rows
(from a frame or Parquet shards) are decoded once on the driver to a uint8 array at the GAN's
size - a few MB for ELPV - and shared through the object store: cheaper than a Ray Data pipeline
for data this small (its start-up dominated a short run) and it lets every rank take a disjoint,
equal slice of one per-epoch permutation, as DDP needs. Every epoch the worker reports a
checkpoint (both networks, both optimisers, the history), so a failed worker or a re-run with
the same settings resumes from the last epoch; raising ``epochs`` continues the same run. The generator is exported to
``out_dir/generator.pt``: ``{"state_dict", "meta"}`` with plain types only, loadable with
``torch.load(..., weights_only=True)``; ``meta["version"]`` is the sha256 of the weights and
every generated row carries it (``generator_version`` column and ``attrs``).

:func:`generate` turns a generator file and ``{class: count}`` into training rows
(``source="gan"``); :func:`save_sample_grid` writes a PNG of real vs generated samples per class.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from components import storage as _storage
from components.data.images import DEFAULT_MAX_PIXELS, decode_image, encode_png, save_picture
from components.progress import RemoteBar, post

GENERATOR_FILE = "generator.pt"
STATE_FILE = "gan_state.pt"
FORMAT = "resops-cgan/1"
LOSSES = ("hinge", "bce")
SYNTHETIC_SOURCES = ("smote", "gan")  # never used as GAN training data


def check_image_size(image_size: int) -> int:
    s = int(image_size)
    if s < 8 or s > 256 or s & (s - 1):
        raise ValueError(f"GAN image_size must be a power of two in 8..256 (32 or 64 for ELPV), got {image_size}")
    return s


def _check_chans(in_chans: int) -> int:
    if int(in_chans) not in (1, 3):
        raise ValueError(f"GAN in_chans must be 1 or 3, got {in_chans}")
    return int(in_chans)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and not hasattr(m, "parametrizations"):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (B, z_dim) and labels (B,) -> images (B, in_chans, image_size, image_size) in [-1, 1]."""

    def __init__(self, num_classes: int, image_size: int = 64, in_chans: int = 1, z_dim: int = 128,
                 base_channels: int = 64, embed_dim: int | None = None):
        super().__init__()
        self.num_classes, self.image_size = int(num_classes), check_image_size(image_size)
        self.in_chans, self.z_dim = _check_chans(in_chans), int(z_dim)
        self.embed_dim = int(embed_dim or z_dim)
        n_up = int(math.log2(self.image_size)) - 2
        chans = [base_channels * 2 ** min(3, n_up - 1 - i) for i in range(n_up)]  # at 4x4 ... image_size/2
        self.embed = nn.Embedding(self.num_classes, self.embed_dim)
        layers: list[nn.Module] = [nn.ConvTranspose2d(self.z_dim + self.embed_dim, chans[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True)]
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(chans[-1], self.in_chans, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(h[:, :, None, None])


class Discriminator(nn.Module):
    """Spectral-normalised conv stack with a projection head: images, labels -> logits (B,)."""

    def __init__(self, num_classes: int, image_size: int = 64, in_chans: int = 1, base_channels: int = 64):
        super().__init__()
        image_size, in_chans = check_image_size(image_size), _check_chans(in_chans)
        n_down = int(math.log2(image_size)) - 2
        chans = [base_channels * 2 ** min(3, i) for i in range(n_down)]
        layers: list[nn.Module] = []
        prev = in_chans
        for c in chans:
            layers += [spectral_norm(nn.Conv2d(prev, c, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            prev = c
        self.net = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(prev, 1))
        self.embed = spectral_norm(nn.Embedding(int(num_classes), prev))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.net(x).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def d_loss(real: torch.Tensor, fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    return nn.functional.softplus(-real).mean() + nn.functional.softplus(fake).mean()


def g_loss(fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    return -fake.mean() if kind == "hinge" else nn.functional.softplus(-fake).mean()


def weights_version(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the weights: names, dtypes, shapes and bytes in name order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- data
def to_uint8_chw(img: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 HxWxC -> uint8 CxSxS (area resize)."""
    import cv2

    if img.shape[0] != image_size or img.shape[1] != image_size:
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA).reshape(
            image_size, image_size, img.shape[2])
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def _train_mask(split, source, n: int) -> np.ndarray:
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
    keep = _train_mask(f["split"] if "split" in f else None, f["source"] if "source" in f else None, len(f))
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


def _progress(line: str) -> None:
    os.write(1, (line + "\n").encode())


def gan_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker: alternating D / G updates, a checkpoint and a report every epoch.

    Resumes from ``ray.train.get_checkpoint()`` (networks, optimisers, history). Every rank runs
    exactly ``steps_per_epoch`` updates on its slice of a per-epoch permutation of the images
    (``cfg["data"]``: an object ref of ``{"images": uint8 NCHW, "labels": int64}``).
    """
    import ray
    import ray.train
    import ray.train.torch

    from components.models.checkpoint import unwrap

    torch.set_num_threads(int(cfg["threads_per_worker"]))
    from components.train.precision import autocast, resolve_precision
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.get("precision", "fp32"), device)
    kind = cfg["loss"]
    gen = Generator(**_arch(cfg), z_dim=cfg["z_dim"], base_channels=cfg["base_channels"], embed_dim=cfg["embed_dim"])
    disc = Discriminator(**_arch(cfg), base_channels=cfg["base_channels"])
    betas = tuple(float(b) for b in cfg["betas"])
    opt_g = torch.optim.Adam(gen.parameters(), lr=float(cfg["lr"]), betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(cfg["lr_d"]), betas=betas)
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        gen.load_state_dict(state["generator"])
        disc.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        start, history = int(state["epochs_done"]), json.loads(state["history"])
        if rank == 0:
            _progress(f"[gan] resuming after epoch {start} of {cfg['epochs']}")
    torch.manual_seed(int(cfg["seed"]) * 1000 + rank * 100 + start)  # fresh noise stream per rank and resume
    gen = ray.train.torch.prepare_model(gen)
    disc = ray.train.torch.prepare_model(disc)
    data = ray.get(cfg["data"]) if isinstance(cfg["data"], ray.ObjectRef) else cfg["data"]
    images, labels = data["images"], data["labels"]
    steps, bs, zd = int(cfg["steps_per_epoch"]), int(cfg["batch_size"]), int(cfg["z_dim"])
    board, posted = (cfg.get("progress_board") if rank == 0 else None), 0.0  # the driver's bar (components.progress)
    for epoch in range(start, int(cfg["epochs"])):
        gen.train()
        disc.train()
        t0, done, sums = time.perf_counter(), 0, np.zeros(5)
        # One permutation per epoch, the same on every rank; rank r takes every world-th row, so
        # the ranks see disjoint rows and run the same number of steps (as DDP needs).
        order = np.random.default_rng([int(cfg["seed"]), epoch]).permutation(len(labels))[rank::world]
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
            if board is not None and time.perf_counter() - posted >= 0.5:
                posted = time.perf_counter()
                post(board, (epoch * steps + done) / (int(cfg["epochs"]) * steps), f"epoch {epoch + 1}/{cfg['epochs']}")
            sums += [len(y), float(loss_d) * len(y), float(loss_g) * len(y),
                     float((real_logits > 0).float().sum()), float((fake_logits < 0).float().sum())]
        t = torch.as_tensor(sums, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        n = max(1.0, float(t[0]))
        record = {"epoch": epoch + 1, "start_epoch": start, "steps": done, "samples": int(t[0]),
                  "d_loss": float(t[1]) / n, "g_loss": float(t[2]) / n, "d_real_accuracy": float(t[3]) / n,
                  "d_fake_accuracy": float(t[4]) / n, "seconds": time.perf_counter() - t0}
        history.append(record)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _progress(f"[gan] epoch {epoch + 1}/{cfg['epochs']}  d_loss {record['d_loss']:.3f}  "
                          f"g_loss {record['g_loss']:.3f}  D(real) acc {record['d_real_accuracy']:.2f}  "
                          f"D(fake) acc {record['d_fake_accuracy']:.2f}  {record['seconds']:.1f}s")
                torch.save({"generator": {k: v.detach().cpu() for k, v in unwrap(gen).state_dict().items()},
                            "discriminator": {k: v.detach().cpu() for k, v in unwrap(disc).state_dict().items()},
                            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "epochs_done": epoch + 1,
                            "history": json.dumps(history)}, Path(tmp) / STATE_FILE)
                ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
            else:
                ray.train.report(record, checkpoint=None)


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
    blob = json.dumps({k: v for k, v in sorted(cfg.items()) if k not in skip}, sort_keys=True, default=str)
    return f"gan-{hashlib.sha256((blob + data_digest).encode()).hexdigest()[:12]}"


def train_gan(frame_or_shards: pd.DataFrame | str | os.PathLike | Sequence[str], out_dir: str | os.PathLike, *,
              image_size: int = 64, in_chans: int = 1, num_classes: int, epochs: int = 100, batch_size: int = 64,
              lr: float = 2e-4, seed: int = 42, num_workers: int = 1, storage_path: str | os.PathLike,
              z_dim: int = 128, base_channels: int = 64, embed_dim: int | None = None, loss: str = "hinge",
              betas: Sequence[float] = (0.0, 0.9), lr_d: float | None = None, d_steps: int = 1,
              class_names: Sequence[str] | None = None, cpus_per_worker: float = 1.0, threads_per_worker: int = 1,
              max_failures: int = 2, keep_checkpoints: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS,
              decode_threads: int = 2, run_name: str | None = None, precision: str = "fp32") -> GanResult:
    """Train a class-conditional DCGAN on the real training rows and write ``out_dir/generator.pt``.

    ``frame_or_shards``: a frame (image, label[, split, source]) or a shards directory / list of
    Parquet files; only rows with split "train" (when present) and a non-synthetic source are
    used, decoded once on the driver (:func:`load_training_images`) and shared with the
    ``num_workers`` Ray Train workers (DDP when > 1) through the object store.
    ``batch_size`` is per worker (capped by the rows a worker has); one epoch is one pass over the
    real rows. Adam with ``betas`` (0, 0.9) and spectral norm suit the hinge loss; ``lr_d``
    (default ``lr``) and ``d_steps`` D updates per G update tune the balance.
    Checkpoints go to ``storage_path/<run name>/epoch_NNNN`` (a re-run resumes, see
    :func:`gan_run_name`). Also writes ``out_dir/gan.json`` (metadata and per-epoch history).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    check_image_size(image_size)
    _check_chans(in_chans)
    if loss not in LOSSES:
        raise ValueError(f"GAN loss must be one of {LOSSES}, got {loss!r}")
    if int(epochs) < 1:
        raise ValueError(f"GAN epochs must be >= 1, got {epochs}")
    images, labels, digest = load_training_images(frame_or_shards, image_size, in_chans, max_pixels, decode_threads)
    counts = {int(k): int(v) for k, v in sorted(pd.Series(labels).value_counts().items())}
    rows = len(labels)
    bad = [c for c in counts if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside 0..{num_classes - 1}")
    if rows < num_workers:
        raise ValueError(f"{rows} real training rows cannot feed {num_workers} GAN workers")
    bs = max(1, min(int(batch_size), rows // num_workers))
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    cfg = dict(num_classes=int(num_classes), image_size=int(image_size), in_chans=int(in_chans), z_dim=int(z_dim),
               base_channels=int(base_channels), embed_dim=int(embed_dim or z_dim), loss=loss,
               betas=[float(b) for b in betas], lr=float(lr), lr_d=float(lr_d if lr_d is not None else lr),
               d_steps=int(d_steps), batch_size=bs, seed=int(seed),
               num_workers=int(num_workers), epochs=int(epochs), threads_per_worker=int(threads_per_worker),
               steps_per_epoch=max(1, rows // (bs * num_workers)), class_names=names, precision=precision)
    name = run_name or gan_run_name(cfg, digest)
    storage = _storage.resolve(storage_path)  # an absolute path or a URI (s3://...)
    cfg["data"] = ray.put({"images": images, "labels": labels})
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
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    history = json.loads(state["history"])
    weights = {k: v.contiguous() for k, v in state["generator"].items()}
    version = weights_version(weights)
    meta = {"format": FORMAT, "version": version, "num_classes": cfg["num_classes"], "class_names": names,
            "image_size": cfg["image_size"], "in_chans": cfg["in_chans"], "z_dim": cfg["z_dim"],
            "embed_dim": cfg["embed_dim"], "base_channels": cfg["base_channels"],
            "train": {"epochs": int(state["epochs_done"]), "batch_size": bs, "lr": cfg["lr"], "lr_d": cfg["lr_d"],
                      "betas": cfg["betas"], "loss": loss, "d_steps": cfg["d_steps"], "seed": cfg["seed"],
                      "num_workers": cfg["num_workers"], "rows": rows, "counts": {str(k): v for k, v in counts.items()},
                      "data_digest": digest, "run_name": name}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / GENERATOR_FILE
    tmp_path = path.with_suffix(".pt.tmp")
    torch.save({"state_dict": weights, "meta": meta}, tmp_path)
    os.replace(tmp_path, path)
    (out / "gan.json").write_text(json.dumps({"meta": meta, "history": history}, indent=2))
    run_dir = _storage.join(storage, name)
    return GanResult(path, version, history, run_dir if _storage.is_uri(run_dir) else Path(run_dir), meta)


# ----------------------------------------------------------------------------- use
class GeneratorFileError(RuntimeError):
    """A generator file is missing, malformed or its weights do not match its version."""


def load_generator(path: str | os.PathLike) -> tuple[Generator, dict]:
    """Rebuild the generator of ``path`` (``weights_only=True``) in eval mode; checks the version."""
    path = Path(path)
    if not path.exists():
        raise GeneratorFileError(f"generator file {path} does not exist: run train_gan first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GeneratorFileError(f"generator file {path} cannot be read: {exc}") from None
    if not isinstance(payload, dict) or payload.get("meta", {}).get("format") != FORMAT:
        raise GeneratorFileError(f"{path} is not a {FORMAT} generator file")
    meta, state = payload["meta"], payload["state_dict"]
    if weights_version(state) != meta["version"]:
        raise GeneratorFileError(f"{path}: the weights do not match the recorded version {meta['version'][:12]}")
    gen = Generator(meta["num_classes"], meta["image_size"], meta["in_chans"], meta["z_dim"], meta["base_channels"],
                    meta["embed_dim"])
    gen.load_state_dict(state)
    return gen.eval(), meta


def _sample(gen: Generator, label: int, n: int, seed: int, batch_size: int = 256) -> np.ndarray:
    """n uint8 images (n, S, S, C) of one class; the noise depends only on (seed, label)."""
    rng = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(label) * 7919) % 2**63)
    out = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            z = torch.randn(m, gen.z_dim, generator=rng)
            x = gen(z, torch.full((m,), int(label), dtype=torch.int64))
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, gen.image_size, gen.image_size, gen.in_chans), np.uint8)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    if img.shape[1] == w and img.shape[0] == h:
        return img
    interp = cv2.INTER_AREA if w < img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp).reshape(h, w, img.shape[2])


def generate(generator_path: str | os.PathLike, counts: Mapping[int, int], seed: int = 0, *,
             size: int | tuple[int, int] | None = None, class_names: Mapping[int, str] | Sequence[str] | None = None,
             batch_size: int = 256) -> pd.DataFrame:
    """``counts[label]`` generated training rows per class (deterministic in ``seed``).

    Columns: image (PNG), path, label, label_name, split="train", group, sha256, width, height,
    source="gan", attrs (JSON with generator_version, seed, index), generator_version.
    Images are at the generator's size, or ``size`` (int or (width, height)).
    """
    gen, meta = load_generator(generator_path)
    version = meta["version"]
    if not class_names:  # None or empty: the names the generator was trained with
        names = dict(enumerate(meta["class_names"]))
    else:
        names = dict(class_names) if isinstance(class_names, Mapping) else dict(enumerate(class_names))
    if size is None:
        w = h = meta["image_size"]
    else:
        w, h = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    rows = []
    for label, n in sorted((int(k), int(v)) for k, v in counts.items()):
        if not 0 <= label < meta["num_classes"]:
            raise ValueError(f"label {label} is outside the generator's 0..{meta['num_classes'] - 1}")
        for i, img in enumerate(_sample(gen, label, n, seed, batch_size)):
            png = encode_png(_resize(img, w, h))
            path = f"synthetic/gan/{version[:12]}/{names.get(label, label)}/{seed}-{i:06d}.png"
            rows.append({"image": png, "path": path, "label": label, "label_name": str(names.get(label, label)),
                         "split": "train", "group": path, "sha256": hashlib.sha256(png).hexdigest(), "width": w,
                         "height": h, "source": "gan",
                         "attrs": json.dumps({"generator_version": version, "seed": int(seed), "index": i}),
                         "generator_version": version})
    cols = ["image", "path", "label", "label_name", "split", "group", "sha256", "width", "height", "source", "attrs",
            "generator_version"]
    out = pd.DataFrame(rows, columns=cols)
    out["label"] = out["label"].astype("int64")
    return out


def save_sample_grid(generator_path: str | os.PathLike, real_frame: pd.DataFrame | None, out_path: str | os.PathLike,
                     *, per_class: int = 8, seed: int = 0, cell: int | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """A PNG for a person to judge: one row per class, ``per_class`` real training images on the
    left, ``per_class`` generated ones on the right, class names and the generator version."""
    from PIL import Image, ImageDraw

    gen, meta = load_generator(generator_path)
    cell = int(cell or max(48, meta["image_size"]))
    k, pad, label_w, head = meta["num_classes"], 4, 120, 18
    width = label_w + 2 * per_class * (cell + pad) + 3 * pad
    canvas = Image.new("RGB", (width, head + k * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x_gen = label_w + per_class * (cell + pad) + 2 * pad
    draw.text((label_w, 3), "real", fill=(0, 0, 0))
    draw.text((x_gen, 3), f"generated  (generator {meta['version'][:12]})", fill=(0, 0, 0))
    rng = np.random.default_rng(seed)
    real = real_frame
    if real is not None:
        real = real[_train_mask(real["split"] if "split" in real else None,
                                real["source"] if "source" in real else None, len(real))]

    def paste(img: np.ndarray, x: int, y: int) -> None:
        img = _resize(img, cell, cell)
        mode = "L" if img.shape[2] == 1 else "RGB"
        canvas.paste(Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode).convert("RGB"), (x, y))

    for c in range(k):
        y = head + c * (cell + pad)
        draw.text((pad, y + cell // 2 - 6), str(meta["class_names"][c])[:18], fill=(0, 0, 0))
        if real is not None:
            pool = real["image"].to_numpy()[real["label"].to_numpy() == c]
            pick = rng.choice(len(pool), size=min(per_class, len(pool)), replace=False) if len(pool) else []
            for j, i in enumerate(pick):
                paste(decode_image(pool[i], meta["in_chans"], max_pixels), label_w + j * (cell + pad), y)
        for j, img in enumerate(_sample(gen, c, per_class, seed)):
            paste(img, x_gen + j * (cell + pad), y)
    return save_picture(canvas, out_path)


__all__ = ["GENERATOR_FILE", "Discriminator", "GanResult", "Generator", "GeneratorFileError", "check_image_size",
           "gan_loop_per_worker", "generate", "load_generator", "save_sample_grid", "train_gan", "weights_version"]
