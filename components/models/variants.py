"""ResNet18 variants composed from torchvision's ``ResNet`` and ``BasicBlock``.

Every variant is ``torchvision.models.resnet.ResNet`` with the ``[2, 2, 2, 2]`` BasicBlock
layout of ResNet18; a variant changes only what it names:

* ``se_resnet18(reduction=16)``: a squeeze-and-excitation gate in every block;
* ``resnet18_simam(e_lambda=1e-4, stages=(1, 2))``: parameter-free SimAM in the blocks of
  the chosen stages;
* ``resnet18_k2``: the 7x7 stride-2 stem convolution replaced by three kernel-size-2 ones.

Convolution and batch-norm names stay torchvision's (``layer1.0.conv1.weight``...), so
torchvision ResNet18 weights load into every backbone tensor they fit
(:func:`components.models.transfer.load_pretrained`). Builders take ``num_classes``,
``in_chans`` and their own options, validate the options (``ValueError`` naming the option),
and are rebuilt from a checkpoint's ``meta["model_kwargs"]`` by
:func:`components.models.checkpoint.load_model`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import SqueezeExcitation

from components.models.registry import register_model, with_input_channels

RESNET18_LAYERS = [2, 2, 2, 2]
STAGE_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512}  # stage number -> width of its BasicBlocks


class AttentionBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` with an ``attention`` module on the residual branch.

    The attention (``nn.Identity`` unless a variant sets one) is applied to the branch output
    after ``bn2`` and before the addition of the shortcut, as SE is placed in Hu et al. (2018),
    Fig. 3: ``relu(attention(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))``. The
    convolutions, batch norms and shortcut are the ones ``BasicBlock.__init__`` builds.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attention: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        branch = self.relu(self.bn1(self.conv1(x)))
        branch = self.attention(self.bn2(self.conv2(branch)))
        return self.relu(branch + shortcut)


class SimAM(nn.Module):
    """Parameter-free attention of Yang et al. (ICML 2021), from the minimal energy of each neuron.

    Per channel, with ``n = H*W - 1`` and ``mu`` the channel's spatial mean:
    ``y = x * sigmoid((x - mu)^2 / (4 * (sum((x - mu)^2) / n + e_lambda)) + 0.5)``.
    ``n`` is clamped to at least 1 so a 1x1 feature map (where every ``x - mu`` is 0) gives
    ``x * sigmoid(0.5)`` instead of 0/0.
    """

    def __init__(self, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: Tensor) -> Tensor:
        n = max(x.shape[-2] * x.shape[-1] - 1, 1)
        squared_deviation = (x - x.mean(dim=(-2, -1), keepdim=True)).pow(2)
        variance = squared_deviation.sum(dim=(-2, -1), keepdim=True) / n
        inverse_energy = squared_deviation / (4 * (variance + self.e_lambda)) + 0.5
        return x * torch.sigmoid(inverse_energy)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"


class KernelSize2Stem(nn.Sequential):
    """Three stacked kernel-size-2 convolutions that replace ResNet's 7x7 stride-2 ``conv1``.

    Exact layout (``in_chans`` -> 32 -> 32 -> 64 channels, no conv biases)::

        pad1  ZeroPad2d(left=0, right=1, top=0, bottom=1)
        conv1 Conv2d(in_chans, 32, kernel_size=2, stride=2)   + bn1 + relu1
        pad2  ZeroPad2d(left=1, right=0, top=1, bottom=0)
        conv2 Conv2d(32, 32, kernel_size=2, stride=1)         + bn2 + relu2
        pad3  ZeroPad2d(left=0, right=1, top=0, bottom=1)
        conv3 Conv2d(32, 64, kernel_size=2, stride=1)         + bn3

    The ResNet's own ReLU and max pool follow. Even kernels cannot be padded symmetrically,
    hence the explicit one-sided ``ZeroPad2d``s: ``pad1`` makes the output ``ceil(H/2)``, the
    size of the 7x7 stride-2 padding-3 convolution for every ``H`` (for even ``H`` the extra
    column is never read); ``pad2``/``pad3`` keep the size and alternate sides, so the two
    stride-1 convolutions together are centred like one 3x3 'same' convolution.

    Receptive field (input pixels per output pixel, r_k = r_(k-1) + (kernel_k - 1) * jump_(k-1)):
    conv1 2 (jump 2), conv2 2 + 1*2 = 4, conv3 4 + 1*2 = **6x6** for the stem (the 7x7 stem
    has 7x7); after the 3x3 stride-2 max pool 6 + 2*2 = **10x10** (torchvision: 11x11). Stem
    output row ``k`` sees input rows ``2k-2 .. 2k+3`` (the 7x7 one: ``2k-3 .. 2k+3``).
    """

    def __init__(self, in_chans: int, width: int = 32, out_channels: int = 64) -> None:
        super().__init__(OrderedDict([
            ("pad1", nn.ZeroPad2d((0, 1, 0, 1))),
            ("conv1", nn.Conv2d(in_chans, width, kernel_size=2, stride=2, bias=False)),
            ("bn1", nn.BatchNorm2d(width)),
            ("relu1", nn.ReLU(inplace=True)),
            ("pad2", nn.ZeroPad2d((1, 0, 1, 0))),
            ("conv2", nn.Conv2d(width, width, kernel_size=2, bias=False)),
            ("bn2", nn.BatchNorm2d(width)),
            ("relu2", nn.ReLU(inplace=True)),
            ("pad3", nn.ZeroPad2d((0, 1, 0, 1))),
            ("conv3", nn.Conv2d(width, out_channels, kernel_size=2, bias=False)),
            ("bn3", nn.BatchNorm2d(out_channels)),
        ]))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # torchvision ResNet's initialisation
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _attention_resnet18(num_classes: int, in_chans: int) -> ResNet:
    """ResNet18 whose blocks are :class:`AttentionBasicBlock` (attention = identity until set)."""
    return with_input_channels(ResNet(AttentionBasicBlock, RESNET18_LAYERS, num_classes=num_classes), in_chans)


def stage_blocks(model: ResNet, stage: int) -> list[AttentionBasicBlock]:
    """The BasicBlocks of ``layer{stage}``."""
    return list(getattr(model, f"layer{stage}"))


def se_hidden_channels(channels: int, reduction: int) -> int:
    """Width of an SE block's bottleneck: ``channels // reduction``."""
    return channels // reduction


def se_added_parameters(reduction: int = 16) -> int:
    """Parameters ``se_resnet18(reduction)`` adds to ``resnet18`` (both convolutions have biases).

    One SE block on ``C`` channels with ``h = C // reduction`` has ``fc1`` (1x1 conv C->h,
    weight C*h + bias h) and ``fc2`` (1x1 conv h->C, weight h*C + bias C):
    ``2*C*h + h + C``. ResNet18 has two blocks for each C in 64, 128, 256, 512; for
    ``reduction=16`` that is 2 * (580 + 2184 + 8464 + 33312) = 89080.
    """
    total = 0
    for channels in STAGE_CHANNELS.values():
        hidden = se_hidden_channels(channels, reduction)
        total += 2 * (2 * channels * hidden + hidden + channels)  # two blocks per stage
    return total


def _validate_reduction(reduction: object) -> int:
    smallest = min(STAGE_CHANNELS.values())
    if isinstance(reduction, bool) or not isinstance(reduction, int) or not 1 <= reduction <= smallest:
        raise ValueError(f"se_resnet18: reduction must be an integer in [1, {smallest}] (the {smallest}-channel "
                         f"blocks need at least one squeeze channel), got {reduction!r}")
    return reduction


def _validate_e_lambda(e_lambda: object) -> float:
    if isinstance(e_lambda, bool) or not isinstance(e_lambda, (int, float)) or not math.isfinite(e_lambda) \
            or e_lambda <= 0:
        raise ValueError(f"resnet18_simam: e_lambda must be a positive finite number, got {e_lambda!r}")
    return float(e_lambda)


def _validate_stages(stages: object) -> tuple[int, ...]:
    known = sorted(STAGE_CHANNELS)
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
        raise ValueError(f"resnet18_simam: stages must be a list of stage numbers from {known}, got {stages!r}")
    chosen = list(stages)
    unknown = [s for s in chosen if isinstance(s, bool) or not isinstance(s, int) or s not in STAGE_CHANNELS]
    if unknown:
        raise ValueError(f"resnet18_simam: unknown stage(s) {unknown}; stages are {known} (layer1..layer4)")
    if not chosen:
        raise ValueError(f"resnet18_simam: stages is empty; choose from {known} (for no SimAM use resnet18)")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"resnet18_simam: stages lists a stage twice: {chosen}")
    return tuple(sorted(int(s) for s in chosen))


@register_model
def se_resnet18(num_classes: int, in_chans: int = 1, reduction: int = 16) -> nn.Module:
    """ResNet18 with a squeeze-and-excitation gate (Hu et al. 2018) in every BasicBlock.

    The gate is torchvision's ``SqueezeExcitation``: global average pool, 1x1 conv ``fc1``
    (C -> C // reduction, with bias), ReLU, 1x1 conv ``fc2`` (C // reduction -> C, with
    bias), sigmoid; it rescales the residual branch before the addition. Its tensors are
    ``layerS.B.attention.fc{1,2}.{weight,bias}``. Added parameters: ``2*C*h + h + C`` per
    block, ``h = C // reduction`` (:func:`se_added_parameters`; 89080 for ``reduction=16``).
    ``reduction`` must be an integer in [1, 64].
    """
    reduction = _validate_reduction(reduction)
    model = _attention_resnet18(num_classes, in_chans)
    for stage, channels in STAGE_CHANNELS.items():
        for block in stage_blocks(model, stage):
            block.attention = SqueezeExcitation(channels, se_hidden_channels(channels, reduction))
    return model


@register_model
def resnet18_simam(num_classes: int, in_chans: int = 1, e_lambda: float = 1e-4,
                   stages: Iterable[int] = (1, 2)) -> nn.Module:
    """ResNet18 with parameter-free :class:`SimAM` in the BasicBlocks of ``stages``.

    ``stages`` are layer numbers (1..4, default the first two, ``layer1`` and ``layer2``);
    SimAM rescales each chosen block's residual branch before the addition. It adds no
    parameters, so the state dict is exactly ``resnet18``'s. ``e_lambda`` is the energy
    function's regulariser (positive).
    """
    e_lambda = _validate_e_lambda(e_lambda)
    stages = _validate_stages(stages)
    model = _attention_resnet18(num_classes, in_chans)
    for stage in stages:
        for block in stage_blocks(model, stage):
            block.attention = SimAM(e_lambda)
    return model


@register_model
def resnet18_k2(num_classes: int, in_chans: int = 1) -> nn.Module:
    """ResNet18 whose 7x7 stride-2 stem convolution is three kernel-size-2 convolutions.

    ``conv1`` becomes a :class:`KernelSize2Stem` (k2 s2 in->32, k2 s1 32->32, k2 s1 32->64,
    BN+ReLU between, one-sided zero padding) that ends in its own BatchNorm, so the ResNet's
    ``bn1`` becomes ``nn.Identity``: the whole stem (convolutions and their batch norms) is
    new, and torchvision's ``conv1``/``bn1`` tensors have no place in it. Feature maps after
    the stem (``ceil(H/2)``) and after the max pool equal resnet18's; the stem's receptive
    field is 6x6 (10x10 after the max pool).
    """
    model = ResNet(BasicBlock, RESNET18_LAYERS, num_classes=num_classes)
    model.conv1 = KernelSize2Stem(in_chans)
    model.bn1 = nn.Identity()
    return model
