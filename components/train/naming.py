"""Run names: the same settings, data and code give the same name, so a re-run finds the run's
storage directory and resumes it (after a crash: from its last checkpoint; when finished: returns
its result). The classifier/detector runs (:func:`run_name`) and the GAN runs
(:func:`components.rebalance.gan_train.gan_run_name`) hash their settings with :func:`config_digest`."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

# The code a trained model depends on: a change here is a new run, never a resumed old one.
_TRAINING_CODE = ("train", "models", "augment")


def config_digest(cfg: dict, skip: Iterable[str], *parts: str) -> str:
    """12 hex digits of sha256 over ``cfg`` without the keys in ``skip`` (sorted JSON, values
    without a JSON form as ``str``) followed by ``parts`` (data digest, code digest)."""
    skip = set(skip)
    blob = json.dumps({k: v for k, v in sorted(cfg.items()) if k not in skip}, sort_keys=True, default=str)
    return hashlib.sha256((blob + "".join(parts)).encode()).hexdigest()[:12]


def training_code_digest() -> str:
    """sha256 over the source files of the components training runs (train, models, augment)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in _TRAINING_CODE:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_name(cfg: dict, data_digest: str) -> str:
    """Stable name of a training run: same config, data (``data_digest``: the prepare report's,
    :func:`components.data.digest.manifest_digest`) and training code -> same name -> a re-run
    resumes it."""
    digest = config_digest(cfg, ("wandb", "threads_per_worker"), data_digest, training_code_digest())
    return f"train-{cfg['model_name']}-{digest}"
