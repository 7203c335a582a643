"""Rebalancing: imbalanced-learn samplers on the training split and class weights for the loss."""
from components.rebalance.samplers import CLASS_WEIGHTS, SAMPLERS, class_weights, rebalance_frame, sampling_strategy

__all__ = ["CLASS_WEIGHTS", "SAMPLERS", "class_weights", "rebalance_frame", "sampling_strategy"]
