"""Knowledge distillation for the fine-tune after compression (pruning, then int8).

The uncompressed model is the teacher; the pruned model (the student) learns from the labels
and from the teacher's softened output distribution (Hinton et al. 2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * base(student, y)

``T^2`` keeps the soft term's gradients on the scale of the hard term's when ``T`` changes.
KL is summed over classes and averaged over the batch (``reduction="batchmean"``, the
mathematically correct KL). The teacher runs in eval mode under ``torch.no_grad()``: no graph
is built through it, its batch-norm statistics do not move, and no gradient reaches it.

:func:`finetune_epoch` is :func:`components.train.loop.train_one_epoch` with the batch images
handed to a :class:`DistillationLoss` (whose teacher needs them), plus the two loss terms summed;
with a plain loss (``nn.CrossEntropyLoss``) it is ``train_one_epoch`` itself.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.train.loop import train_one_epoch


class DistillationLoss:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * base_loss(student_logits, y)``.

    ``teacher``: the frozen reference model, on the student's device (it is put in eval mode on
    every call, and is not a submodule of anything here, so it never enters an optimizer or a
    state dict). ``base_loss``: the hard-label loss, ``nn.CrossEntropyLoss()`` by default (pass
    the training's class weights / label smoothing). ``alpha=0`` is the base loss alone (the
    teacher is not run); ``alpha=1`` is pure distillation.

    Call as ``loss(student_logits, y, inputs=x)`` (runs the teacher on ``x``) or
    ``loss(student_logits, y, teacher_logits=t)`` (precomputed). ``last`` holds the two terms of
    the most recent call (floats) for logging.
    """

    def __init__(self, teacher: nn.Module | None, temperature: float, alpha: float,
                 base_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if teacher is None and alpha > 0:
            raise ValueError("alpha > 0 needs a teacher model")
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.base_loss = base_loss if base_loss is not None else nn.CrossEntropyLoss()
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def teacher_logits(self, inputs: Tensor) -> Tensor:
        self.teacher.eval()
        return self.teacher(inputs).float()

    def soft_loss(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch."""
        t = self.temperature
        return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                        F.log_softmax(teacher_logits.detach().float() / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)

    def __call__(self, student_logits: Tensor, target: Tensor, inputs: Tensor | None = None,
                 teacher_logits: Tensor | None = None) -> Tensor:
        base = self.base_loss(student_logits, target)
        if self.alpha == 0:
            self.last = {"soft": 0.0, "base": float(base.detach())}
            return base
        if teacher_logits is None:
            if inputs is None:
                raise ValueError("DistillationLoss needs the batch inputs (inputs=x) or teacher_logits")
            teacher_logits = self.teacher_logits(inputs)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ: the teacher must have the same classes")
        soft = self.soft_loss(student_logits, teacher_logits)
        self.last = {"soft": float(soft.detach()), "base": float(base.detach())}
        return self.alpha * soft + (1 - self.alpha) * base


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, device: torch.device | str = "cpu",
                          max_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running mean/variance on ``batches``; return the images seen.

    After structured pruning (a convolution that lost input channels has new output statistics)
    or a short fine-tune (running averages with momentum 0.1 lag weights that move fast) the
    eval-mode statistics no longer match the activations, which costs accuracy in eval mode and
    misleads int8 calibration. This resets them and averages the per-batch statistics with equal weights
    (``momentum=None``) in train mode without gradients; weights are untouched, and each BN's
    momentum and the model's mode are restored. ``batches``: dicts with ``"image"`` or tensors.
    """
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None or max_batches == 0:
        raise ValueError("recalibrate_batchnorm: no batches to estimate the statistics on")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
        model.train()
        for step, batch in enumerate(itertools.chain([first], iterator)):
            if max_batches is not None and step >= max_batches:
                break
            x = batch["image"] if isinstance(batch, dict) else batch
            x = torch.as_tensor(x).to(device).contiguous(memory_format=torch.channels_last)
            model(x)
            seen += len(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


def finetune_epoch(model: nn.Module, batches, optimizer, loss, device: torch.device, scaler=None,
                   max_steps: int | None = None, frozen: list[nn.Parameter] | None = None,
                   precision: str = "fp32") -> dict:
    """:func:`components.train.loop.train_one_epoch` with the images passed to a distillation loss.

    ``loss``: a :class:`DistillationLoss` (called with ``inputs=x``) or any ``loss(logits, y)``.
    Returns ``train_one_epoch``'s counters (``samples``, ``loss_sum``, ``correct``, ``seconds``)
    plus, for a distillation loss, ``soft_loss_sum`` and ``base_loss_sum``.
    """
    if not isinstance(loss, DistillationLoss):
        return train_one_epoch(model, batches, optimizer, loss, device, scaler, max_steps=max_steps, frozen=frozen,
                               precision=precision)
    sums = {"soft": 0.0, "base": 0.0}

    def step_loss(logits: Tensor, y: Tensor, inputs: Tensor) -> Tensor:
        value = loss(logits, y, inputs=inputs)
        for term in sums:  # the two terms of this batch, weighted like train_one_epoch's loss_sum
            sums[term] += loss.last[term] * len(y)
        return value

    result = train_one_epoch(model, batches, optimizer, step_loss, device, scaler, max_steps=max_steps,
                             frozen=frozen, loss_takes_inputs=True, precision=precision)
    return result | {"soft_loss_sum": sums["soft"], "base_loss_sum": sums["base"]}
