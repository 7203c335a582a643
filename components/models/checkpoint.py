"""Model files: a state dict plus the metadata needed to rebuild the model, loaded safely.

Three formats, all read by :func:`load_model`: the plain ``.pt`` (:func:`save_model`), the sparse
``.npz`` of magnitude-pruned models (:func:`save_sparse`: for each tensor the dense array or a bit mask
plus the non-zero values, compressed; ``allow_pickle=False`` on load, so no code runs when a file is
read) and the channel-pruned ``.pt`` whose meta describes the pruned layer shapes
(:func:`save_structured`). The pruning itself is in :mod:`components.prune`.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from components.models.registry import create_model

REQUIRED_META = ("model_name", "num_classes", "in_chans", "image_size", "class_names")
SPARSE_MIN = 0.2  # below this sparsity a dense array is smaller than mask + values
STRUCTURED_KEY = "structured"  # meta key marking a structured-pruned model file
FORMAT_VERSION = 1


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
    ``structured`` is a channel-pruned model (:func:`load_structured`).
    """
    if Path(path).suffix == ".npz":
        return load_sparse(path)
    payload = load_payload(path)
    if STRUCTURED_KEY in payload["meta"]:  # channel-pruned: layer shapes differ from the architecture's
        return load_structured(path)
    model = build_from_meta(payload["meta"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"model file {path}: weights do not fit {payload['meta']['model_name']}: {exc}") from None
    return model.eval(), payload["meta"]


# ------------------------------------------------------------------ sparse file (magnitude pruning)
def save_sparse(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write a compressed sparse model file (.npz): bit masks + non-zero values for sparse tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"__meta__": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for name, t in model.state_dict().items():
        a = t.detach().cpu().numpy()
        if a.dtype.kind == "f" and a.size >= 64 and (a == 0).mean() >= SPARSE_MIN:
            mask = a != 0
            arrays[f"{name}::mask"] = np.packbits(mask.ravel())
            arrays[f"{name}::values"] = a[mask]
            arrays[f"{name}::shape"] = np.asarray(a.shape, dtype=np.int64)
        else:
            arrays[f"{name}::dense"] = a
    with open(path, "wb") as fh:  # np.savez_compressed would append ".npz" to a bare path name
        np.savez_compressed(fh, **arrays)
    return path


def load_sparse(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model from :func:`save_sparse`'s file (dense weights in memory)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"sparse model file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            state: dict[str, torch.Tensor] = {}
            for key in z.files:
                if key == "__meta__":
                    continue
                name, kind = key.rsplit("::", 1)
                if kind == "dense":
                    state[name] = torch.from_numpy(z[key].copy())
                elif kind == "mask":
                    shape = tuple(z[f"{name}::shape"])
                    values = z[f"{name}::values"]
                    mask = np.unpackbits(z[key], count=int(np.prod(shape))).astype(bool)
                    dense = np.zeros(mask.size, dtype=values.dtype)
                    dense[mask] = values
                    state[name] = torch.from_numpy(dense.reshape(shape))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointError(f"sparse model file {path} is malformed: {exc}") from None
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"sparse model file {path}: metadata lacks {missing}")
    model = build_from_meta(meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"sparse model file {path}: weights do not fit {meta['model_name']}: {exc}") from None
    return model.eval(), meta


# ------------------------------------------------------------ structured file (channel pruning)
def _shape_config(module: nn.Module) -> dict | None:
    if isinstance(module, _ConvNd):
        return {"type": "conv", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "groups": module.groups}
    if isinstance(module, _BatchNorm):
        return {"type": "batchnorm", "num_features": module.num_features}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in_features": module.in_features, "out_features": module.out_features}
    return None


def structure_of(model: nn.Module) -> dict[str, dict]:
    """Shape attributes of every convolution, batch norm and linear layer, by module name."""
    return {name: cfg for name, m in unwrap(model).named_modules() if (cfg := _shape_config(m)) is not None}


def save_structured(path: str | Path, model: nn.Module, meta: dict,
                    report=None) -> Path:
    """Write a structured-pruned model: ``{"state_dict", "meta"}`` with ``meta["structured"]``.

    ``meta`` needs the keys of :func:`components.models.checkpoint.save_model` (``model_name``,
    ``num_classes``, ``in_chans``, ``image_size``, ``class_names``, optional ``model_kwargs``):
    they rebuild the unpruned network, ``meta["structured"]["modules"]`` reshapes it.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    net = unwrap(model)
    info: dict = {"format": FORMAT_VERSION, "modules": structure_of(net)}
    if report is not None:
        info["report"] = report.as_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "meta": dict(meta) | {STRUCTURED_KEY: info}}, path)
    return path


def is_structured(meta_or_path: dict | str | Path) -> bool:
    """Whether a model file (or its meta) is structured-pruned: ``"structured"`` in its meta."""
    meta = meta_or_path if isinstance(meta_or_path, dict) else load_payload(meta_or_path)["meta"]
    return STRUCTURED_KEY in meta


def _apply_config(module: nn.Module, cfg: dict, name: str, path: Path) -> None:
    kind = cfg.get("type")
    expected = {"conv": _ConvNd, "batchnorm": _BatchNorm, "linear": nn.Linear}.get(kind)
    if expected is None or not isinstance(module, expected):
        raise CheckpointError(f"structured model file {path}: module {name!r} is a {type(module).__name__}, "
                              f"the file describes a {kind}")
    for attr, value in cfg.items():
        if attr != "type":
            setattr(module, attr, int(value))


def _reshape_tensor(net: nn.Module, key: str, saved: Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = net.get_submodule(owner_name)
    if attr in owner._parameters and owner._parameters[attr] is not None:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(torch.empty(saved.shape, dtype=old.dtype),
                                               requires_grad=old.requires_grad)
    elif attr in owner._buffers and owner._buffers[attr] is not None:
        owner._buffers[attr] = torch.empty(saved.shape, dtype=owner._buffers[attr].dtype)


def load_structured(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model written by :func:`save_structured` (``torch.load(weights_only=True)``).

    Builds ``create_model`` from the meta, gives the recorded modules their pruned shapes and
    loads the weights strictly. A file without ``meta["structured"]`` (a plain
    :func:`~components.models.checkpoint.save_model` file) loads as the unpruned model, so this
    function can read every ``.pt`` the prune stage writes. Returns ``(model.eval(), meta)``.
    """
    path = Path(path)
    payload = load_payload(path)
    meta, state = payload["meta"], payload["state_dict"]
    net = build_from_meta(meta)
    info = meta.get(STRUCTURED_KEY)
    if info is not None:
        if not isinstance(info, dict) or not isinstance(info.get("modules"), dict):
            raise CheckpointError(f"structured model file {path}: meta['{STRUCTURED_KEY}'] has no 'modules' table")
        if info.get("format", FORMAT_VERSION) > FORMAT_VERSION:
            raise CheckpointError(f"structured model file {path} has format {info['format']}; this code reads "
                                  f"up to {FORMAT_VERSION}")
        modules = dict(net.named_modules())
        for name, cfg in info["modules"].items():
            if name not in modules:
                raise CheckpointError(f"structured model file {path}: {meta['model_name']} has no module {name!r}")
            _apply_config(modules[name], cfg, name, path)
        own = net.state_dict()
        for key, saved in state.items():
            if key in own and own[key].shape != saved.shape:
                _reshape_tensor(net, key, saved)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"model file {path}: weights do not fit {meta['model_name']}: {exc}") from None
    for name, module in net.named_modules():  # the recorded shape attributes must match the weights
        if isinstance(module, _ConvNd) and (module.weight.shape[0] != module.out_channels or
                                            module.weight.shape[1] * module.groups != module.in_channels):
            raise CheckpointError(f"structured model file {path}: {name} weight {tuple(module.weight.shape)} does "
                                  f"not match in/out channels {module.in_channels}/{module.out_channels}")
        if isinstance(module, nn.Linear) and tuple(module.weight.shape) != (module.out_features, module.in_features):
            raise CheckpointError(f"structured model file {path}: {name} weight {tuple(module.weight.shape)} does "
                                  f"not match in/out features {module.in_features}/{module.out_features}")
    return net.eval(), meta
