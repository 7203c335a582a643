"""Progress bars: drawn on a terminal (a real pseudo-terminal here), absent where output is a log.

The bars of the stages (the driver's bar of the Ray Train loop, prepare, the prune fine-tune, evaluate,
calibrate) are checked in tests/test_pipeline_e2e.py's `dvc repro`, which forces them on.
"""
from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from components import progress

ROOT = Path(__file__).resolve().parents[1]

# prepare's image loop on 40 synthetic images: the cheapest loop with a bar, no Ray needed.
PREPARE = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    from components.data.prepare import prepare_dataset
    from components.data.sources import get_source
    d = Path(tempfile.mkdtemp())
    get_source("synthetic").ingest(d / "raw", num_images=40, image_size=16, num_classes=2)
    prepare_dataset(d / "raw", d / "out", "synthetic", "multiclass", threads=1)
    print("prepared", flush=True)
""")


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("mode,tty,expected", [("auto", True, True), ("auto", False, False), ("on", False, True),
                                               ("off", True, False), ("OFF", True, False), ("1", False, True)])
def test_enabled_follows_the_terminal_unless_forced(monkeypatch, mode, tty, expected):
    monkeypatch.setenv(progress.ENV, mode)
    assert progress.enabled(_Stream(tty)) is expected


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(progress.ENV, "sometimes")
    with pytest.raises(ValueError, match="RESOPS_PROGRESS must be auto, on or off"):
        progress.enabled(_Stream(True))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def _run_in_pty(code: str, env: dict, timeout: float = 120) -> str:
    """Run ``python -c code`` with stdin, stdout and stderr on a new pseudo-terminal; return what it printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_shows_a_bar_with_rate_and_eta():
    out = _run_in_pty(PREPARE, _env())
    assert "prepared" in out
    assert "prepare: 100%|" in out, out[-2000:]
    assert "40/40" in out and "img/s" in out, out[-2000:]  # count, rate; tqdm's ETA sits in "[elapsed<remaining"
    assert "<" in out.split("prepare: 100%|", 1)[1].split("\n", 1)[0]


def test_a_log_gets_no_bar():
    proc = subprocess.run([sys.executable, "-c", PREPARE], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "prepared" in proc.stdout
    assert "prepare:" not in proc.stdout + proc.stderr and "%|" not in proc.stdout + proc.stderr


def test_off_silences_a_terminal():
    out = _run_in_pty(PREPARE, _env(RESOPS_PROGRESS="off"))
    assert "prepared" in out and "%|" not in out


def test_remote_bar_draws_what_ray_workers_post(ray_address, monkeypatch):
    """The driver-side bar of work running in Ray workers: a task posts, the driver draws to 100%."""
    import ray

    monkeypatch.setenv(progress.ENV, "on")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)

    @ray.remote(num_cpus=0)
    def work(board, upto: float) -> int:
        refs = [progress.post(board, i / 10, f"step {i}/10") for i in range(1, round(upto * 10) + 1)]
        ray.get(refs[-1])  # posted before the task returns (a worker never waits; the test must know)
        return len(refs)

    with progress.RemoteBar("work", interval_s=0.05) as board:
        assert board is not None
        assert ray.get(work.remote(board, 0.4)) == 4
        deadline = time.monotonic() + 30
        while " 40%|" not in err.getvalue():  # the driver's poll draws the posted fraction
            assert time.monotonic() < deadline, err.getvalue()[-1000:]
            time.sleep(0.05)
        assert "step 4/10" in err.getvalue()
        assert ray.get(work.remote(board, 0.3)) == 3  # a fraction never goes back
    text = err.getvalue()
    assert "work: 100%|" in text, text[-1000:]  # the block ended without an error: the work is done
    assert " 30%|" not in text


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_remote_bar_is_none_without_a_terminal(monkeypatch, mode):
    monkeypatch.setenv(progress.ENV, mode)
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    with progress.RemoteBar("work") as board:
        assert board is None  # no actor, and the workers post nothing
    assert progress.post(None, 0.5) is None
