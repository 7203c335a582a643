"""Connecting to Ray: a local instance (the embedded default) or a cluster, from params."""
from __future__ import annotations

import logging
import os

from pipelines.params import Params


def init_ray(params: Params):
    """``ray.init`` for a stage: RAY_ADDRESS or ``ray.address`` joins a cluster, else start a local Ray.

    The local node gets the custom resources of ``ray.resources`` (edge, cloud) so the serving
    tiers place as they would on a cluster.
    """
    import ray
    import ray.data

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS") or params("ray.address")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=params("ray.num_cpus"), resources=dict(params("ray.resources") or {}),
                 include_dashboard=bool(params("ray.include_dashboard")), logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one readable line per epoch instead of redrawn bars
    ctx.print_on_execution_start = False
    return ray
