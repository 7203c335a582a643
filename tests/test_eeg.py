"""Unit tests of the EEG data sources (components.data.eeg) and CWT scalograms (components.data.cwt).

Pure in-process tests on synthetic signals (no Ray). Synthetic signals test the code only; they
are not EEG recordings.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import signal as sps
from scipy import stats

from components.data.cwt import cwt_frequencies, cwt_magnitude, save_example_scalograms, scalogram, scalogram_batch
from components.data.eeg import (BONN_FS, BONN_LENGTH, BONN_TASKS, EEG_CLASSES, EEGFormatError, bonn_records,
                                 read_bonn, read_eeg_npz, reassemble, reassemble_by_class, segment, segment_dataset,
                                 synthetic_bonn, synthetic_eeg, write_bonn_layout)
from components.data.images import decode_image

N_PER_SET = 2


@pytest.fixture(scope="module")
def bonn_sets():
    return synthetic_bonn(N_PER_SET, seed=3)


@pytest.fixture()
def bonn_root(tmp_path, bonn_sets):
    """A Bonn layout with the original's quirks: lower-case folder `z/`, set N files as `.TXT`."""
    root = tmp_path / "bonn"
    write_bonn_layout(root, {"z": bonn_sets["Z"], "O": bonn_sets["O"], "F": bonn_sets["F"], "S": bonn_sets["S"]})
    write_bonn_layout(root, {"N": bonn_sets["N"]}, suffix=".TXT")
    (root / "S" / "README").write_text("not a signal")  # ignored: not .txt
    return root


@pytest.fixture(scope="module")
def synth():
    return synthetic_eeg(8, seed=1)


# ------------------------------------------------------------------------------------- Bonn
def test_bonn_layout_is_written_as_expected(bonn_root):
    assert sorted(p.name for p in bonn_root.iterdir()) == ["F", "N", "O", "S", "z"]
    assert (bonn_root / "z" / "Z001.txt").exists() and (bonn_root / "N" / "N002.TXT").exists()
    lines = (bonn_root / "S" / "S001.txt").read_text().splitlines()
    assert len(lines) == BONN_LENGTH and all(int(v) == float(v) for v in lines[:50])


@pytest.mark.parametrize("task", sorted(BONN_TASKS))
def test_bonn_reader_labels_per_task(bonn_root, bonn_sets, task):
    class_names, mapping = BONN_TASKS[task]
    ds = read_bonn(bonn_root, task)
    assert ds.class_names == class_names and ds.fs == BONN_FS and ds.skipped == []
    assert ds.signals.shape == (N_PER_SET * len(mapping), BONN_LENGTH) and ds.signals.dtype == np.float32
    sets = [p.split("/")[0].upper() for p in ds.records["path"]]
    assert sorted(set(sets)) == sorted(mapping)
    assert ds.labels.tolist() == [mapping[s] for s in sets]
    assert ds.records["group"].is_unique
    # the values read are the integers written, in file order
    for s in mapping:
        rows = np.flatnonzero(np.asarray(sets) == s)
        np.testing.assert_array_equal(ds.signals[rows], np.rint(bonn_sets[s]))


def test_bonn_class_names_follow_the_set_mapping(bonn_root):
    ds = read_bonn(bonn_root, "3class")
    for s, k in [("Z", 0), ("O", 0), ("N", 1), ("F", 1), ("S", 2)]:
        labels = ds.labels[[g.startswith(s + "/") for g in ds.records["group"]]]
        assert labels.tolist() == [k] * N_PER_SET
    assert [ds.class_names[k] for k in (0, 1, 2)] == EEG_CLASSES


def test_bonn_malformed_files_name_file_and_line(bonn_root):
    bad_number = bonn_root / "S" / "S002.txt"
    lines = bad_number.read_text().splitlines()
    lines[16] = "12a"
    bad_number.write_text("\n".join(lines) + "\n")
    short = bonn_root / "F" / "F001.txt"
    short.write_text("\n".join(short.read_text().splitlines()[:4000]) + "\n")

    with pytest.raises(EEGFormatError) as info:
        read_bonn(bonn_root, "ictal_vs_interictal")
    msg = str(info.value)
    assert "S/S002.txt: line 17: not a number: '12a'" in msg
    assert "F/F001.txt" in msg and "expected 4097 samples" in msg and "found 4000" in msg
    assert "skip_malformed" in msg
    assert {e["path"]: e["line"] for e in info.value.errors} == {"F/F001.txt": 4001, "S/S002.txt": 17}

    ds = read_bonn(bonn_root, "ictal_vs_interictal", skip_malformed=True)
    assert sorted(e["path"] for e in ds.skipped) == ["F/F001.txt", "S/S002.txt"]
    assert len(ds) == 3 * N_PER_SET - 2 and "S/S002.txt" not in set(ds.records["path"])
    # sets the task does not use are not read
    assert len(read_bonn(bonn_root, "normal_vs_interictal", sets=["Z", "O", "N"])) == 3 * N_PER_SET


def test_bonn_missing_set_and_unknown_task(tmp_path, bonn_sets):
    write_bonn_layout(tmp_path, {"Z": bonn_sets["Z"], "S": bonn_sets["S"]})
    with pytest.raises(FileNotFoundError, match=r"missing \['O'\]"):
        read_bonn(tmp_path, "normal_vs_ictal")
    assert len(read_bonn(tmp_path, "normal_vs_ictal", sets=["Z", "S"])) == 2 * N_PER_SET
    with pytest.raises(ValueError, match="must be one of"):
        bonn_records(tmp_path, "seizure")


# ------------------------------------------------------------------------------------- NumPy
def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    sig, lab = rng.standard_normal((6, 500)), np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "a.npz", signals=sig, labels=lab, fs=np.float64(256.0), class_names=np.array(EEG_CLASSES))
    ds = read_eeg_npz(tmp_path / "a.npz")
    assert ds.fs == 256.0 and ds.class_names == EEG_CLASSES and ds.labels.tolist() == lab.tolist()
    np.testing.assert_allclose(ds.signals, sig.astype(np.float32))
    assert ds.records["group"].is_unique and list(ds.records.columns[:4]) == ["path", "label", "group", "stratify"]

    np.savez(tmp_path / "b.npz", signals=sig, labels=lab)
    with pytest.raises(ValueError, match="pass fs="):
        read_eeg_npz(tmp_path / "b.npz")
    ds = read_eeg_npz(tmp_path / "b.npz", fs=100.0)
    assert ds.fs == 100.0 and ds.class_names == ["class_0", "class_1", "class_2"]
    np.savez(tmp_path / "c.npz", signals=sig, labels=lab[:5], fs=1.0)
    with pytest.raises(EEGFormatError, match="'labels' must be 6 integers"):
        read_eeg_npz(tmp_path / "c.npz")
    sig[4, 7] = np.nan
    np.savez(tmp_path / "d.npz", signals=sig, labels=lab, fs=1.0)
    with pytest.raises(EEGFormatError, match=r"signals \[4\] contain NaN"):
        read_eeg_npz(tmp_path / "d.npz")


# --------------------------------------------------------------------------------- synthetic
def _by_class(ds, name):
    return ds.signals[ds.labels == ds.class_names.index(name)].astype(np.float64)


def test_synthetic_shapes_and_determinism(synth):
    assert synth.signals.shape == (24, BONN_LENGTH) and synth.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    np.testing.assert_array_equal(synthetic_eeg(2, length=600, seed=5).signals,
                                  synthetic_eeg(2, length=600, seed=5).signals)


def test_synthetic_classes_differ_as_expected(synth):
    rms = {c: np.sqrt((_by_class(synth, c) ** 2).mean(axis=1)) for c in EEG_CLASSES}
    assert 10 < np.median(rms["normal"]) < 60  # µV-like
    assert rms["ictal"].min() > 3 * rms["normal"].max()

    f, p = sps.welch(_by_class(synth, "ictal"), fs=synth.fs, nperseg=1024)
    assert np.all(np.abs(f[np.argmax(p, axis=1)] - 3.0) < 0.5)
    f, p = sps.welch(_by_class(synth, "normal"), fs=synth.fs, nperseg=1024)
    assert np.all((f[np.argmax(p, axis=1)] >= 8) & (f[np.argmax(p, axis=1)] <= 12))  # alpha

    kurt = {c: stats.kurtosis(_by_class(synth, c), axis=1) for c in EEG_CLASSES}
    assert kurt["interictal"].min() > kurt["normal"].max() + 3
    spiky = _by_class(synth, "interictal")
    assert np.all(np.abs(spiky).max(axis=1) > 4 * spiky.std(axis=1))


# ------------------------------------------------------------------------------ augmentation
def test_segment_count_and_overlap():
    x = np.arange(100)
    w = segment(x, 20, 10)
    assert w.shape == (9, 20)
    assert w[:, 0].tolist() == list(range(0, 90, 10))
    np.testing.assert_array_equal(w[:-1, 10:], w[1:, :10])
    assert segment(x, 30, 0).shape == (3, 30) and segment(x, 100, 0).shape == (1, 100)
    assert segment(np.zeros(BONN_LENGTH), 1024, 512).shape == (7, 1024)
    w[0, 0] = -1
    assert x[0] == 0  # a copy, not a view


@pytest.mark.parametrize("args, match", [
    ((101, 0), "longer than the signal"), ((20, 20), "smaller than window"), ((20, 25), "smaller than window"),
    ((20, -1), ">= 0"), ((0, 0), ">= 1"), ((20.5, 0), "integer"),
])
def test_segment_validates(args, match):
    with pytest.raises(ValueError, match=match):
        segment(np.arange(100), *args)


def test_segment_needs_1d():
    with pytest.raises(ValueError, match="1-D"):
        segment(np.zeros((2, 100)), 10, 0)


def test_segment_dataset_keeps_labels_and_sources():
    wins, lab, src = segment_dataset(np.arange(300).reshape(3, 100), np.array([0, 1, 1]), 40, 20)
    assert wins.shape == (12, 40) and lab.tolist() == [0] * 4 + [1] * 8 and src.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_reassemble_mixes_parts_at_their_positions():
    segs = segment(synthetic_eeg(1, seed=0).signals[2], 512, 256)  # one class
    out, src = reassemble(segs, 25, 4, seed=0, return_sources=True)
    assert out.shape == (25, 512) and src.shape == (25, 4)
    bounds = [0, 128, 256, 384, 512]
    for i in range(25):
        assert len(set(src[i].tolist())) == 4  # enough segments: distinct sources
        for j in range(4):
            np.testing.assert_array_equal(out[i, bounds[j]:bounds[j + 1]], segs[src[i, j], bounds[j]:bounds[j + 1]])
    np.testing.assert_array_equal(out, reassemble(segs, 25, 4, seed=0))
    two = reassemble(segs[:2], 10, 5, seed=1, return_sources=True)[1]
    assert all(len(set(r.tolist())) == 2 for r in two)  # fewer segments than parts: still mixed


def test_reassemble_by_class_never_crosses_classes():
    ds = synthetic_eeg(2, length=1200, seed=4)
    segs, labels, _ = segment_dataset(ds.signals, ds.labels, 300, 100)
    new, new_labels = reassemble_by_class(segs, labels, {0: 5, 1: 7, 2: 3}, parts=3, seed=0)
    assert np.bincount(new_labels).tolist() == [5, 7, 3]
    for x, y in zip(new, new_labels):
        for a, b in [(0, 100), (100, 200), (200, 300)]:
            match = np.flatnonzero((segs[:, a:b] == x[a:b]).all(axis=1))
            assert match.size and set(labels[match].tolist()) == {y}


@pytest.mark.parametrize("kwargs, match", [
    (dict(segments=np.zeros((1, 10)), n_new=1, parts=2), "at least 2 segments"),
    (dict(segments=np.zeros((3, 10)), n_new=1, parts=1), "parts must be >= 2"),
    (dict(segments=np.zeros((3, 10)), n_new=1, parts=11), "cannot exceed"),
    (dict(segments=np.zeros((3, 10)), n_new=-1, parts=2), "n_new"),
    (dict(segments=np.zeros(10), n_new=1, parts=2), "n_segments, window"),
])
def test_reassemble_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reassemble(**kwargs)


# ----------------------------------------------------------------------------------------- CWT
@pytest.mark.parametrize("wavelet", ["cmor1.5-1.0", "morl"])
@pytest.mark.parametrize("f0", [3.0, 10.0, 25.0])
def test_cwt_of_a_sinusoid_peaks_at_its_frequency(wavelet, f0):
    t = np.arange(BONN_LENGTH) / BONN_FS
    mag, freqs = cwt_magnitude(50 * np.sin(2 * np.pi * f0 * t), BONN_FS, wavelet=wavelet, freqs=(0.5, 40.0))
    assert mag.shape == (64, BONN_LENGTH) and freqs[0] > freqs[-1]
    peak = freqs[np.argmax(mag[:, 500:-500].mean(axis=1))]
    assert abs(peak - f0) / f0 < 0.10


def test_cwt_frequencies_are_in_hz_and_validated():
    scales, freqs = cwt_frequencies(BONN_FS, freqs=(1.0, 40.0), num_scales=32)
    assert freqs[0] == pytest.approx(40.0) and freqs[-1] == pytest.approx(1.0) and np.all(np.diff(scales) > 0)
    _, f2 = cwt_frequencies(BONN_FS, scales=scales)
    np.testing.assert_allclose(f2, freqs)
    with pytest.raises(ValueError, match="Nyquist"):
        cwt_frequencies(BONN_FS, freqs=(1.0, 100.0))
    with pytest.raises(ValueError, match="not both"):
        cwt_frequencies(BONN_FS, freqs=(1.0, 40.0), scales=scales)
    with pytest.raises(ValueError, match="not a continuous wavelet"):
        cwt_frequencies(BONN_FS, wavelet="db4")


@pytest.mark.parametrize("out_size", [(64, 64), (128, 128), (32, 96)])
def test_scalogram_shape_dtype_and_minmax(synth, out_size):
    img = scalogram(synth.signals[0], synth.fs, out_size=out_size)
    assert img.shape == out_size and img.dtype == np.uint8 and img.min() == 0 and img.max() == 255


def test_scalogram_fixed_range_and_constant_signal(synth):
    img = scalogram(synth.signals[-1], synth.fs, value_range=(0.0, 100.0))
    assert img.dtype == np.uint8 and img.max() < 255  # log1p|W| stays below 100: no stretch
    assert scalogram(np.zeros(500), 100.0, freqs=(1, 40)).max() == 0
    assert scalogram(synth.signals[0], synth.fs, out_size=None).shape == (64, BONN_LENGTH)


def test_scalogram_batch_returns_decodable_pngs(synth):
    batch = {"signal": synth.signals[[0, 8, 16]], "label": synth.labels[[0, 8, 16]],
             "path": np.asarray(["a", "b", "c"], dtype=object)}
    out = scalogram_batch(batch, fs=synth.fs, out_size=(64, 64))
    assert set(out) == {"image", "label", "path"} and out["label"].tolist() == [0, 1, 2]
    for png in out["image"]:
        assert decode_image(png, in_chans=1).shape == (64, 64, 1)

    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = synth.signals[0][:1000], synth.signals[1]
    out = scalogram_batch({"signal": ragged, "label": np.array([0, 0]), "fs": np.array([synth.fs] * 2)},
                          out_size=(32, 48), keep_signal=True)
    assert [decode_image(p).shape for p in out["image"]] == [(32, 48, 1)] * 2 and "signal" in out
    with pytest.raises(ValueError, match="needs fs="):
        scalogram_batch({"signal": synth.signals[:1], "label": synth.labels[:1]})


def test_save_example_scalograms_writes_a_png(tmp_path, synth):
    by_class = {c: _by_class(synth, c)[:2] for c in EEG_CLASSES}
    out = save_example_scalograms(by_class, synth.fs, tmp_path / "fig" / "examples.png", per_class=2,
                                  title="synthetic signals (not clinical data)")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 300
