"""The `resops` command line itself: -S on either side of the command, --version, one-line errors."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import free_port
from pipelines.cli import _params, main, parse_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["run", "train", "-S", "train.epochs=1"], ["-S", "train.epochs=1", "run", "train"]])
def test_set_works_before_and_after_the_command(argv):
    args = parse_args(["--params", str(ROOT / "params.yaml"), *argv])
    assert args.stages == ["train"] and args.set == ["train.epochs=1"]
    assert _params(args)("train.epochs") == 1


def test_set_on_both_sides_applies_in_order():
    args = parse_args(["--params", str(ROOT / "params.yaml"), "-S", "train.epochs=3", "run", "train",
                       "-S", "train.epochs=2", "-S", "seed=7"])
    p = _params(args)
    assert args.set == ["train.epochs=3", "train.epochs=2", "seed=7"] and p("train.epochs") == 2 and p("seed") == 7


def test_version():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"resops {version('resops')}"


def test_predict_against_a_closed_port_prints_one_line_and_exits_1(tmp_path, capsys):
    img = tmp_path / "cell.png"
    img.write_bytes(b"\x89PNG not really")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["predict", str(img), "--url", url, "--timeout", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"resops predict: error: no answer from {url}"), err
    assert "ConnectError" in err


def test_a_handled_error_is_one_line_and_exit_1(tmp_path, capsys):
    missing = tmp_path / "absent.png"
    assert main(["predict", str(missing), "--url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.png" in err and err.startswith("resops predict: error:")
