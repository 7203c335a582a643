"""Global magnitude (unstructured) pruning with torch.nn.utils.prune; its sparse model file is
:func:`components.models.checkpoint.save_sparse`.

Masks from torch.nn.utils.prune save nothing at run time (pytorch/pytorch#36214); what they
do save is storage, once the zeros are stored sparsely. The file format here keeps, for each
tensor, either the dense array or a bit mask plus the non-zero values, in a compressed .npz
(``allow_pickle=False`` on load: no code runs when a file is read).
"""
from __future__ import annotations


import torch
from torch import nn
from torch.nn.utils import prune




def prunable_parameters(model: nn.Module, include_fc: bool = False) -> list[tuple[nn.Module, str]]:
    """Weights of every convolution (and the classifier when asked): what magnitude pruning targets."""
    params = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) or (include_fc and isinstance(module, nn.Linear)):
            params.append((module, "weight"))
    return params


def apply_global_magnitude(model: nn.Module, sparsity: float, include_fc: bool = False) -> None:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights across all target layers.

    Leaves torch's pruning re-parametrisation (``weight_orig`` * ``weight_mask``) in place so
    a fine-tune keeps the zeros; call :func:`make_permanent` afterwards.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"prune.sparsity must be in [0, 1), got {sparsity}")
    prune.global_unstructured(prunable_parameters(model, include_fc), pruning_method=prune.L1Unstructured,
                              amount=float(sparsity))


def apply_layerwise_magnitude(model: nn.Module, sparsity: float, include_fc: bool = False) -> None:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights in *each* target layer."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"prune.sparsity must be in [0, 1), got {sparsity}")
    for module, name in prunable_parameters(model, include_fc):
        prune.l1_unstructured(module, name, amount=float(sparsity))


def magnitude_step(model: nn.Module, reached: float, target: float, *, scope: str = "global",
                   include_fc: bool = False) -> None:
    """One step of iterative pruning from sparsity ``reached`` to ``target`` (of the target weights).

    torch's pruning containers apply ``amount`` to the weights still unpruned, so the step prunes
    ``(target - reached) / (1 - reached)`` of what is left.
    """
    if not 0 <= reached <= target < 1:
        raise ValueError(f"pruning step must go from a lower to a higher sparsity below 1, got {reached} -> {target}")
    amount = (target - reached) / (1 - reached)
    # torch's pruning flattens weights with .view(): channels_last weights must be made contiguous
    # first (an iterative schedule prunes again after a channels_last fine-tune).
    model.to(memory_format=torch.contiguous_format)
    if scope == "global":
        apply_global_magnitude(model, amount, include_fc=include_fc)
    elif scope == "layer":
        apply_layerwise_magnitude(model, amount, include_fc=include_fc)
    else:
        raise ValueError(f"prune.scope must be 'global' or 'layer', got {scope!r}")


def sparsity_schedule(sparsity: float, steps: int) -> list[float]:
    """Targets of iterative pruning: ``steps`` equal increments up to ``sparsity`` (one-shot when 1)."""
    if steps < 1:
        raise ValueError(f"prune.steps must be >= 1, got {steps}")
    return [sparsity * (i + 1) / steps for i in range(steps)]


def make_permanent(model: nn.Module) -> None:
    for module, name in prunable_parameters(model, include_fc=True):
        if prune.is_pruned(module) and hasattr(module, f"{name}_mask"):
            prune.remove(module, name)


def sparsity_report(model: nn.Module, include_fc: bool = False) -> dict:
    targets = prunable_parameters(model, include_fc)
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in targets)
    total = sum(getattr(m, n).numel() for m, n in targets)
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {"target_sparsity_measured": zeros / max(1, total), "target_params": total,
            "params": all_params, "nonzero_params": all_params - all_zeros,
            "overall_sparsity": all_zeros / max(1, all_params)}
