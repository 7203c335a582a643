"""Structured (channel) pruning with torch-pruning's dependency graph, and a pruned-model file.

Unlike the masks of :mod:`components.prune.unstructured`, removing whole channels makes the
network smaller and faster everywhere, with no sparse kernels. torch-pruning
(``torch_pruning.pruner.BasePruner``) traces the model once and groups every layer whose
channels are coupled, so a residual stage's ``conv``/``bn``/``downsample``/``add`` (and an SE
gate's scaling, and the classifier's input) lose the same channels together.

:func:`structured_prune` asks for a *MAC* (or parameter) reduction, not a channel ratio: the
channel ratio torch-pruning takes removes roughly ``1 - (1 - r)**2`` of the MACs, and the exact
relation depends on the variant, ``global_pruning`` and ``round_to``. The function searches the
channel ratio on copies of the model (a corrected-quadratic guess, then bisection inside the
bracket; 1-3 trials usually), and the model takes over the closest copy's pruned submodules (in
place: the same object, so references to its old submodules or parameters are stale).
MACs are counted from the module shapes (convolution and linear multiply-accumulates for one
sample at ``example_input``'s size; batch norms, activations, pooling, SE scaling and SimAM are
under 1 % and not counted; torch-pruning's ``count_ops_and_params`` gives ~0.5 % more).

What is never pruned:

* the classifier's outputs (``model.fc`` is ignored as a root; its *inputs* follow layer4);
* the input image channels (no group starts at the network input);
* the squeeze width of torchvision ``SqueezeExcitation`` gates (``fc1`` outputs; 4..32
  channels, ~0.8 % of the parameters): their ``fc1`` inputs and ``fc2`` outputs follow the
  block's channels, which the gate multiplies. SimAM has no parameters and follows its block.

The model file (:func:`save_structured` / :func:`load_structured`) is a ``.pt`` with exactly
:func:`components.models.checkpoint.save_model`'s payload (``{"state_dict", "meta"}``) plus
``meta["structured"]``: the shape attributes of every Conv/BatchNorm/Linear module. Loading
builds the *unpruned* model from ``meta`` with ``create_model``, gives those modules the saved
shapes, and loads the weights strictly; ``torch.load(weights_only=True)``, no pickled classes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torchvision.ops import SqueezeExcitation

from components.models.heads import OrdinalHead
from components.models.checkpoint import unwrap

TARGETS = ("macs", "params")
IMPORTANCES = ("l1", "l2", "fpgm", "lamp", "bn_scale", "taylor", "random")
ACCEPT_RELATIVE = 0.10  # the reduction reached must be within 10 % of the one requested


class StructuredPruningError(RuntimeError):
    """A model cannot be pruned as asked (unsupported structure, unreachable target)."""


@dataclass
class StructuredReport:
    """What :func:`structured_prune` did. MACs are torch-pruning's count for ``example_input``."""

    target: str
    ratio: float  # requested reduction of the target (0.5: half the MACs removed)
    achieved: float  # reduction of the target reached
    channel_ratio: float  # torch-pruning's pruning_ratio that reached it
    importance: str
    global_pruning: bool
    iterative_steps: int
    round_to: int | None
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    channels_before: int  # sum of out_channels over all convolutions
    channels_after: int
    input_shape: list[int]
    trials: list[dict] = field(default_factory=list)  # {"channel_ratio", "reduction"} per search step
    layer_channels: dict[str, list[int]] = field(default_factory=dict)  # conv name -> [before, after]

    @property
    def macs_reduction(self) -> float:
        return 1 - self.macs_after / self.macs_before

    @property
    def params_reduction(self) -> float:
        return 1 - self.params_after / self.params_before

    def as_dict(self, layers: bool = False) -> dict:
        """Plain types only (JSON, and ``torch.load(weights_only=True)`` when put in meta)."""
        d = asdict(self)
        if not layers:
            d.pop("layer_channels")
        d["macs_reduction"] = self.macs_reduction
        d["params_reduction"] = self.params_reduction
        return d

    def summary(self) -> str:
        return (f"structured pruning ({self.importance}, {'global' if self.global_pruning else 'local'}, "
                f"{self.iterative_steps} step(s)): channel ratio {self.channel_ratio:.3f} -> "
                f"MACs {self.macs_before / 1e6:.1f}M -> {self.macs_after / 1e6:.1f}M (-{self.macs_reduction:.1%}), "
                f"params {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M "
                f"(-{self.params_reduction:.1%}); requested -{self.ratio:.0%} of {self.target}")


class _SeededRandomImportance(tp.importance.Importance):
    """torch-pruning's RandomImportance with its own generator: every trial draws the same scores."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group, **_: object) -> Tensor:
        _, idxs = group[0]
        return torch.rand(len(idxs), generator=self.generator)


def make_importance(name: str, seed: int = 0) -> tp.importance.Importance:
    """A fresh torch-pruning importance estimator; ``name`` in :data:`IMPORTANCES`.

    ``l1``/``l2``: group magnitude (norm of every coupled weight, averaged over the group);
    ``fpgm``: geometric median; ``lamp``: layer-adaptive magnitude; ``bn_scale``: BN gammas;
    ``taylor``: first-order Taylor (needs gradients: ``grad_batch``); ``random``: seeded.
    """
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "fpgm":
        return tp.importance.FPGMImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "random":
        return _SeededRandomImportance(seed)
    raise ValueError(f"unknown importance {name!r}; choose from {list(IMPORTANCES)}")


def output_positions(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Per Conv/Linear module name: output positions per sample (H*W of a conv's output map).

    Channel pruning never changes these, so MACs of any pruned version follow from module shapes.
    """
    positions: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (_ConvNd, nn.Linear)):
            def hook(mod, _inputs, output, name=name):
                per_sample = output.numel() // output.shape[0]
                channels = mod.out_channels if isinstance(mod, _ConvNd) else mod.out_features
                positions[name] = positions.get(name, 0) + per_sample // channels  # a module called twice adds up
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])  # eval: counting must not move BatchNorm statistics
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return positions


def macs_from_shapes(model: nn.Module, positions: dict[str, int]) -> int:
    """Multiply-accumulates of the convolutions and linear layers (weights only; BN, activations,
    pooling, SE scaling and SimAM are < 1 % and not counted) for one sample."""
    total = 0
    for name, module in model.named_modules():
        if name not in positions:
            continue
        if isinstance(module, _ConvNd):
            total += positions[name] * module.out_channels * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            total += positions[name] * module.out_features * module.in_features
    return total


def count_macs_params(model: nn.Module, example_input: Tensor) -> tuple[int, int]:
    """(MACs of one sample of ``example_input``'s size, parameters) of ``model``."""
    net = unwrap(model)
    return macs_from_shapes(net, output_positions(net, example_input)), sum(p.numel() for p in net.parameters())


def conv_channels(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in unwrap(model).named_modules() if isinstance(m, _ConvNd)}


def _shapes(out) -> list[tuple[int, ...]]:
    """Output shape(s) of a classifier (one tensor) or a detector (a list of head tensors)."""
    return [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else [tuple(out.shape)]


def default_ignored(model: nn.Module) -> list[nn.Module]:
    """Modules whose outputs are never pruned: the classifier (a detector's output convolutions)
    and SE squeeze convolutions."""
    model = unwrap(model)
    classifier = getattr(model, "fc", None)
    if hasattr(model, "head_layers"):  # a detector: each head's anchors x (5 + classes) outputs stay
        ignored = list(model.head_layers())
    elif isinstance(classifier, OrdinalHead):  # a leaf to torch-pruning (_OrdinalHeadPruner): outputs stay
        ignored = [classifier]
    elif not isinstance(classifier, nn.Linear):
        raise StructuredPruningError(
            f"structured pruning needs the classifier as `model.fc` (nn.Linear) so its outputs stay; "
            f"{type(model).__name__} has {type(classifier).__name__ if classifier is not None else 'no fc'}")
    else:
        ignored = [classifier]
    for module in model.modules():
        if isinstance(module, SqueezeExcitation):
            ignored.append(module.fc1)
    return ignored


def _module_names(model: nn.Module, modules: Sequence[nn.Module | str]) -> list[str]:
    by_id = {id(m): name for name, m in model.named_modules()}
    known = set(by_id.values())
    names = []
    for m in modules:
        if isinstance(m, str):
            if m not in known:
                raise ValueError(f"ignored layer {m!r} is not a module of the model")
            names.append(m)
        elif id(m) in by_id:
            names.append(by_id[id(m)])
        else:
            raise ValueError(f"ignored layer {type(m).__name__} is not a module of the model being pruned")
    return names


class _OrdinalHeadPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning sees an :class:`OrdinalHead` as one leaf layer: its inputs follow layer4 (the
    score's input features are pruned with them), its class outputs are never pruned."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise StructuredPruningError("the ordinal head's outputs are never pruned")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.score.in_features)) - set(int(i) for i in idxs))
        new = nn.Linear(len(keep), 1).to(layer.score.weight.device)
        with torch.no_grad():
            new.weight.copy_(layer.score.weight[:, keep])
            new.bias.copy_(layer.score.bias)
        layer.score, layer.in_features = new, len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_classes

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.score.in_features


def _prune_in_place(model: nn.Module, example_input: Tensor, channel_ratio: float, *, importance: str,
                    global_pruning: bool, iterative_steps: int, round_to: int | None, ignored: list[str],
                    max_pruning_ratio: float, grad_batch: tuple[Tensor, Tensor] | None,
                    loss_fn: Callable[[Tensor, Tensor], Tensor], seed: int) -> None:
    modules = dict(model.named_modules())
    pruner = tp.pruner.BasePruner(
        model, example_input, importance=make_importance(importance, seed), global_pruning=global_pruning,
        pruning_ratio=channel_ratio, max_pruning_ratio=max_pruning_ratio, iterative_steps=iterative_steps,
        round_to=round_to, ignored_layers=[modules[n] for n in ignored],
        customized_pruners={OrdinalHead: _OrdinalHeadPruner()})
    for _ in range(iterative_steps):
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
            loss_fn(model(grad_batch[0]), grad_batch[1]).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)


def _check_arguments(target: str, ratio: float, importance: str, iterative_steps: int, round_to: int | None,
                     max_channel_ratio: float, grad_batch) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose from {list(IMPORTANCES)}")
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise ValueError(f"iterative_steps must be a positive integer, got {iterative_steps!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
    if not 0 < max_channel_ratio < 1:
        raise ValueError(f"max_channel_ratio must be in (0, 1), got {max_channel_ratio!r}")
    if importance == "taylor" and grad_batch is None:
        raise ValueError("importance='taylor' needs grad_batch=(images, labels) to compute gradients")


def _search(net: nn.Module, example_input: Tensor, options: dict, remaining: Callable[[nn.Module], float], *,
            ratio: float, target: str, tolerance: float, max_trials: int,
            max_channel_ratio: float) -> tuple[nn.Module, dict, list[dict]]:
    """Prune copies of ``net`` at channel ratios searched until the reduction (1 - ``remaining``,
    the fraction of the target left) is within ``tolerance`` of ``ratio``: a corrected-quadratic
    guess, then bisection inside the bracket. Returns (the closest pruned copy, its trial, all trials);
    raises :class:`StructuredPruningError` when the closest misses by more than ``ACCEPT_RELATIVE``."""
    candidates: dict[float, nn.Module] = {}
    trials: list[dict] = []

    def trial(channel_ratio: float) -> float:
        candidate = copy.deepcopy(net)
        try:
            _prune_in_place(candidate, example_input, channel_ratio, **options)
        except Exception as exc:  # tracing or an unsupported layer: say which model
            raise StructuredPruningError(f"torch-pruning cannot prune {type(net).__name__} "
                                         f"(channel ratio {channel_ratio:.3f}): {exc}") from exc
        reduction = 1 - remaining(candidate)
        best_so_far = min((abs(t["reduction"] - ratio) for t in trials), default=math.inf)
        if abs(reduction - ratio) < best_so_far:  # keep only the closest pruned copy
            candidates.clear()
            candidates[channel_ratio] = candidate
        return reduction

    lo, hi = 0.0, max_channel_ratio
    r = 1 - math.sqrt(1 - ratio)  # MACs and parameters ~ (1 - channel ratio)^2
    for _ in range(max_trials):
        r = min(max(r, 1e-4), max_channel_ratio)
        reduction = trial(r)
        trials.append({"channel_ratio": r, "reduction": reduction})
        if abs(reduction - ratio) <= tolerance:
            break
        if reduction < ratio:
            lo = max(lo, r)
            if r >= max_channel_ratio:
                break  # cannot prune further
        else:
            hi = min(hi, r)
        # remaining ~ c * (1 - r)^2: the r that gives the requested remaining fraction
        guess = 1 - (1 - r) * math.sqrt((1 - ratio) / max(1 - reduction, 1e-9))
        r = guess if lo < guess < hi else (lo + hi) / 2
    best = min(trials, key=lambda t: abs(t["reduction"] - ratio))
    if abs(best["reduction"] - ratio) > max(tolerance, ACCEPT_RELATIVE * ratio):
        raise StructuredPruningError(
            f"no channel ratio removes {ratio:.0%} of the {target} of {type(net).__name__} within "
            f"{ACCEPT_RELATIVE:.0%}; closest: {best['reduction']:.1%} at channel ratio "
            f"{best['channel_ratio']:.3f} (trials: {trials})")
    return candidates[best["channel_ratio"]], best, trials


def structured_prune(model: nn.Module, example_input: Tensor, *, target: str, ratio: float, importance: str,
                     global_pruning: bool = False, iterative_steps: int = 1,
                     round_to: int | None = None, ignored_layers: Sequence[nn.Module | str] | None = None,
                     tolerance: float = 0.02, max_trials: int = 12, max_channel_ratio: float = 0.9,
                     grad_batch: tuple[Tensor, Tensor] | None = None,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, seed: int = 0) -> StructuredReport:
    """Remove channels from ``model`` (in place) until ``target`` falls by ``ratio``; return a report.

    In place means the ``model`` object is kept and its submodules are replaced by pruned ones:
    build the optimizer after pruning. Its train/eval mode is kept.

    ``example_input``: a tensor shaped like the model's input (``(1, in_chans, H, W)``; MACs are
    counted at its size). ``ratio`` is the fraction of MACs (``target="macs"``) or parameters
    (``"params"``) to remove. The channel ratio is searched on copies until the reduction is within
    ``tolerance`` (absolute) of ``ratio``; if the closest trial misses by more than 10 % of
    ``ratio`` (relative), :class:`StructuredPruningError` is raised and ``model`` is left as it was.
    ``global_pruning`` ranks channels across layers instead of pruning each layer by the same
    ratio; ``iterative_steps`` prunes in that many steps, re-estimating importance in between;
    ``round_to`` keeps channel counts multiples of it; ``ignored_layers`` (modules or names) add
    to the classifier and SE squeeze convolutions, which are always kept.
    ``importance="taylor"`` needs ``grad_batch=(images, labels)`` (gradients of ``loss_fn``,
    cross-entropy by default, on that batch, model in eval mode).
    """
    _check_arguments(target, ratio, importance, iterative_steps, round_to, max_channel_ratio, grad_batch)
    loss_fn = loss_fn or nn.functional.cross_entropy
    net = unwrap(model)
    ignored = sorted(set(_module_names(net, list(default_ignored(net)) + list(ignored_layers or []))))
    options = dict(importance=importance, global_pruning=global_pruning, iterative_steps=iterative_steps,
                   round_to=round_to, ignored=ignored, max_pruning_ratio=max_channel_ratio,
                   grad_batch=grad_batch, loss_fn=loss_fn, seed=seed)
    was_training = net.training
    channels_last = any(m.weight.dim() == 4 and m.weight.is_contiguous(memory_format=torch.channels_last)
                        and not m.weight.is_contiguous() for m in net.modules() if isinstance(m, nn.Conv2d))
    net.eval()  # tracing and Taylor gradients must not move the BatchNorm running statistics
    try:
        with torch.no_grad():
            out_before = net(example_input)
        positions = output_positions(net, example_input)

        def measure(m: nn.Module) -> tuple[int, int]:
            return macs_from_shapes(m, positions), sum(p.numel() for p in m.parameters())

        macs0, params0 = measure(net)
        base = macs0 if target == "macs" else params0
        channels0 = conv_channels(net)
        pruned, best, trials = _search(net, example_input, options, lambda m: measure(m)[target == "params"] / base,
                                       ratio=ratio, target=target, tolerance=tolerance, max_trials=max_trials,
                                       max_channel_ratio=max_channel_ratio)
        with torch.no_grad():
            out_after = pruned(example_input)
        if _shapes(out_after) != _shapes(out_before):
            raise StructuredPruningError(f"pruning changed the output shape {_shapes(out_before)} -> "
                                         f"{_shapes(out_after)}")
        # the model itself becomes the pruned copy: same object, pruned submodules and tensors
        net._modules, net._parameters, net._buffers = pruned._modules, pruned._parameters, pruned._buffers
        if channels_last:  # torch-pruning's slices are contiguous; keep the memory format the model had
            net.to(memory_format=torch.channels_last)
        macs1, params1 = measure(net)
    finally:
        net.train(was_training)
    channels1 = conv_channels(net)
    achieved = 1 - (macs1 if target == "macs" else params1) / base
    return StructuredReport(
        target=target, ratio=float(ratio), achieved=achieved, channel_ratio=best["channel_ratio"],
        importance=importance, global_pruning=global_pruning, iterative_steps=iterative_steps, round_to=round_to,
        macs_before=macs0, macs_after=macs1, params_before=params0, params_after=params1,
        channels_before=sum(channels0.values()), channels_after=sum(channels1.values()),
        input_shape=list(example_input.shape), trials=trials,
        layer_channels={name: [channels0[name], channels1[name]] for name in channels0})
