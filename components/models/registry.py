"""One registry and one factory for every model: ``create_model(name, num_classes, in_chans, **kwargs)``.

Variants are built on torchvision's ResNet (its ``ResNet`` class and ``BasicBlock``), never a
copied ResNet. ``resnet18`` lives here; the attention and stem variants (``se_resnet18``,
``resnet18_simam``, ``resnet18_k2``) live in :mod:`components.models.variants` and register
themselves when :mod:`components.models` is imported.
"""
from __future__ import annotations

import inspect
import operator
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TASKS: dict[str, str] = {}  # model name -> "classify" | "detect"
TASKS = ("classify", "detect")


def register_model(fn: Callable[..., nn.Module] | None = None, *, task: str = "classify"):
    """Register a builder ``fn(num_classes, in_chans, **own_kwargs)`` under its function name.

    ``@register_model`` registers a classifier; ``@register_model(task="detect")`` a detector
    (:mod:`components.models.detector`). Both load through the same model files.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[f.__name__] = f
        _TASKS[f.__name__] = task
        return f

    return register(fn) if fn is not None else register


def list_models(task: str = "classify") -> list[str]:
    """The registered models of one task (classifiers by default)."""
    return sorted(n for n in _MODELS if _TASKS[n] == task)


def model_task(name: str) -> str:
    """``"classify"`` or ``"detect"`` for a registered model name."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_MODELS)}")
    return _TASKS[name]


def _positive_int(value: object, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # int and numpy integers; not floats, not strings
    except TypeError:
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(number)


def create_model(name: str, num_classes: int, in_chans: int = 1, head: str = "softmax", **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` are the variant's own options.

    ``head``: ``softmax`` (torchvision's ``fc``) or ``ordinal`` (a cumulative-link head for ordered
    classes, :mod:`components.models.heads`); any classifier variant takes either.

    Raises ``ValueError`` for an unknown name, a bad ``num_classes``/``in_chans``, or an
    option the variant does not take (a typo in ``params.yaml`` ``model.kwargs`` is an error,
    never silently ignored).
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_MODELS)}") from None
    num_classes = _positive_int(num_classes, "num_classes")
    in_chans = _positive_int(in_chans, "in_chans")
    parameters = inspect.signature(builder).parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    own_options = [p.name for p in parameters
                   if p.name not in ("num_classes", "in_chans") and p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(kwargs) - set(own_options))
    if unknown and not takes_any:
        raise ValueError(f"model {name!r} does not take {unknown}; its options: {own_options or 'none'}")
    model = builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if head != "softmax":
        if _TASKS[name] != "classify":
            raise ValueError(f"model {name!r} is a detector: it has no classification head to replace")
        from components.models.heads import replace_head

        model = replace_head(model, head)
    return model


def with_input_channels(model: nn.Module, in_chans: int) -> nn.Module:
    """Replace a torchvision ResNet's 3-channel ``conv1`` by a freshly initialised ``in_chans`` one."""
    if in_chans != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                                padding=old.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return model


@register_model
def resnet18(num_classes: int, in_chans: int = 1) -> nn.Module:
    """torchvision's ResNet18 with ``in_chans`` input channels and a ``num_classes`` head."""
    return with_input_channels(tv_resnet18(weights=None, num_classes=num_classes), in_chans)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prediction_layer(model: nn.Module) -> nn.Module:
    """The final classifier, for pruning exclusions and transfer learning."""
    return getattr(model, "module", model).fc  # through a DDP wrapper


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Softmax probabilities for a float tensor (N, C, H, W), batched, in eval mode, channels_last."""
    model.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].contiguous(memory_format=torch.channels_last)
        outs.append(torch.softmax(model(x).float(), dim=1))
    return torch.cat(outs) if outs else torch.empty(0)
