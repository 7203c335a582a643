"""Transfer learning: start a resops model from pretrained weights, and say what happened.

:func:`resolve_pretrained` turns ``model.pretrained`` into a local file: ``imagenet`` means
torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` in torch hub's cache (``TORCH_HOME``), the file
torchvision itself would use; it is downloaded only when it is not cached and the host is
reachable, and offline a :class:`PretrainedWeightsError` says at once which file to place where.
Any other value is a local path. :func:`load_pretrained` never downloads; it reads a local file, either a
torchvision-format ResNet18 state dict (``torch.save(resnet18(weights=...).state_dict())``:
keys like ``conv1.weight``, ``layer1.0.conv1.weight``, ``fc.weight``) or a resops checkpoint
(``{"state_dict": ..., "meta": ...}`` from :func:`components.models.checkpoint.save_model`),
with ``torch.load(weights_only=True)``, and copies every tensor that fits by name and shape:

* the input convolution (the model's first ``Conv2d``) is adapted when only its number of input
  channels differs: summed over the file's channels for a 1-channel model, otherwise repeated
  and scaled by ``file_channels / in_chans`` (timm's ``adapt_input_conv``), which keeps the
  filters' response scale;
* a tensor of another shape (the ``fc`` head for another ``num_classes``) and a model tensor the
  file lacks (SE gates, the ``resnet18_k2`` stem) keep the model's own initialisation and are
  reported as ``reinitialised``; call this on a freshly built model;
* file tensors with no fitting place in the model (a mismatched head, the 7x7 stem in
  ``resnet18_k2``) are reported as ``ignored``.

:func:`backbone_parameters` and :func:`head_parameters` split the parameters so a trainer can
freeze the backbone for some epochs or give it a lower learning rate.
"""
from __future__ import annotations

import os
import socket
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.hub
from torch import Tensor, nn

from components.models.checkpoint import CheckpointError, unwrap
from components.models.registry import prediction_layer

DDP_PREFIX = "module."
IMAGENET = "imagenet"  # the model.pretrained value for torchvision's ResNet18 ImageNet weights
REACHABILITY_TIMEOUT_S = 3.0


class PretrainedWeightsError(CheckpointError):
    """A pretrained-weights file is missing, unreadable or not a state dict; the message names the file."""


def imagenet_weights_url() -> str:
    """URL of torchvision's ``ResNet18_Weights.IMAGENET1K_V1``."""
    from torchvision.models import ResNet18_Weights

    return ResNet18_Weights.IMAGENET1K_V1.url


def imagenet_weights_cache_path() -> Path:
    """Where torch hub caches the ImageNet weights, as ``torch.hub.load_state_dict_from_url`` (and so
    torchvision) computes it: ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>``."""
    filename = os.path.basename(urlparse(imagenet_weights_url()).path)
    return Path(os.path.join(torch.hub.get_dir(), "checkpoints", filename))


def resolve_pretrained(spec: str) -> Path:
    """The local weights file ``model.pretrained`` names.

    ``"imagenet"``: torchvision's ResNet18 ImageNet weights in torch hub's cache (returned without
    network access when cached); otherwise downloaded into that cache (hash checked) if the URL's
    host answers within a few seconds. Offline or on any download failure it raises
    :class:`PretrainedWeightsError` naming the URL, the file and the full path to place it at.
    Any other value: ``Path(spec).expanduser().resolve()`` (whether it exists is
    :func:`load_pretrained`'s check).
    """
    if spec != IMAGENET:
        return Path(spec).expanduser().resolve()
    url = imagenet_weights_url()
    target = imagenet_weights_cache_path()
    if target.is_file():
        return target
    parts = urlparse(url)
    # Behind a proxy the host is not reachable directly, though the download (urllib honours the
    # proxy variables) may work: then only the download itself can tell.
    if not urllib.request.getproxies().get(parts.scheme):
        try:
            connection = socket.create_connection((parts.hostname, parts.port or 443),
                                                  timeout=REACHABILITY_TIMEOUT_S)
        except OSError as exc:
            raise _imagenet_unavailable(url, target, f"{parts.hostname} is unreachable: {_reason(exc)}") from None
        connection.close()
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)  # writes ``target``
    except Exception as exc:  # URLError, OSError, a hash mismatch, ...
        raise _imagenet_unavailable(url, target, f"download failed: {_reason(exc)}") from None
    if not target.is_file():
        raise _imagenet_unavailable(url, target, "the download did not leave the file in the cache")
    return target


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _imagenet_unavailable(url: str, target: Path, reason: str) -> PretrainedWeightsError:
    torch_home = os.environ.get("TORCH_HOME")
    home = f"TORCH_HOME={torch_home}" if torch_home else "TORCH_HOME unset"
    return PretrainedWeightsError(
        f"ImageNet weights for resnet18 are not in torch hub's cache and could not be downloaded ({reason}). "
        f"Place the file {target.name} (from {url}) at {target} ({home}; torch.hub.get_dir()={torch.hub.get_dir()}) "
        f"and run again.")


@dataclass
class TransferReport:
    """What :func:`load_pretrained` did with each tensor.

    Every model tensor (state-dict name) is in exactly one of ``loaded``, ``adapted`` and
    ``reinitialised``; every file tensor is in exactly one of ``loaded``, ``adapted`` and
    ``ignored`` (a shape mismatch puts the name in both ``reinitialised`` and ``ignored``).
    ``details`` says why a tensor was adapted, reinitialised or ignored.
    """

    source: Path
    source_format: str  # "state dict" or "resops checkpoint"
    stripped_prefix: str | None = None
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        prefix = f", '{self.stripped_prefix}' prefix stripped" if self.stripped_prefix else ""
        lines = [f"pretrained weights from {self.source} ({self.source_format}{prefix}):",
                 f"  loaded {len(self.loaded)} tensors"]
        for title, names in (("adapted", self.adapted), ("reinitialised", self.reinitialised),
                             ("ignored", self.ignored)):
            lines.append(f"  {title} {len(names)}" + (":" if names else ""))
            lines += [f"    {name}: {self.details[_detail_key(title, name)]}" for name in names]
        return "\n".join(lines)


def _detail_key(kind: str, name: str) -> str:
    # a mismatched name is both reinitialised (model side) and ignored (file side)
    return f"{kind}:{name}"


def read_pretrained_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str, str | None]:
    """The file's tensors by name, its format, and the DDP prefix stripped from the names (if any).

    Raises :class:`PretrainedWeightsError` naming the file when it is missing, unreadable or
    not a dict of tensors.
    """
    path = Path(path)
    if not path.exists():
        raise PretrainedWeightsError(
            f"pretrained weights file {path} does not exist; nothing is downloaded at run time: place the weights "
            f"there first (e.g. torchvision's ResNet18 ImageNet weights, saved on a machine with network access "
            f"with torch.save(torchvision.models.resnet18(weights='IMAGENET1K_V1').state_dict(), '{path}'))")
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {path} is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, pickled objects weights_only refuses
        raise PretrainedWeightsError(f"pretrained weights file {path} cannot be read with "
                                     f"torch.load(weights_only=True): {_load_failure_reason(exc)}") from None
    source_format = "state dict"
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload, source_format = payload["state_dict"], "resops checkpoint"
    if not isinstance(payload, dict):
        raise PretrainedWeightsError(f"pretrained weights file {path} holds a {type(payload).__name__}, not a state "
                                     f"dict (a dict of tensors) or a resops checkpoint")
    if not payload:
        raise PretrainedWeightsError(f"pretrained weights file {path} holds an empty state dict")
    not_tensors = [f"{key!r} ({type(value).__name__})" for key, value in payload.items()
                   if not isinstance(key, str) or not isinstance(value, Tensor)]
    if not_tensors:
        shown = ", ".join(not_tensors[:5]) + (f" and {len(not_tensors) - 5} more" if len(not_tensors) > 5 else "")
        raise PretrainedWeightsError(f"pretrained weights file {path} is not a dict of tensors: {shown}")
    stripped_prefix = None
    if all(key.startswith(DDP_PREFIX) for key in payload):  # saved from a DistributedDataParallel wrapper
        payload = {key[len(DDP_PREFIX):]: value for key, value in payload.items()}
        stripped_prefix = DDP_PREFIX
    return dict(payload), source_format, stripped_prefix


def _load_failure_reason(exc: Exception) -> str:
    """The informative part of a ``torch.load`` error, without its advice to load unsafely."""
    text = str(exc).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split("Check the documentation", 1)[0].split())
        detail = detail.split(" Please use", 1)[0]  # how to allowlist a class: not for a weights file
        return f"not a pickle of tensors ({detail or 'unsupported content'})"
    return text.splitlines()[0] if text else type(exc).__name__


def input_conv_weight_name(model: nn.Module) -> str:
    """State-dict name of the weight of the model's first convolution (the one that sees the image)."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    raise ValueError("the model has no Conv2d")


def adapt_input_conv_weight(weight: Tensor, in_chans: int) -> Tensor:
    """A conv weight (out, file_channels, kh, kw) for ``in_chans`` input channels.

    ``in_chans == 1``: the sum over the file's channels (RGB filters summed: a grey image gives
    the response the RGB filters give to the same grey in R, G and B). Otherwise the channels
    are repeated cyclically up to ``in_chans`` and scaled by ``file_channels / in_chans``
    (timm's approach), which keeps the response scale; for an image whose channels are all
    equal it keeps the response exactly when ``in_chans`` is a multiple of ``file_channels``.
    """
    source_chans = weight.shape[1]
    as_float = weight.float()
    if in_chans == 1:
        adapted = as_float.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // source_chans)  # ceil
        adapted = as_float.repeat(1, repeats, 1, 1)[:, :in_chans] * (source_chans / in_chans)
    return adapted.to(weight.dtype)


def _adaptation_note(source_chans: int, in_chans: int) -> str:
    if in_chans == 1:
        return f"summed {source_chans} input channels to 1"
    return f"repeated {source_chans} input channels to {in_chans}, scaled by {source_chans}/{in_chans}"


def load_pretrained(model: nn.Module, path: str | Path, *, in_chans: int,
                    strict_shapes: bool = False) -> TransferReport:
    """Copy the local file's fitting tensors into ``model`` (in place) and report on every tensor.

    ``in_chans`` must be the model's number of input channels (a check that the model was built
    for the data). With ``strict_shapes=True`` a shape mismatch other than the adaptable input
    convolution raises :class:`PretrainedWeightsError` and nothing is loaded; by default the
    mismatched model tensor keeps its initialisation (``reinitialised``) and the file's is
    ``ignored``. ``PretrainedWeightsError`` also covers a missing or malformed file.
    """
    target = unwrap(model)
    input_conv = input_conv_weight_name(target)
    model_state = target.state_dict()
    model_in_chans = model_state[input_conv].shape[1]
    if in_chans != model_in_chans:
        raise ValueError(f"in_chans={in_chans} but the model's first convolution ({input_conv}) takes "
                         f"{model_in_chans} channels; build the model with in_chans={in_chans}")
    file_state, source_format, stripped_prefix = read_pretrained_state_dict(path)
    report = TransferReport(source=Path(path), source_format=source_format, stripped_prefix=stripped_prefix)
    to_load: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for name, model_tensor in model_state.items():
        if name not in file_state:
            report.reinitialised.append(name)
            report.details[_detail_key("reinitialised", name)] = "not in the file"
            continue
        file_tensor = file_state[name]
        if file_tensor.shape == model_tensor.shape:
            report.loaded.append(name)
            to_load[name] = file_tensor
        elif name == input_conv and file_tensor.dim() == 4 and \
                file_tensor.shape[:1] + file_tensor.shape[2:] == model_tensor.shape[:1] + model_tensor.shape[2:]:
            report.adapted.append(name)
            report.details[_detail_key("adapted", name)] = _adaptation_note(file_tensor.shape[1], in_chans)
            to_load[name] = adapt_input_conv_weight(file_tensor, in_chans)
        else:
            shapes = f"shape {tuple(file_tensor.shape)} in the file, {tuple(model_tensor.shape)} in the model"
            mismatched.append(f"{name} ({shapes})")
            report.reinitialised.append(name)
            report.details[_detail_key("reinitialised", name)] = shapes
            report.ignored.append(name)
            report.details[_detail_key("ignored", name)] = shapes
    for name in file_state:
        if name not in model_state:
            report.ignored.append(name)
            report.details[_detail_key("ignored", name)] = "the model has no tensor of this name"
    file_order = {name: i for i, name in enumerate(file_state)}
    report.ignored.sort(key=file_order.__getitem__)
    if strict_shapes and mismatched:
        raise PretrainedWeightsError(f"pretrained weights file {path} does not fit the model "
                                     f"(strict_shapes=True): {'; '.join(mismatched)}")
    target.load_state_dict(to_load, strict=False)  # strict=False: the reinitialised tensors are absent
    return report


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier (:func:`~components.models.registry.prediction_layer`)."""
    return list(prediction_layer(model).parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the classifier: what a trainer freezes or trains at a lower lr."""
    head_ids = {id(p) for p in head_parameters(model)}
    return [p for p in unwrap(model).parameters() if id(p) not in head_ids]
