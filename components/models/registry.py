"""One registry and one factory for every model: ``create_model(name, num_classes, in_chans, ...)``.

Variants are built on torchvision's ResNet (its BasicBlock and builder), never a copied ResNet.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int, in_chans: int = 1, **kwargs) -> nn.Module:
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {list_models()}") from None
    return builder(num_classes=num_classes, in_chans=in_chans, **kwargs)


def _adapt_stem(model: nn.Module, in_chans: int) -> nn.Module:
    if in_chans != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                                padding=old.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model
def resnet18(num_classes: int, in_chans: int = 1, **_: object) -> nn.Module:
    """torchvision's ResNet18 with ``in_chans`` input channels and a ``num_classes`` head."""
    return _adapt_stem(tv_resnet18(weights=None, num_classes=num_classes), in_chans)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prediction_layer(model: nn.Module) -> nn.Module:
    """The final classifier, for pruning exclusions and transfer learning."""
    return model.fc


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Softmax probabilities for a float tensor (N, C, H, W), batched, in eval mode, channels_last."""
    model.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].contiguous(memory_format=torch.channels_last)
        outs.append(torch.softmax(model(x).float(), dim=1))
    return torch.cat(outs) if outs else torch.empty(0)
