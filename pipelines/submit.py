"""Pipeline stages as Ray jobs on a cluster, through the Ray Jobs API.

``resops submit train`` packs the project directory as the job's ``working_dir`` (code, params and
the DVC outputs the stage reads, nothing it does not: the other stages' outputs, .git, .venv, the
DVC cache and local checkpoints stay home), runs ``resops run train`` on the cluster, streams its
logs and returns its exit status. With ``cluster.artifacts`` set (a path the cluster and the
submitter both see, or ``s3://bucket/prefix``), the job copies what the stage wrote (its DVC outs,
metrics and plots) there and the submitter copies them back into the project, so DVC sees the same
files as after a local run: a stage listed in ``cluster.submit`` runs this way when ``dvc repro``
calls ``resops run`` for it.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components import storage

# Never uploaded: version control, environments, caches, local run state.
ALWAYS_EXCLUDE = ["/.git", "/.venv", "/venv", "__pycache__", "*.egg-info", ".pytest_cache", "/build", "/wandb",
                  "/dvc_plots", "/.dvc/cache", "/.dvc/tmp", "/.dvc/config.local", "/.dvcstore", "/benchmarks/results"]
IN_JOB_ENV = "RESOPS_IN_CLUSTER_JOB"   # set inside a job: `resops run` there never submits again
ADDRESS_ENV = "RESOPS_CLUSTER_ADDRESS"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class StageIO:
    deps: list[str] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)       # cached or not, incl. metrics and plots files
    persist: list[str] = field(default_factory=list)    # outs the stage also reads (persist: true)


def _paths(entries) -> list[tuple[str, dict]]:
    out = []
    for e in entries or []:
        if isinstance(e, str):
            out.append((e, {}))
        else:
            for path, opts in e.items():
                out.append((path, opts or {}))
    return out


def dvc_stages(root: str | os.PathLike = ".") -> dict[str, StageIO]:
    """Deps and outs of every stage of ``dvc.yaml``, in pipeline order."""
    spec = yaml.safe_load((Path(root) / "dvc.yaml").read_text())
    stages = {}
    for name, st in (spec.get("stages") or {}).items():
        io = StageIO(deps=[p for p, _ in _paths(st.get("deps"))])
        for key in ("outs", "metrics", "plots"):
            for path, opts in _paths(st.get(key)):
                io.outs.append(path)
                if opts.get("persist"):
                    io.persist.append(path)
        stages[name] = io
    return stages


def _norm(path: str) -> str:
    return path.strip("/").rstrip("/")


def upload_excludes(root: str | os.PathLike, stages: list[str], params=None, extra: list[str] | None = None) -> list[str]:
    """gitignore-style patterns of what stays home when ``stages`` run on a cluster.

    DVC outputs no submitted stage reads are left out (the stages that make them are not running;
    the submitted ones write their own), the persisted outputs a submitted stage also reads
    (the model registry) go along, and so do metrics and plots files (small, and later stages read
    them). Local Ray Train storage directories stay home: the cluster keeps its own.
    """
    spec = dvc_stages(root)
    unknown = [s for s in stages if s not in spec]
    if unknown:
        raise ValueError(f"not stages of dvc.yaml: {unknown} (stages: {list(spec)})")
    def covers(paths, path):
        return any(path == q or path.startswith(q + "/") for q in paths)

    needed, produced = set(), set()
    for name in [s for s in spec if s in stages]:  # pipeline order: what an earlier stage of the job makes stays home
        needed |= {d for d in map(_norm, spec[name].deps) if not covers(produced, d)}
        needed |= {_norm(p) for p in spec[name].persist}
        produced |= {_norm(o) for o in spec[name].outs}
    excludes = list(ALWAYS_EXCLUDE)
    for name, io in spec.items():
        for out in io.outs:
            o = _norm(out)
            if o.startswith(("metrics/", "plots/")):
                continue
            if any(o == n or n.startswith(o + "/") or o.startswith(n + "/") for n in needed):
                continue
            excludes.append("/" + o)
    if params is not None:
        for key in ("train.storage_path", "gan.storage_path"):
            loc = params(key)
            if loc and not storage.is_uri(loc) and not Path(loc).is_absolute():
                excludes.append("/" + _norm(loc))
    excludes += list(extra or [])
    return list(dict.fromkeys(excludes))


def stage_outputs(root: str | os.PathLike, stages: list[str]) -> list[str]:
    spec = dvc_stages(root)
    return list(dict.fromkeys(_norm(o) for s in stages for o in spec[s].outs))


# ----------------------------------------------------------------------------- in the job
def export_outputs(root: str | os.PathLike, stages: list[str], dest: str) -> list[str]:
    """Copy the outs of ``stages`` (those that exist) from the job's working directory to ``dest``."""
    copied = []
    for rel in stage_outputs(root, stages):
        src = Path(root) / rel
        if src.exists():
            storage.copy(src, storage.join(dest, rel))
            copied.append(rel)
    storage.write_text(storage.join(dest, "outputs.json"), json.dumps({"stages": stages, "outputs": copied}))
    return copied


# ----------------------------------------------------------------------------- submitter
def cluster_address(explicit: str | None, params) -> str | None:
    """``--address`` > $RESOPS_CLUSTER_ADDRESS > ``cluster.address`` > Ray's own (RAY_API_SERVER_ADDRESS, RAY_ADDRESS)."""
    return explicit or os.environ.get(ADDRESS_ENV) or params("cluster.address") or None


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submission_id(stages: list[str]) -> str:
    label = stages[0] if len(stages) == 1 else f"{stages[0]}-to-{stages[-1]}"
    return f"resops-{label}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def entrypoint(stages: list[str], overrides: list[str], params_file: str, export: str | None,
               workdir: str | None = None, sid: str = "job") -> str:
    """The job's shell command: ``resops run STAGES`` (``--local``: never submit again), in the
    uploaded project, or in a copy of it under ``workdir``."""
    import shlex

    cmd = ["python", "-m", "pipelines.cli", "--params", params_file]
    for o in overrides:
        cmd += ["-S", o]
    cmd += ["run", *stages, "--local"]
    if export:
        cmd += ["--export", export]
    run = " ".join(shlex.quote(c) for c in cmd)
    if not workdir:
        return run
    # A copy on the shared volume: stage outputs the driver writes are then visible to the Ray
    # tasks of later stages on other nodes. The submission id names it.
    target = shlex.quote(f'{workdir.rstrip("/")}/{sid}')
    script = f'set -e; mkdir -p {target}; cp -a . {target}/; cd {target}; echo "[resops] job directory $PWD"; {run}'
    return "bash -c " + shlex.quote(script)


def submit(stages: list[str], params, *, root: str | os.PathLike = ".", address: str | None = None,
           overrides: list[str] | None = None, params_file: str = "params.yaml", wait: bool = True,
           fetch: bool = True, out=sys.stdout) -> tuple[str, int]:
    """Submit ``stages`` as one Ray job; with ``wait``, stream its logs and fetch its outputs.

    Returns ``(submission id, exit status)``: 0 when the job succeeded (and its outputs, if any
    were exported, are back), 1 when it failed or was stopped, 0 right away without ``wait``.
    """
    root = Path(root).resolve()
    overrides = list(overrides or [])
    c = params("cluster")
    artifacts = c.get("artifacts")
    sid = submission_id(stages)
    export = storage.join(storage.resolve(artifacts) if not storage.is_uri(artifacts) else artifacts, sid) \
        if artifacts else None
    env_vars = {IN_JOB_ENV: "1", "RAY_TRAIN_V2_ENABLED": "1", "PYTHONUNBUFFERED": "1",
                "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    env_vars.update({k: str(v) for k, v in (c.get("env_vars") or {}).items()})
    runtime_env = {"working_dir": str(root), "env_vars": env_vars,
                   "excludes": upload_excludes(root, stages, params, c.get("excludes"))}
    # The DVC outputs are in .gitignore files (DVC puts them there), yet the stage needs its
    # inputs: the excludes above decide what goes, not .gitignore.
    previous = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE")
    os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    try:
        jc = client(address)
        kwargs = dict(entrypoint=entrypoint(stages, overrides, params_file, export, c.get("workdir"), sid),
                      submission_id=sid, runtime_env=runtime_env, entrypoint_num_cpus=c.get("entrypoint_num_cpus") or 0,
                      metadata={"resops_stages": ",".join(stages), "resops_artifacts": export or ""})
        deadline = time.monotonic() + float(c.get("submit_timeout_s") or 120)
        while True:
            try:
                sid = jc.submit_job(**kwargs)
                break
            except RuntimeError as exc:
                # A head that just started has no job agent yet: Ray asks to try again later.
                if "try again" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
    finally:
        if previous is None:
            os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
        else:
            os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = previous
    print(f"[resops] submitted {sid}: {' '.join(stages)} on {jc.get_address()}", file=out, flush=True)
    if not wait:
        return sid, 0
    try:
        status = follow(jc, sid, out=out)
    except KeyboardInterrupt:  # the job is the cluster's: leaving the stream does not stop it
        print(f"\n[resops] stopped following {sid}; it keeps running: `resops logs -f {sid}` to follow again, "
              f"`resops stop {sid}` to stop it", file=out, flush=True)
        return sid, 130
    if status != "SUCCEEDED":
        info = jc.get_job_info(sid)
        print(f"[resops] job {sid} {status}: {info.message or ''}", file=out, flush=True)
        return sid, 1
    if export and fetch:
        fetched = fetch_outputs(export, root)
        print(f"[resops] fetched {len(fetched)} output(s) of {sid}: {', '.join(fetched)}", file=out, flush=True)
    elif not export:
        print("[resops] cluster.artifacts is not set: the job's outputs stay on the cluster", file=out, flush=True)
    print(f"[resops] job {sid} SUCCEEDED", file=out, flush=True)
    return sid, 0


def follow(jc, sid: str, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; its final status."""
    async def _tail():
        async for lines in jc.tail_job_logs(sid):
            print(lines, end="", file=out, flush=True)

    asyncio.run(_tail())
    status = str(jc.get_job_status(sid).value)
    while status not in TERMINAL:  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        status = str(jc.get_job_status(sid).value)
    return status


def fetch_outputs(export: str, root: str | os.PathLike) -> list[str]:
    """Copy a finished job's exported outputs into the project at ``root``."""
    manifest = json.loads(storage.read_text(storage.join(export, "outputs.json")))
    for rel in manifest["outputs"]:
        storage.copy(storage.join(export, rel), Path(root) / rel)  # replaces what was there
    return manifest["outputs"]
