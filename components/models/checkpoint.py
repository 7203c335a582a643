"""Model files: a state dict plus the metadata needed to rebuild the model, loaded safely."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from components.models.registry import create_model

REQUIRED_META = ("model_name", "num_classes", "in_chans", "image_size", "class_names")


class CheckpointError(RuntimeError):
    """A model file is missing or malformed; the message names the file and the problem."""


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def save_model(path: str | Path, model: nn.Module, meta: dict) -> Path:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    torch.save({"state_dict": state, "meta": dict(meta)}, path)
    return path


def load_payload(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, wrong format
        raise CheckpointError(f"model file {path} cannot be read as a resops checkpoint: {exc}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "meta" not in payload:
        raise CheckpointError(f"model file {path} is not a resops checkpoint (needs 'state_dict' and 'meta')")
    missing = [k for k in REQUIRED_META if k not in payload["meta"]]
    if missing:
        raise CheckpointError(f"model file {path}: metadata lacks {missing}")
    return payload


def build_from_meta(meta: dict) -> nn.Module:
    return create_model(meta["model_name"], num_classes=meta["num_classes"], in_chans=meta["in_chans"],
                        **meta.get("model_kwargs", {}))


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a file describes and load its weights (``weights_only=True``).

    ``.npz`` files are the sparse format written by the prune stage; a ``.pt`` whose metadata has
    ``structured`` is a channel-pruned model (:func:`components.prune.structured.load_structured`).
    """
    if Path(path).suffix == ".npz":
        from components.prune.unstructured import load_sparse  # late: prune builds on this module

        return load_sparse(path)
    payload = load_payload(path)
    if "structured" in payload["meta"]:  # channel-pruned: layer shapes differ from the architecture's
        from components.prune.structured import load_structured  # late: prune builds on this module

        return load_structured(path)
    model = build_from_meta(payload["meta"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"model file {path}: weights do not fit {payload['meta']['model_name']}: {exc}") from None
    return model.eval(), payload["meta"]
