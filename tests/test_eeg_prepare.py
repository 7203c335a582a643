"""EEG prepare: recordings split before windowing, reassembly in training only, scalograms as the
image shards the rest of the pipeline reads."""
from __future__ import annotations

import numpy as np
import pytest

from components.data.eeg import synthetic_eeg
from components.data.eeg_prepare import prepare_eeg
from components.data.images import decode_image
from components.data.shards import read_shards

FS = 173.61
CWT = {"wavelet": "cmor1.5-1.0", "freqs": [0.5, 40.0], "num_scales": 32, "out_size": [32, 48]}


@pytest.fixture(scope="module")
def recordings():
    return synthetic_eeg(8, length=1024, fs=FS, seed=3)  # 8 recordings per class, 3 classes


def _prepare(ds, out, use_ray=False, **kw):
    return prepare_eeg(ds, out, dataset="eeg_synthetic", task="3class", window=256, overlap=128,
                       reassemble_per_class=kw.pop("reassemble", 5), parts=4, cwt=CWT, test_size=0.25, val_size=0.2,
                       seed=1, use_ray=use_ray, **kw)


def test_windows_split_by_recording_and_reassembled_only_in_train(recordings, tmp_path):
    res = _prepare(recordings, tmp_path / "prepared")
    m = res.manifest
    real = m[m.source == "real"]
    per_recording = 1 + (1024 - 256) // 128
    assert len(real) == len(recordings) * per_recording
    # Every recording's windows are on one side of the split only.
    assert (real.groupby("group")["split"].nunique() == 1).all()
    assert set(real["split"]) == {"train", "val", "test"}
    fake = m[m.source == "reassembled"]
    assert len(fake) == 5 * 3 and set(fake["split"]) == {"train"}
    assert fake["label"].value_counts().to_dict() == {0: 5, 1: 5, 2: 5}
    assert res.report["reassembled"] == {"normal": 5, "interictal": 5, "ictal": 5}
    assert res.report["recordings"]["train"] + res.report["recordings"]["val"] + res.report["recordings"]["test"] == 24
    assert (tmp_path / "prepared" / "samples.png").stat().st_size > 0


def test_shards_hold_scalogram_pngs_like_the_image_pipeline(recordings, tmp_path):
    _prepare(recordings, tmp_path / "prepared", reassemble=0)
    shards = read_shards(tmp_path / "prepared" / "shards")
    assert list(shards.columns[:5]) == ["image", "path", "label", "label_name", "split"]
    img = decode_image(shards["image"].iloc[0], in_chans=1)
    assert img.shape[:2] == (32, 48) and img.dtype == np.uint8
    assert (shards["width"] == 48).all() and (shards["height"] == 32).all()
    # Ictal windows (high-amplitude rhythmic spike-wave) differ from normal ones in their scalograms.
    means = {k: np.mean([decode_image(b, in_chans=1).astype(float).std() for b in shards.loc[shards.label == k, "image"]])
             for k in (0, 2)}
    assert means[0] != pytest.approx(means[2], rel=0.05)


def test_ray_data_and_in_process_scalograms_are_identical(recordings, tmp_path, ray_address):
    a = _prepare(recordings, tmp_path / "local", reassemble=2)
    b = _prepare(recordings, tmp_path / "ray", use_ray=True, reassemble=2)
    assert a.report["data_digest"] == b.report["data_digest"]
    assert list(a.manifest["sha256"]) == list(b.manifest["sha256"])
