"""A real multi-node Ray cluster on loopback: `resops submit` through the Jobs API, and a training job
that survives the loss of a worker node.

The cluster is a head (no CPUs: it runs the job drivers only) and two worker nodes of 2 CPUs, each
`ray start --block` in its own process group with its own temp dir, as separate machines would
have; killing a worker's process group is a node going away. Nothing here calls `ray stop`, which
would also stop every other Ray on the machine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import free_port
from tests.test_pipeline_e2e import copy_pipeline

BIN = Path(sys.executable).parent
WORKERS = 2


def _env(**extra) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1", WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)  # never the test session's own Ray
    env.update(extra)
    return env


def _ray_start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                                 "--node-ip-address=127.0.0.1", *args],
                                stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def _alive_nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], timeout=10)]


def _wait(predicate, timeout: float, what: str, proc_logs: list[Path] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # the dashboard is still starting
            value = None
        if value:
            return value
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-2000:] for p in proc_logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster():
    """Head + two worker nodes on 127.0.0.1; yields the dashboard (Jobs API) URL and the worker processes."""
    base = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dash = free_port(), free_port()
    head_log = base / "head.log"
    procs = {"head": _ray_start(["--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=true",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                 f"--ray-client-server-port={free_port()}", f"--temp-dir={base / 'head'}"], head_log)}
    dashboard = f"http://127.0.0.1:{dash}"
    logs = [head_log]
    try:
        _wait(lambda: len(_alive_nodes(dashboard)) == 1, 120, "the head node", logs)
        for i in range(1, WORKERS + 1):  # one at a time: two nodes registering at once on one IP can collide
            log = base / f"worker{i}.log"
            logs.append(log)
            procs[f"worker{i}"] = _ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                              f"--resources={json.dumps({f'test_node_{i}': 1})}",
                                              f"--temp-dir={base / f'worker{i}'}", "--dashboard-agent-listen-port=0",
                                              "--metrics-export-port=0"], log)
            _wait(lambda: len(_alive_nodes(dashboard)) == i + 1, 120, f"worker node {i}", logs)
        yield {"dashboard": dashboard, "procs": procs, "base": base}
    finally:
        for p in procs.values():
            _kill_group(p, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(p)  # whatever ignored SIGTERM
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory, cluster):
    """A project with this repo's pipeline and tiny params whose data stages ran here (they need no
    Ray): what a user has before sending training to the cluster."""
    proj = tmp_path_factory.mktemp("clusterproj")
    copy_pipeline(proj, {"augment.offline_copies": 0, "cluster.address": cluster["dashboard"],
                         "cluster.artifacts": str(proj.parent / f"{proj.name}-artifacts")})
    out = subprocess.run([str(BIN / "resops"), "run", "ingest", "prepare", "augment", "gan", "rebalance"], cwd=proj,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (proj / "models/train/model.pt").exists()
    return proj


def _resops(proj: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "resops"), *args], cwd=proj, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _job_id(output: str) -> str:
    m = re.search(r"\[resops\] submitted (\S+):", output)
    assert m, output[-3000:]
    return m.group(1)


def test_failed_job_returns_nonzero_with_its_status(cluster, project):
    # A knob the stage rejects: the job fails on the cluster, the submitter says so and exits 1.
    res = _resops(project, "-S", "model.name=no_such_model", "submit", "train", timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    job = _job_id(out)
    assert f"job {job} FAILED" in out and "no_such_model" in out
    assert _resops(project, "status", job, timeout=60).returncode == 1


def _train_worker_nodes(dashboard: str) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         timeout=10)
    return {a.node_id for a in actors}


def test_training_survives_the_loss_of_a_worker_node(cluster, project, tmp_path):
    """`resops run train` with cluster.submit (what `dvc repro` calls) sends the stage to the cluster
    as a job; the node running the training worker is killed while epoch 2's checkpoint is written;
    the job resumes on the other node from the last registered checkpoint and finishes; its logs
    came back through the stream and its outputs through cluster.artifacts. (One cold cluster and
    one job cover submit, fetch and node loss: each extra job costs minutes on 2 cores.)"""
    from ray.util.state import list_nodes

    # Enough epochs that the kill lands mid-run: from memory (train.data_cache) an epoch of the tiny
    # data takes a couple of seconds, less than finding and killing the worker's node.
    epochs = 10
    ckpt = tmp_path / "shared-checkpoints"  # the cluster's shared storage (same disk for every node here)
    cmd = [str(BIN / "resops"), "-S", f"train.epochs={epochs}", "-S", f"train.storage_path={ckpt}",
           "-S", "cluster.submit=[train]", "run", "train"]
    log = tmp_path / "submit.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=project, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        first = _wait(lambda: sorted(ckpt.glob("*/epoch_0002")) or (proc.poll() is not None and ["exited"]), 600,
                      "epoch 2's checkpoint", [log])
        assert first != ["exited"], log.read_text()[-4000:]
        assert not list(ckpt.glob(f"*/epoch_{epochs:04d}")), "training finished before the kill: more epochs"
        nodes = _wait(lambda: _train_worker_nodes(cluster["dashboard"]), 60, "the training worker")
        assert len(nodes) == 1
        node_id = nodes.pop()
        node = next(n for n in list_nodes(address=cluster["dashboard"], detail=True) if n.node_id == node_id)
        victim = next(k for k in node.resources_total if k.startswith("test_node_"))
        _kill_group(cluster["procs"][f"worker{victim.rsplit('_', 1)[1]}"])  # the whole node, at once
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 0, out[-6000:]
    dead = [n for n in list_nodes(address=cluster["dashboard"], detail=True) if n.node_id == node_id]
    assert dead and dead[0].state == "DEAD"
    metrics = json.loads((project / "metrics/train.json").read_text())
    history = pd.read_csv(project / "plots/train_history.csv")
    assert list(history["epoch"]) == list(range(1, epochs + 1))  # every epoch once: nothing re-run from scratch
    starts = sorted(set(history["start_epoch"]))
    # Resumed from a checkpoint (epoch 1's is registered by the time epoch 2's is written; epoch 2's
    # may or may not be when the node goes), not started over.
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 1, starts
    assert metrics["epochs_run"] == epochs and metrics["resumed_from_epoch"] == starts[1]
    # The job's log lines came back through the stream; its model was fetched back from cluster.artifacts.
    job = _job_id(out)
    assert f"[train] epoch {epochs}/{epochs}" in out and f"job {job} SUCCEEDED" in out
    from components.models.checkpoint import load_model

    model, meta = load_model(project / "models/train/model.pt")
    assert meta["num_classes"] == 2
    # What a later `resops status` / `resops logs` / `resops jobs` sees for that job id.
    status = _resops(project, "status", job, "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    record = json.loads(status.stdout)
    assert record["status"] == "SUCCEEDED" and record["metadata"]["resops_stages"] == "train"
    logs = _resops(project, "logs", job, timeout=60)
    assert logs.returncode == 0 and f"[resops] train: {epochs} epochs" in logs.stdout
    assert job in _resops(project, "jobs", timeout=60).stdout
