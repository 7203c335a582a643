"""wandb settings: not a stage param (changing them re-runs nothing), and WANDB_MODE in the environment wins."""
from __future__ import annotations

from pathlib import Path

import yaml

from components.train.loop import WandbSink as _WandbSink

ROOT = Path(__file__).resolve().parents[1]


def _stage_params(dvc_yaml: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: [p if isinstance(p, str) else next(iter(p)) for p in s.get("params", [])] for name, s in stages.items()}


def test_logging_settings_invalidate_no_stage():
    for pipeline in (ROOT, ROOT / "pipelines" / "detect"):
        params = yaml.safe_load((pipeline / "params.yaml").read_text())
        assert "wandb" in params and "wandb" not in params["train"], pipeline
        tracked = _stage_params(pipeline / "dvc.yaml")
        assert tracked["train"] and not [p for ps in tracked.values() for p in ps if p.split(".")[0] == "wandb"]


def test_the_environment_wins_over_params(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sink = _WandbSink({"wandb": {"mode": "offline", "dir": str(tmp_path / "wandb")}, "run_name": "t"})
    assert sink.run is None and not (tmp_path / "wandb").exists()  # nothing logged, nothing written
    sink.log({"loss": 1.0}, step=0)
    sink.finish()
