"""Augmentation: named albumentations policies and the Ray Data operator that applies them."""
from components.augment.operator import AugmentOperator
from components.augment.policies import build_policy, list_policies, register_policy

__all__ = ["AugmentOperator", "build_policy", "list_policies", "register_policy"]
