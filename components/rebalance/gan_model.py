"""The networks of the class-conditional DCGAN (:mod:`components.rebalance.gan`) and their losses.

* :class:`Generator` - a label embedding concatenated to the noise vector, a 1x1 -> 4x4
  ``ConvTranspose2d`` then stride-2 ``ConvTranspose2d`` + BatchNorm + ReLU blocks doubling the
  resolution up to ``image_size``, ``tanh`` output in [-1, 1].
* :class:`Discriminator` - stride-2 convolutions with spectral normalisation and LeakyReLU down
  to 4x4, global sum pooling, a linear output plus the projection term
  ``<embed(y), h>`` (Miyato & Koyama 2018, cGANs with projection discriminator).
* Loss: ``hinge`` (default) or ``bce`` (non-saturating).

:func:`weights_version` is the sha256 of a generator's weights: its file's ``meta["version"]``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

GENERATOR_FILE = "generator.pt"
FORMAT = "resops-cgan/1"
LOSSES = ("hinge", "bce")


def check_image_size(image_size: int) -> int:
    s = int(image_size)
    if s < 8 or s > 256 or s & (s - 1):
        raise ValueError(f"GAN image_size must be a power of two in 8..256 (32 or 64 for ELPV), got {image_size}")
    return s


def check_chans(in_chans: int) -> int:
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
        self.in_chans, self.z_dim = check_chans(in_chans), int(z_dim)
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
        image_size, in_chans = check_image_size(image_size), check_chans(in_chans)
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
