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
        context = ray.init(address=address, logging_level=logging.WARNING)
    else:
        # Ray starts its workers at a lower priority than its own daemons (niceness 15); on a small
        # machine the training worker then loses its cores to them often enough to train ~10 % slower.
        # Measured: 0.87x -> 0.96x of a plain loop on 2 cores (benchmarks/train_throughput.py).
        os.environ.setdefault("RAY_worker_niceness", str(int(params("ray.worker_niceness"))))
        apply_ray_env(params("ray.env"))
        context = ray.init(num_cpus=params("ray.num_cpus"), resources=dict(params("ray.resources") or {}),
                           include_dashboard=bool(params("ray.include_dashboard")), dashboard_port=_dashboard_port(),
                           logging_level=logging.WARNING)
    remember_dashboard(context, mine=not address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = data_progress_bars(params("ray.data_progress_bars"))
    ctx.print_on_execution_start = False
    return ray


def data_progress_bars(setting) -> bool:
    """params ``ray.data_progress_bars``: true | false, or auto = where resops draws its own bars (a terminal)."""
    from components.progress import enabled

    if setting == "auto":
        return enabled()
    if not isinstance(setting, bool):
        raise ValueError(f"ray.data_progress_bars must be auto, true or false, got {setting!r}")
    return setting


def apply_ray_env(env: dict | None) -> None:
    """params ``ray.env`` into this process's environment, for the local Ray it is about to start: settings
    Ray's processes read when they start (e.g. Serve's ingress: RAY_SERVE_ENABLE_HA_PROXY). The caller's
    environment wins. A cluster takes them from `ray start`'s environment instead."""
    for key, value in (env or {}).items():
        os.environ.setdefault(str(key), str(value))


def remember_dashboard(context, mine: bool = True) -> None:
    """``$RAY_DASHBOARD_ADDRESS`` from ``ray.init``'s context: Serve's REST API (``serve deploy``,
    ``components.serve.config.deploy_config``) is on the dashboard of the Ray this process uses. A Ray
    this process started (``mine``) always replaces an inherited value; a joined cluster's dashboard
    only fills it in, since the user may have named a reachable address for a remote head."""
    url = getattr(context, "dashboard_url", None)
    if url and (mine or not os.environ.get("RAY_DASHBOARD_ADDRESS")):
        os.environ["RAY_DASHBOARD_ADDRESS"] = url if "://" in url else f"http://{url}"


def _dashboard_port(default: int = 8265) -> int:
    """Ray's default dashboard port, or a free one when another Ray on this machine holds it.

    Ray Train V2's PlacementGroupCleaner asks the dashboard (the State API) whether the training
    controller is alive; another Ray's dashboard on the same port answers "unknown" and the run is
    torn down. Two pipelines on one machine must each have their own.
    """
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", default))
            return default
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"[resops] port {default} is taken (another Ray?): this Ray's dashboard listens on {port}", flush=True)
    return port
