"""EDF recordings: files written here with pyEDFlib's writer, read back through resops' readers."""
from __future__ import annotations

import numpy as np
import pytest

from components.data.eeg import EEGFormatError, read_edf_file, read_edf_folder

FS = 128


def _write_edf(path, channels: dict[str, np.ndarray], fs: int = FS) -> None:
    import pyedflib

    headers = [pyedflib.highlevel.make_signal_header(name, dimension="uV", sample_frequency=fs,
                                                     physical_min=-500.0, physical_max=500.0)
               for name in channels]
    path.parent.mkdir(parents=True, exist_ok=True)
    pyedflib.highlevel.write_edf(str(path), [np.asarray(v, np.float64) for v in channels.values()], headers)


def _sine(n: int, f: float, amp: float = 100.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * f * np.arange(n) / FS)


def test_edf_channel_round_trip_by_label_index_and_single(tmp_path):
    a, b = _sine(FS * 10, 10.0), _sine(FS * 10, 3.0, amp=50.0)
    _write_edf(tmp_path / "two.edf", {"Fp1": a, "C3 ": b})
    step = 1000.0 / 65535  # EDF stores 16-bit samples between physical_min and physical_max
    sig, fs, label = read_edf_file(tmp_path / "two.edf", "c3")  # labels match case-insensitively, trimmed
    assert (fs, label, sig.dtype, sig.shape) == (FS, "C3", np.float32, b.shape)
    assert np.abs(sig - b).max() <= step
    sig0, _, label0 = read_edf_file(tmp_path / "two.edf", 0)
    assert label0 == "Fp1" and np.abs(sig0 - a).max() <= step
    _write_edf(tmp_path / "one.edf", {"EEG": a})
    assert read_edf_file(tmp_path / "one.edf")[2] == "EEG"


def test_edf_errors_name_the_file_and_the_problem(tmp_path):
    _write_edf(tmp_path / "two.edf", {"Fp1": _sine(FS * 4, 5.0), "C3": _sine(FS * 4, 7.0)})
    with pytest.raises(EEGFormatError, match=r"two\.edf: 2 channels \['Fp1', 'C3'\]; choose one"):
        read_edf_file(tmp_path / "two.edf")
    with pytest.raises(EEGFormatError, match=r"two\.edf: no channel 'O2'"):
        read_edf_file(tmp_path / "two.edf", "O2")
    with pytest.raises(EEGFormatError, match=r"two\.edf: channel index 5 is out of range \(0\.\.1\)"):
        read_edf_file(tmp_path / "two.edf", 5)
    (tmp_path / "text.edf").write_text("0 1 2 3\nnot an edf\n")
    with pytest.raises(EEGFormatError, match=r"text\.edf: not a readable EDF/BDF file"):
        read_edf_file(tmp_path / "text.edf")
    (tmp_path / "empty.edf").write_bytes(b"")
    with pytest.raises(EEGFormatError, match=r"empty\.edf: not a readable EDF/BDF file"):
        read_edf_file(tmp_path / "empty.edf")


def test_edf_folder_segments_by_recording(tmp_path):
    root = tmp_path / "edf"
    _write_edf(root / "normal" / "rec1.edf", {"Cz": _sine(FS * 10, 10.0)})
    _write_edf(root / "normal" / "rec2.edf", {"Cz": _sine(FS * 5, 9.0)})
    _write_edf(root / "ictal" / "rec3.edf", {"Cz": _sine(FS * 8, 3.0, amp=300.0)})
    window, overlap = FS * 2, FS  # 2 s windows, 1 s overlap: 1 + (n - 256) // 128 per recording
    ds = read_edf_folder(root, channel="Cz", window=window, overlap=overlap, class_names=["normal", "ictal"])
    counts = {"rec1": 1 + (FS * 10 - window) // FS, "rec2": 1 + (FS * 5 - window) // FS,
              "rec3": 1 + (FS * 8 - window) // FS}
    assert ds.signals.shape == (sum(counts.values()), window) and ds.signals.dtype == np.float32
    assert ds.fs == FS and ds.class_names == ["normal", "ictal"]
    groups = ds.records["group"].value_counts().to_dict()
    assert groups == {"normal/rec1.edf": counts["rec1"], "normal/rec2.edf": counts["rec2"],
                      "ictal/rec3.edf": counts["rec3"]}
    assert (ds.labels[ds.records["group"] == "ictal/rec3.edf"] == 1).all()
    assert np.abs(ds.signals[ds.labels == 1]).max() > 250  # the ictal recording's amplitude


def test_edf_folder_refuses_mixed_rates_short_files_and_missing_classes(tmp_path):
    root = tmp_path / "edf"
    _write_edf(root / "a" / "r1.edf", {"Cz": _sine(FS * 4, 5.0)})
    _write_edf(root / "b" / "r2.edf", {"Cz": _sine(256 * 4, 5.0)}, fs=256)
    with pytest.raises(ValueError, match="different sampling rates"):
        read_edf_folder(root, window=FS)
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) \['c'\] not found"):
        read_edf_folder(root, window=FS, class_names=["a", "c"])
    _write_edf(root / "a" / "short.edf", {"Cz": _sine(FS, 5.0)})  # one 1-s data record
    with pytest.raises(EEGFormatError, match=r"a/short\.edf: 128 samples, shorter than one window of 256"):
        read_edf_folder(root, window=2 * FS, class_names=["a"])
