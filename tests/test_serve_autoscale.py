"""Serve autoscaling of the resops app: the cloud tier deployed with ``autoscaling_config``
(``serve.cloud.autoscaling`` in params.yaml) grows from 1 to 2 replicas under a bounded load and goes
back to 1 when the load stops. Real Ray Serve on loopback; the load is bounded in requests and time,
and the test waits for replica counts (serve.status()) with deadlines, not fixed sleeps."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve

from components.serve.config import build_serve_config, deploy_config, load_serve_config, write_serve_config
from conftest import free_port, wait_healthy
from test_serve import _args, _png, files  # noqa: F401  (the promoted-model files fixture)

AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0.25,
               "upscale_delay_s": 0.5, "downscale_delay_s": 2.0, "metrics_interval_s": 0.5,
               "look_back_period_s": 2.0}
MAX_REQUESTS, MAX_LOAD_S, CONCURRENCY = 3000, 60.0, 8


def _running_replicas(app: str = "resops", deployment: str = "CloudClassifier") -> int:
    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _wait_replicas(count: int, timeout: float, keep_going=lambda: True) -> list[int]:
    """Replica counts seen until ``count`` RUNNING replicas (fails after ``timeout`` seconds)."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        seen.append(_running_replicas())
        if seen[-1] == count:
            return seen
        assert time.monotonic() < deadline and keep_going(), f"no {count} replicas within {timeout:g} s: {seen[-20:]}"
        time.sleep(0.25)  # polling interval of serve.status(), not a wait for a race


@pytest.fixture(scope="module")
def app(ray_address, files, tmp_path_factory):  # noqa: F811
    serve.shutdown()
    port = free_port()
    args = _args(files)
    args["cloud"] = dict(args["cloud"], autoscaling_config=dict(AUTOSCALING), max_batch_size=1)
    args["cloud"].pop("num_replicas")
    path = write_serve_config(tmp_path_factory.mktemp("cfg") / "serve_config.yaml",
                              build_serve_config(args, host="127.0.0.1", port=port))
    config = load_serve_config(path)
    cloud = next(d for d in config["applications"][0]["deployments"] if d["name"] == "CloudClassifier")
    assert cloud["autoscaling_config"] == AUTOSCALING and "num_replicas" not in cloud
    deploy_config(config, base_dir=files)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
        wait_healthy(client, "serve app")
        yield port
    serve.shutdown()


def test_cloud_tier_scales_up_under_load_and_back_down(app):
    assert _wait_replicas(1, timeout=30)[-1] == 1
    stop, sent, answers = threading.Event(), [0], []
    img = _png(3)
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{app}", timeout=30.0) as c:
            while not stop.is_set():
                with lock:
                    if sent[0] >= MAX_REQUESTS:
                        return
                    sent[0] += 1
                r = c.post("/predict", params={"mode": "cloud"}, content=img, headers={"content-type": "image/png"})
                answers.append(r.status_code)

    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(client_loop) for _ in range(CONCURRENCY)]
        try:
            up = _wait_replicas(2, timeout=MAX_LOAD_S, keep_going=lambda: sent[0] < MAX_REQUESTS)
            scaled_after = time.monotonic() - started
        finally:
            stop.set()
            for f in futures:
                f.result()
    assert answers and set(answers) == {200}, sorted(set(answers))
    down_started = time.monotonic()
    down = _wait_replicas(1, timeout=60)
    print(f"autoscaling: 1 -> 2 replicas after {scaled_after:.1f} s and {sent[0]} requests; "
          f"2 -> 1 after {time.monotonic() - down_started:.1f} s idle")
    assert up[-1] == 2 and max(down) == 2 and down[-1] == 1
