"""The class-conditional GAN (trained under the real local Ray) and the offline quality check."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.config import GanConfig, section
from components.data.images import DEFAULT_MAX_PIXELS, decode_image, encode_png
from components.data.sources import synthetic_image
from components.rebalance import rebalance_frame
from components.rebalance.gan import (GENERATOR_FILE, GeneratorFileError, generate, load_generator, save_sample_grid,
                                      train_gan, weights_version)
from components.rebalance.quality import GeneratorRejected, check_quality, frechet_distance, quality_report
from pipelines.params import load_params

SIZE = 16
ROOT = Path(__file__).resolve().parents[1]
GAN = dict(in_chans=1, num_classes=2, seed=0, max_pixels=DEFAULT_MAX_PIXELS)
# params.yaml's gan section, made tiny (the library has no defaults: every setting comes from the section)
TINY = dict(image_size=SIZE, batch_size=16, z_dim=16, base_channels=8, threads_per_worker=1, max_failures=0,
            precision="fp32")


def gan_config(storage: Path, epochs: int) -> GanConfig:
    return section(GanConfig, {**load_params(ROOT / "params.yaml")("gan"), **TINY, "epochs": epochs,
                               "storage_path": str(storage)})


def cells(labels, size: int, seed: int) -> list[bytes]:
    """Synthetic EL-like cells: class 0 clean, class 1 with a dark spot (source class 2)."""
    rng = np.random.default_rng(seed)
    return [encode_png(synthetic_image(2 * int(c), size, rng)) for c in labels]


def frame_of(labels, size: int, seed: int, split: str = "train", source: str = "real") -> pd.DataFrame:
    labels = np.asarray(labels, dtype=np.int64)
    images = cells(labels, size, seed)
    return pd.DataFrame({"image": images, "path": [f"{split}/{seed}/{i}.png" for i in range(len(labels))],
                         "label": labels, "label_name": [["ok", "spot"][c] for c in labels], "split": split,
                         "sha256": [hashlib.sha256(b).hexdigest() for b in images], "width": size, "height": size,
                         "source": source, "attrs": "{}"})


@pytest.fixture(scope="module")
def gan_data():
    train = frame_of([0] * 40 + [1] * 24, SIZE, seed=1)
    others = pd.concat([frame_of([0, 1] * 4, SIZE, seed=2, split="val"),
                        frame_of([1] * 4, SIZE, seed=3, source="smote")], ignore_index=True)
    return train, pd.concat([train, others], ignore_index=True)


@pytest.fixture(scope="module")
def trained(ray_address, gan_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("gan")
    t0 = time.perf_counter()
    res = train_gan(gan_data[1], root / "out", gan_config(root / "ckpt", 2), class_names=["ok", "spot"], **GAN)
    return res, root, time.perf_counter() - t0


def test_train_gan_writes_a_versioned_generator_and_epoch_checkpoints(trained):
    res, root, seconds = trained
    assert res.generator_path == root / "out" / GENERATOR_FILE and res.generator_path.exists()
    payload = torch.load(res.generator_path, map_location="cpu", weights_only=True)
    meta = payload["meta"]
    assert {k: meta[k] for k in ("num_classes", "image_size", "in_chans", "z_dim")} == \
        {"num_classes": 2, "image_size": SIZE, "in_chans": 1, "z_dim": 16}
    assert meta["version"] == res.version == weights_version(payload["state_dict"])
    assert meta["class_names"] == ["ok", "spot"]
    # only real training rows fed the GAN: val rows and SMOTE rows were left out
    assert meta["train"]["rows"] == 64 and meta["train"]["counts"] == {"0": 40, "1": 24}
    assert meta["train"]["epochs"] == 2 and meta["train"]["lr"] == 2e-4
    assert [h["epoch"] for h in res.history] == [1, 2] and all(h["steps"] == 4 for h in res.history)
    assert all(np.isfinite([h["d_loss"], h["g_loss"]]).all() for h in res.history)
    assert sorted(p.name for p in res.run_dir.glob("epoch_*")) == ["epoch_0001", "epoch_0002"]
    assert json.loads((root / "out" / "gan.json").read_text())["meta"]["version"] == res.version
    print(f"train_gan 2 epochs under Ray: {seconds:.1f}s")


def test_raising_epochs_resumes_from_the_last_checkpoint(trained, gan_data):
    res, root, _ = trained
    more = train_gan(gan_data[1], root / "more", gan_config(root / "ckpt", 3), **GAN)
    assert more.run_dir == res.run_dir
    assert [(h["epoch"], h["start_epoch"]) for h in more.history] == [(1, 0), (2, 0), (3, 2)]
    assert more.version != res.version and more.meta["train"]["epochs"] == 3


def test_generate_rows(trained):
    res, _, _ = trained
    out = generate(res.generator_path, {0: 3, 1: 5}, seed=4)
    assert len(out) == 8 and out["label"].tolist() == [0] * 3 + [1] * 5
    assert out["label_name"].tolist() == ["ok"] * 3 + ["spot"] * 5
    assert (out["source"] == "gan").all() and (out["split"] == "train").all()
    assert (out["generator_version"] == res.version).all()
    assert all(json.loads(a)["generator_version"] == res.version for a in out["attrs"])
    for png, sha in zip(out["image"], out["sha256"]):
        assert decode_image(png).shape == (SIZE, SIZE, 1) and hashlib.sha256(png).hexdigest() == sha
    pd.testing.assert_frame_equal(out, generate(res.generator_path, {0: 3, 1: 5}, seed=4))  # seeded
    assert generate(res.generator_path, {0: 3}, seed=5)["sha256"].tolist() != out["sha256"][:3].tolist()
    big = generate(res.generator_path, {1: 2}, seed=4, size=(24, 20))
    assert decode_image(big["image"][0]).shape == (20, 24, 1) and big["width"].tolist() == [24, 24]
    with pytest.raises(ValueError, match="outside"):
        generate(res.generator_path, {2: 1}, seed=0)


def test_tampered_generator_is_refused(trained, tmp_path):
    res, _, _ = trained
    payload = torch.load(res.generator_path, map_location="cpu", weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1
    torch.save(payload, tmp_path / "g.pt")
    with pytest.raises(GeneratorFileError, match="do not match"):
        load_generator(tmp_path / "g.pt")
    with pytest.raises(GeneratorFileError, match="does not exist"):
        load_generator(tmp_path / "missing.pt")


def test_rebalance_with_the_trained_generator(trained, gan_data):
    res, _, _ = trained
    frame = gan_data[1]
    out = rebalance_frame(frame, 2, strategy="gan", target_ratio=1.0, generator=res.generator_path, seed=1)
    assert out.counts_before == {0: 40, 1: 28}  # the 4 SMOTE rows already there count as training rows
    assert out.counts_after == {0: 40, 1: 40}
    assert out.generator_version == res.version
    gan = out.frame[out.frame["source"] == "gan"]
    assert len(gan) == 12 and (gan["label"] == 1).all() and (gan["split"] == "train").all()
    pd.testing.assert_frame_equal(out.frame[out.frame["split"] == "val"].reset_index(drop=True),
                                  frame[frame["split"] == "val"].reset_index(drop=True))


def test_sample_grid_png(trained, gan_data, tmp_path):
    res, _, _ = trained
    path = save_sample_grid(res.generator_path, gan_data[1], tmp_path / "grid" / "samples.png", per_class=4, cell=32)
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
    assert w > 8 * 32 and h >= 2 * 32


def test_quality_report_on_generated_rows(trained, gan_data):
    res, _, _ = trained
    generated = generate(res.generator_path, {0: 12, 1: 12}, seed=0)
    report = quality_report(gan_data[1], generated, num_classes=2, image_size=SIZE, in_chans=1, epochs=2, width=8,
                            seed=0)
    assert report["generator_version"] == res.version
    assert report["counts"]["real"] == {"0": 40, "1": 24} and report["counts"]["generated"] == {"0": 12, "1": 12}
    assert report["fd"] is not None and report["fd"] >= 0
    assert set(report["class_accuracy"]) == {"0", "1"}
    json.dumps(report)  # ready for a metrics file


# ----------------------------------------------------------------------------- quality (no Ray)
def test_frechet_distance_basics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    fd_same, _ = frechet_distance(a, a)
    assert fd_same == pytest.approx(0.0, abs=1e-6)
    fd_shift, _ = frechet_distance(a, a + 3.0)
    assert fd_shift == pytest.approx(4 * 9.0, rel=1e-6)
    # fewer rows than dimensions: singular covariances still give a finite distance
    fd_small, _ = frechet_distance(rng.normal(size=(5, 16)), rng.normal(size=(6, 16)))
    assert np.isfinite(fd_small) and fd_small >= 0
    assert np.isnan(frechet_distance(a[:1], a)[0])


def test_quality_scores_real_better_than_noise():
    real = frame_of([0] * 60 + [1] * 40, 32, seed=10)
    other_real = frame_of([0] * 30 + [1] * 30, 32, seed=11, source="gan")
    rng = np.random.default_rng(12)
    noise = pd.DataFrame({"image": [encode_png(rng.integers(0, 256, (32, 32), dtype=np.uint8)) for _ in range(60)],
                          "label": np.array([0, 1] * 30, dtype=np.int64)})
    kw = dict(num_classes=2, image_size=32, in_chans=1, epochs=8, width=16, seed=0)
    good, bad = quality_report(real, other_real, **kw), quality_report(real, noise, **kw)
    assert good["fd"] < bad["fd"]
    assert good["fd"] < 0.5 * bad["fd"]
    assert min(good["class_accuracy"].values()) >= 0.7   # a spot looks like a spot
    assert good["real_holdout_accuracy"] >= 0.7
    assert set(good["class_evidence"].values()) == {"recognised"}, good["class_evidence"]
    # Noise: the checker recognises the real images of each class, so a class it does not find among
    # the generated ones is the generator's failure (noise cannot look like both classes at once).
    assert "not recognised" in bad["class_evidence"].values(), (bad["class_evidence"], bad["class_accuracy"])
    with pytest.raises(GeneratorRejected, match="on held-out real images"):
        check_quality(bad, min_relative_class_accuracy=0.5)  # params.yaml's default
    threshold = (good["fd"] + bad["fd"]) / 2
    assert check_quality(good, max_fd=threshold, min_class_accuracy=0.7) is good
    assert check_quality(good, max_fd_ratio=10.0, min_relative_class_accuracy=0.7) is good
    with pytest.raises(GeneratorRejected, match="Frechet distance"):
        check_quality(bad, max_fd=threshold)
    with pytest.raises(GeneratorRejected, match="real held-out baseline"):
        check_quality(bad, max_fd_ratio=10.0)


def test_a_class_the_checker_cannot_see_is_not_measurable_rather_than_a_generator_failure():
    # class 1: the checker recognises none of its real held-out images (ELPV's rare classes, seen here),
    # so 0 % on generated ones says nothing; class 2: real ones recognised, generated ones not.
    report = {"fd": 1.0, "fd_real_holdout": 1.0, "class_accuracy": {"0": 0.9, "1": 0.0, "2": 0.1},
              "real_holdout_class_accuracy": {"0": 0.95, "1": 0.0, "2": 0.8}, "generator_version": "feedc0de"}
    from components.rebalance.quality import class_evidence

    report["class_evidence"] = class_evidence(report["class_accuracy"], report["real_holdout_class_accuracy"], 3)
    assert report["class_evidence"] == {"0": "recognised", "1": "not measurable", "2": "not recognised"}
    with pytest.raises(GeneratorRejected) as err:
        check_quality(report, min_relative_class_accuracy=0.5, min_class_accuracy=0.05)
    assert "class 2" in str(err.value) and "class 1" not in str(err.value)  # only the measurable failure
    report["class_accuracy"]["2"] = 0.7
    report["class_evidence"] = class_evidence(report["class_accuracy"], report["real_holdout_class_accuracy"], 3)
    assert check_quality(report, min_relative_class_accuracy=0.5, min_class_accuracy=0.05) is report


def test_check_quality_thresholds():
    report = {"fd": 12.5, "fd_real_holdout": 3.0, "class_accuracy": {"0": 0.9, "1": 0.4, "2": None},
              "generator_version": "abcdef0123456789"}
    assert check_quality(report) is report
    assert check_quality(report, max_fd=20, min_class_accuracy={0: 0.5}) is report
    with pytest.raises(GeneratorRejected) as err:
        check_quality(report, max_fd=10, min_class_accuracy=0.5)
    msg = str(err.value)
    assert "abcdef012345 rejected" in msg and "12.50 > max_fd 10" in msg and "class 1" in msg
    assert "class 0" not in msg and "class 2" not in msg  # passing / ungenerated classes are not failures
    with pytest.raises(GeneratorRejected, match="class 2: no generated images"):
        check_quality(report, min_class_accuracy={"2": 0.5})
    with pytest.raises(GeneratorRejected, match="could not be computed"):
        check_quality({"fd": None, "class_accuracy": {}}, max_fd=1.0)
    # relative thresholds: against the real held-out baseline of the same classifier
    report["real_holdout_class_accuracy"] = {"0": 0.95, "1": 0.5, "2": 0.8}
    assert check_quality(report, max_fd_ratio=5.0, min_relative_class_accuracy=0.8) is report
    with pytest.raises(GeneratorRejected, match=r"12.50 > 4 x real held-out baseline 3.00"):
        check_quality(report, max_fd_ratio=4.0)
    with pytest.raises(GeneratorRejected, match=r"class 1: accuracy on generated images 40.0% < 0.9 x 50.0%") as err:
        check_quality(report, min_relative_class_accuracy=0.9)
    assert "class 0" not in str(err.value)
