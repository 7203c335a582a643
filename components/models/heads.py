"""Prediction heads. ``softmax`` is torchvision's ``fc``; ``ordinal`` is a cumulative-link head for
ordered classes (ELPV's defect probability 0 < 1/3 < 2/3 < 1).

The ordinal head scores each image once, ``s = w.x + b``, and has ``K - 1`` ordered cut points
``c_1 < ... < c_{K-1}``: ``P(y > k) = sigmoid(s - c_k)`` (the proportional-odds model). Class
probabilities are differences of neighbouring cumulative probabilities. It returns their logarithms,
so everything downstream (softmax, cross-entropy, temperature scaling, ONNX export, the Serve
app) treats it as ordinary logits: ``softmax(log p) = p``, and cross-entropy on it is the ordinal
model's negative log-likelihood. A class cannot be predicted "between" its neighbours' ranks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

HEADS = ("softmax", "ordinal")


class OrdinalHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an ordinal head needs at least 2 classes, got {num_classes}")
        self.in_features, self.num_classes = in_features, num_classes
        self.score = nn.Linear(in_features, 1)
        # cut point k = raw[0] + sum_{1 <= j <= k} softplus(raw[j]): ordered whatever raw is; starts
        # evenly spaced one apart around 0 (softplus(0.5413) = 1)
        raw = torch.full((num_classes - 1,), 0.5413)
        raw[0] = -(num_classes - 2) / 2.0
        self.raw_cuts = nn.Parameter(raw)
        self.register_buffer("gap_mask", (torch.arange(num_classes - 1) > 0).float(), persistent=False)
        # probs = above @ diff + first: p_0 = 1 - P(y>0), p_k = P(y>k-1) - P(y>k), p_{K-1} = P(y>K-2)
        diff = torch.zeros(num_classes - 1, num_classes)
        for k in range(num_classes - 1):
            diff[k, k], diff[k, k + 1] = -1.0, 1.0
        self.register_buffer("diff", diff, persistent=False)
        self.register_buffer("first", torch.eye(num_classes)[0], persistent=False)
        # decision bias on the class log-probabilities, tuned on validation after training
        # (components.evaluate.decision); zero from training
        self.register_buffer("class_bias", torch.zeros(num_classes))

    def cut_points(self) -> Tensor:
        return self.raw_cuts[0] + torch.cumsum(F.softplus(self.raw_cuts) * self.gap_mask, 0)

    def forward(self, x: Tensor) -> Tensor:
        above = torch.sigmoid(self.score(x) - self.cut_points())  # (N, K-1): P(y > k)
        return torch.log((above @ self.diff + self.first).clamp_min(1e-6)) + self.class_bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


def replace_head(model: nn.Module, head: str) -> nn.Module:
    """Put a ``head`` head on a classifier whose prediction layer is ``model.fc``."""
    if head not in HEADS:
        raise ValueError(f"model head must be one of {HEADS}, got {head!r}")
    if head == "ordinal":
        model.fc = OrdinalHead(model.fc.in_features, model.fc.out_features)
    return model
