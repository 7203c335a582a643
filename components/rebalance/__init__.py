"""Rebalancing of the training split: samplers (random, SMOTE), GAN rows and loss class weights.

``components.rebalance.gan`` (class-conditional DCGAN trained with Ray Train) and
``components.rebalance.quality`` (offline Frechet distance / per-class accuracy check) import
torch and Ray; import them explicitly where needed.
"""
from components.rebalance.samplers import (CLASS_WEIGHTS, OVER_SAMPLERS, STRATEGIES, SYNTHETIC_SOURCES,
                                           RebalanceResult, class_weights, parse_strategy, pixel_features,
                                           rebalance_frame, sampling_strategy)

__all__ = ["CLASS_WEIGHTS", "OVER_SAMPLERS", "STRATEGIES", "SYNTHETIC_SOURCES", "RebalanceResult",
           "class_weights", "parse_strategy", "pixel_features", "rebalance_frame", "sampling_strategy"]
