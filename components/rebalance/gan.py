"""Class-conditional DCGAN for oversampling rare classes, trained with Ray Train.

* the networks and losses: :mod:`components.rebalance.gan_model` (:class:`Generator`,
  :class:`Discriminator`, hinge or BCE loss);
* training: :mod:`components.rebalance.gan_train` (:func:`train_gan` runs
  :func:`gan_loop_per_worker` in a ``TorchTrainer`` on the real training rows, a checkpoint every
  epoch, a re-run resumes). The generator is exported to ``out_dir/generator.pt``:
  ``{"state_dict", "meta"}`` with plain types only, loadable with
  ``torch.load(..., weights_only=True)``; ``meta["version"]`` is the sha256 of the weights and
  every generated row carries it (``generator_version`` column and ``attrs``);
* use, here: :func:`generate` turns a generator file and ``{class: count}`` into training rows
  (``source="gan"``); :func:`save_sample_grid` writes a PNG of real vs generated samples per class.

Every name of the three modules the rest of the code uses is importable from here.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from components.data.images import DEFAULT_MAX_PIXELS, decode_image, encode_png, save_picture
from components.rebalance.gan_model import (FORMAT, GENERATOR_FILE, LOSSES, Discriminator, Generator, check_image_size,
                                            d_loss, g_loss, weights_version)
from components.rebalance.gan_train import (STATE_FILE, SYNTHETIC_SOURCES, GanResult, gan_loop_per_worker, gan_run_name,
                                            load_training_images, real_train_mask, to_uint8_chw, train_gan)


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
        real = real[real_train_mask(real["split"] if "split" in real else None,
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


__all__ = ["FORMAT", "GENERATOR_FILE", "LOSSES", "STATE_FILE", "SYNTHETIC_SOURCES", "Discriminator", "GanResult",
           "Generator", "GeneratorFileError", "check_image_size", "d_loss", "g_loss", "gan_loop_per_worker",
           "gan_run_name", "generate", "load_generator", "load_training_images", "save_sample_grid", "to_uint8_chw",
           "train_gan", "weights_version"]
