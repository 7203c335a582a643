"""What `resops submit` uploads and runs, read from this repo's real dvc.yaml (the cluster itself:
tests/test_cluster.py)."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from pipelines.params import load_params
from pipelines.submit import dvc_stages, entrypoint, stage_outputs, upload_excludes

ROOT = Path(__file__).resolve().parents[1]


def test_train_uploads_its_inputs_and_leaves_other_outputs_home():
    params = load_params(ROOT / "params.yaml")
    ex = set(upload_excludes(ROOT, ["train"], params, extra=["/notes"]))
    for needed in ("/data/rebalanced", "/data/prepared", "/components", "/pipelines", "/params.yaml", "/dvc.yaml"):
        assert needed not in ex
    for other in ("/data/raw", "/data/augmented", "/models/prune", "/models/promoted", "/reports/evaluation",
                  "/models/train/model.pt"):  # train rewrites its own output
        assert other in ex
    # Local checkpoints, VCS, environments and caches never travel; user patterns are added.
    assert {"/.git", "/.venv", "/.dvc/cache", "/models/train/checkpoints", "/models/gan_checkpoints", "/notes"} <= ex
    assert not any(e.startswith(("/metrics", "/plots")) for e in ex)  # small, and later stages read them


def test_promote_takes_the_registry_it_appends_to():
    ex = set(upload_excludes(ROOT, ["promote"]))
    assert "/models/registry.json" not in ex and "/models/promoted" not in ex  # persist: true outs
    assert "/models/train/model.pt" not in ex and "/models/prune" not in ex   # its deps
    assert "/data/prepared" in ex


def test_whole_pipeline_uploads_no_dvc_outputs():
    spec = dvc_stages(ROOT)
    ex = set(upload_excludes(ROOT, list(spec)))
    assert "/data/raw" in ex and "/models/train/model.pt" in ex and "/models/serve" in ex
    assert "/models/registry.json" not in ex  # promote reads it back


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="not stages of dvc.yaml"):
        upload_excludes(ROOT, ["trian"])


def test_outputs_of_a_stage_include_metrics_and_plots():
    assert stage_outputs(ROOT, ["train"]) == ["models/train/model.pt", "metrics/train.json", "plots/train_history.csv"]


def test_upload_excludes_match_what_ray_packs(tmp_path):
    """The patterns mean to Ray's packer what they say: packed with Ray's own function."""
    from ray._private.runtime_env.packaging import _dir_travel

    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/x.png").write_bytes(b"x")
    (tmp_path / "data/rebalanced/shards").mkdir(parents=True)
    (tmp_path / "data/rebalanced/shards/part-00000.parquet").write_bytes(b"p")
    (tmp_path / "data/.gitignore").write_text("/raw\n/rebalanced\n")  # as DVC writes it
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    seen = []
    from ray._private.runtime_env.packaging import _get_excludes

    excl = _get_excludes(tmp_path, upload_excludes(tmp_path, ["train"]))
    _dir_travel(tmp_path, [excl], lambda p: seen.append(p.relative_to(tmp_path).as_posix()), include_gitignore=False)
    assert "data/rebalanced/shards/part-00000.parquet" in seen and "data/raw/x.png" not in seen


def test_entrypoint_is_a_shell_command_that_runs_the_stages_locally_on_the_cluster():
    cmd = entrypoint(["train"], ["train.epochs=2", "model.kwargs={a: 1}"], "params.yaml", "s3://b/jobs/x")
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "pipelines.cli"]
    assert argv[argv.index("run"):] == ["run", "train", "--local", "--export", "s3://b/jobs/x"]
    assert "model.kwargs={a: 1}" in argv
    # With a shared work directory the job copies the project there first.
    wrapped = entrypoint(["prepare", "train"], [], "params.yaml", None, workdir="/mnt/shared/jobs", sid="job-1")
    out = subprocess.run(["bash", "-n", "-c", shlex.split(wrapped)[2]], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "/mnt/shared/jobs/job-1" in wrapped and "run prepare train --local" in wrapped
