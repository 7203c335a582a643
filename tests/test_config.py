"""Typed params (components.config): every section validated, no library default that could disagree."""
from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, GanConfig, load_config, section
from components.config import base
from components.train.settings import LOOP_KEYS, check_loop_config, loop_config
from pipelines.cli import main
from pipelines.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path = ROOT / "params.yaml") -> dict:
    return dict(load_params(path))


def test_the_shipped_params_files_and_the_quality_preset_validate():
    config = load_config(load_params(ROOT / "params.yaml"))
    assert config.train.epochs == _tree()["train"]["epochs"] and config.gan.betas == (0.0, 0.9)
    detect = load_config(load_params(ROOT / "pipelines" / "detect" / "params.yaml"))
    assert detect.model.name == "resnet18_yolo" and detect.serve.cascade.threshold == 0.5
    preset = yaml.safe_load((ROOT / "presets" / "quality.yaml").read_text())
    quality = load_config(load_params(ROOT / "params.yaml", [f"{k}={v}" for k, v in preset.items()]))
    assert quality.train.select_by == "val_macro_f1" and quality.train.ema_decay == 0.998
    # 0 is meaningful where the library reads it so (no local shuffle), as the e2e test sets it
    assert load_config(load_params(ROOT / "params.yaml", ["train.shuffle_buffer=0"])).train.shuffle_buffer == 0


def test_missing_unknown_and_mistyped_keys_are_all_named_in_one_error():
    tree = _tree()
    del tree["train"]["lr"]
    tree["prune"]["structured"]["ratoi"] = 0.5
    tree["gan"]["epochs"] = "sixty"
    with pytest.raises(ConfigError) as err:
        load_config(tree, "my.yaml")
    text = str(err.value)
    assert text.startswith("my.yaml: 3 problem(s)")
    assert "`train.lr` is missing" in text
    assert "`prune.structured.ratoi` is not a known key" in text
    assert "`gan.epochs`" in text and "'sixty'" in text


def test_values_out_of_range_or_not_among_the_choices_fail():
    for key, value in [("train.schedule", "step"), ("train.precision", "int8"), ("serve.port", 0),
                       ("gan.image_size", 48), ("data.in_chans", 2), ("evaluate.tta", "rot")]:
        with pytest.raises(ConfigError, match=f"`{key}`"):
            load_config(load_params(ROOT / "params.yaml", [f"{key}={value}"]))


@pytest.mark.parametrize("literal, library", [
    (base.Precision, "components.train.precision:PRECISIONS"),
    (base.Schedule, "components.train.loop:SCHEDULES"),
    (base.SelectBy, "components.train.loop:SELECT_BY"),
    (base.Head, "components.models.heads:HEADS"),
    (base.Tta, "components.evaluate.tta:TTA_MODES"),
    (base.ClassWeight, "components.rebalance.samplers:CLASS_WEIGHTS"),
    (base.Mode, "components.http.schema:MODES"),
    (base.CascadeTarget, "components.evaluate.calibration:TARGETS"),
    (base.EdgeMethod, "components.prune.edge:EDGE_METHODS"),
])
def test_the_config_choices_are_the_librarys(literal, library):
    import importlib

    module, name = library.split(":")
    assert set(typing.get_args(literal)) == set(getattr(importlib.import_module(module), name))


def test_train_gan_takes_its_settings_from_the_gan_section_only():
    from components.rebalance.gan import train_gan

    signature = inspect.signature(train_gan)
    assert signature.parameters["cfg"].annotation in (GanConfig, "GanConfig")
    # no keyword could carry a value of its own next to params.yaml's gan section
    assert not set(GanConfig.model_fields) & set(signature.parameters)
    cfg = section(GanConfig, _tree()["gan"])
    assert cfg.max_failures == 2 and cfg.base_channels == 32


def test_fit_has_no_defaults_for_what_params_yaml_sets():
    from components.train import fit

    params = inspect.signature(fit).parameters
    for name in ("num_workers", "cpus_per_worker", "use_gpu", "data_cpus", "max_failures", "keep_checkpoints",
                 "online_policy", "select_by"):
        assert params[name].default is inspect.Parameter.empty, name


def test_the_loop_config_comes_from_the_sections_and_a_hand_built_one_must_be_complete():
    config = load_config(load_params(ROOT / "params.yaml", ["model.head=ordinal", "train.mix.mixup=0.2"]))
    cfg = loop_config(config.train, config.model, class_names=["a", "b", "c"], in_chans=1, seed=7,
                      class_weights=None, wandb=config.wandb.model_dump(), max_pixels=config.data.max_image_pixels)
    assert set(cfg) == set(LOOP_KEYS)
    assert cfg["data_cache"] == config.train.data_cache and cfg["model_kwargs"] == {"head": "ordinal"}
    assert cfg["mix"]["mixup"] == 0.2 and cfg["num_classes"] == 3 and cfg["seed"] == 7
    check_loop_config(cfg)
    with pytest.raises(Exception, match="lacks data_cache, schedule"):
        check_loop_config({k: v for k, v in cfg.items() if k not in ("data_cache", "schedule")})


def test_resops_refuses_a_params_file_with_a_misspelt_key_in_one_line(tmp_path, capsys):
    tree = _tree()
    tree["train"]["epoch"] = tree["train"].pop("epochs")
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(tree))
    assert main(["--params", str(bad), "run", "ingest"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`train.epochs` is missing" in err[0] and "`train.epoch` is not a known key" in err[0]


def test_the_serve_config_the_calibrate_stage_writes_sets_every_field_params_yaml_has(tmp_path):
    """AppArgs (the Serve app's typed args) has defaults for hand-written Serve configs; the generated one
    must not fall back on them for anything params.yaml's serve section sets."""
    import json

    from components.serve.args import AppArgs
    from components.serve.config import serve_args

    (tmp_path / "model.json").write_text(json.dumps({"version": "v1-test", "files": {
        "full": "models/promoted/full.pt", "edge": "models/promoted/edge.pt", "edge_int8": "models/promoted/edge.onnx"}}))
    calibration = {"threshold": {"threshold": 0.6}, "edge": {"temperature": 1.5}, "cloud": {"temperature": 1.2}}
    params = load_params(ROOT / "params.yaml", ["serve.drift.enabled=true"])
    args = AppArgs.model_validate(serve_args(params, tmp_path, calibration))
    serve = _tree()["serve"]
    top = {"threshold", "default_mode", "max_body_bytes", "max_image_pixels", "min_image_side", "max_batch_images",
           "auth_token_env", "edge", "cloud", "router", "feedback", "drift", "temperatures", "model_version"}
    assert top <= args.model_fields_set, top - args.model_fields_set
    for tier in ("edge", "cloud"):
        settings, expected = getattr(args, tier), {k for k, v in serve[tier].items() if v is not None}
        expected = {"autoscaling_config" if k == "autoscaling" else k for k in expected} - {"backend"}
        assert expected <= settings.model_fields_set, (tier, expected - settings.model_fields_set)
    assert set(serve["router"]) <= args.router.model_fields_set
    assert args.threshold == 0.6 and args.max_batch_images == serve["max_batch_images"]
