"""wandb offline really writes the metrics it is given: logged with wandb itself, read back from the
run's transaction log (tests/wandb_offline.py). The end-to-end test reads the training loop's run
the same way (tests/test_pipeline_e2e.py)."""
from __future__ import annotations

import pytest

from tests.wandb_offline import history


def test_offline_run_file_holds_every_logged_row(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="readback", dir=str(tmp_path), config={"lr": 0.1},
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    logged = [{"loss": 1.0 / (i + 1), "val_accuracy": 0.5 + 0.1 * i, "epoch": i + 1} for i in range(4)]
    for i, row in enumerate(logged):
        run.log(row, step=i)
    run.finish()
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    rows = history(files[0])
    assert [r["_step"] for r in rows] == [0, 1, 2, 3]
    for got, want in zip(rows, logged):
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (key, got)


def test_a_damaged_run_file_is_refused(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a wandb transaction log"):
        list(history(bad))
    good_header = b":W&B\xe1\xbe\x00" + b"\x00\x00\x00\x00\x05\x00\x01hello"  # checksum 0: wrong
    bad.write_bytes(good_header)
    with pytest.raises(ValueError, match="checksum"):
        list(history(bad))
