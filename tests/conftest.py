"""Shared fixtures: one real local Ray instance for the session, on loopback."""
from __future__ import annotations

import logging
import os
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest

# Tests never need a wandb account, and this loopback-only Ray needs no token.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Behind HAProxy (params.yaml ray.env) an ingress replica stays reachable for this long after it starts
# draining, so other nodes' HAProxy processes can drop it: 30 s by default, which every serve.shutdown()
# then waits. One loopback node has no other HAProxy; set before Ray starts so its workers inherit it.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
# The S3 stand-in of tests/test_storage.py (moto) stores aws-chunked uploads with their framing when
# the AWS SDK adds a trailing checksum; real S3 and MinIO do not. Set before Ray starts, so its
# workers (Ray Train writing checkpoints to s3://) inherit it.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(client, what: str, timeout: float = 60.0) -> None:
    """Poll ``GET /healthz`` of a deployed app until it answers 200: the app may run before Serve's
    proxy routes to it. Fails after ``timeout`` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not answer /healthz within {timeout:g} s"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_address():
    """Start Ray in this process (2 CPUs, the edge and cloud resources) and share its address.

    Subprocesses (``dvc repro``, ``resops ...``) join it through RAY_ADDRESS instead of each
    starting their own instance.
    """
    import ray

    from pipelines.params import load_params
    from pipelines.runtime import apply_ray_env, remember_dashboard

    # The environment params.yaml gives a local Ray (ray.env: Serve's HAProxy ingress...), as init_ray does.
    apply_ray_env(load_params(Path(__file__).resolve().parents[1] / "params.yaml")("ray.env"))
    remember_dashboard(ray.init(num_cpus=2, resources={"edge": 1, "cloud": 1}, include_dashboard=True,
                                _node_ip_address="127.0.0.1", logging_level=logging.WARNING))
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
