"""Unit tests of components.rebalance: samplers on the training split and loss class weights."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from components.rebalance import CLASS_WEIGHTS, STRATEGIES, class_weights, rebalance_frame, sampling_strategy

COUNTS = {0: 200, 1: 50, 2: 13}


def train_frame(counts: dict[int, int] = COUNTS, seed: int = 0) -> pd.DataFrame:
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    rng = np.random.default_rng(seed)
    rng.shuffle(labels)
    return pd.DataFrame({
        "row_id": np.arange(len(labels)),
        "image": [f"bytes-{i}".encode() for i in range(len(labels))],
        "label": labels.astype(np.int64),
        "split": "train",
        "source": "real",
    })


def test_registered_names():
    assert {"none", "random_over", "random_under"} <= set(STRATEGIES)
    assert set(CLASS_WEIGHTS) == {"none", "balanced", "sqrt"}


@pytest.mark.parametrize("ratio", [0.35, 0.5, 1.0])
def test_random_over_raises_every_class_and_drops_nothing(ratio):
    frame = train_frame()
    res = rebalance_frame(frame, num_classes=3, strategy="random_over", target_ratio=ratio, seed=1)
    goal = math.ceil(ratio * max(COUNTS.values()))
    assert res.counts_before == COUNTS
    for c, n in COUNTS.items():
        assert res.counts_after[c] == max(n, goal)
        assert (res.frame["label"] == c).sum() == max(n, goal)
    # every original row is still there, at least once; extra rows are exact copies of originals
    assert set(res.frame["row_id"]) == set(frame["row_id"])
    merged = res.frame.merge(frame, on="row_id", suffixes=("", "_orig"))
    assert len(merged) == len(res.frame)
    assert (merged["label"] == merged["label_orig"]).all() and (merged["image"] == merged["image_orig"]).all()
    assert res.frame.index.tolist() == list(range(len(res.frame)))
    assert res.class_weights is None


def test_random_over_is_seeded():
    frame = train_frame()
    a = rebalance_frame(frame, 3, "random_over", 1.0, seed=3).frame["row_id"].tolist()
    b = rebalance_frame(frame, 3, "random_over", 1.0, seed=3).frame["row_id"].tolist()
    c = rebalance_frame(frame, 3, "random_over", 1.0, seed=4).frame["row_id"].tolist()
    assert a == b
    assert a != c


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_random_under_caps_classes(ratio):
    frame = train_frame()
    res = rebalance_frame(frame, num_classes=3, strategy="random_under", target_ratio=ratio, seed=1)
    cap = math.floor(min(COUNTS.values()) / ratio)
    for c, n in COUNTS.items():
        assert res.counts_after[c] == min(n, cap)
    # only original rows, none repeated
    assert res.frame["row_id"].is_unique
    assert set(res.frame["row_id"]) <= set(frame["row_id"])
    assert len(res.frame) == sum(min(n, cap) for n in COUNTS.values())


def test_none_is_identity():
    frame = train_frame()
    res = rebalance_frame(frame, num_classes=3, strategy="none")
    pd.testing.assert_frame_equal(res.frame, frame.reset_index(drop=True))
    assert res.counts_before == res.counts_after == COUNTS


def test_sampling_strategy_targets():
    assert sampling_strategy(COUNTS, "random_over", 0.35) == {0: 200, 1: 70, 2: 70}
    assert sampling_strategy(COUNTS, "random_under", 0.5) == {0: 26, 1: 26, 2: 13}
    with pytest.raises(ValueError, match="target_ratio"):
        sampling_strategy(COUNTS, "random_over", 0.0)
    with pytest.raises(ValueError, match="target_ratio"):
        sampling_strategy(COUNTS, "random_over", 1.5)


def test_balanced_class_weights_favour_rare_classes():
    labels = train_frame()["label"].to_numpy()
    w = class_weights(labels, num_classes=3, mode="balanced")
    assert len(w) == 3
    assert w[2] > w[1] > w[0]
    # n / (k * n_c), rescaled to mean 1: proportional to 1 / n_c
    inv = np.array([1 / COUNTS[c] for c in range(3)])
    np.testing.assert_allclose(w, inv / inv.mean(), rtol=1e-12)
    sq = class_weights(labels, num_classes=3, mode="sqrt")
    assert sq[2] > sq[1] > sq[0]
    assert sq[2] / sq[0] == pytest.approx(math.sqrt(w[2] / w[0]))
    assert class_weights(labels, 3, "none") is None
    with pytest.raises(ValueError, match="class_weight"):
        class_weights(labels, 3, "inverse")


def test_class_weights_with_an_absent_class():
    w = class_weights(np.array([0, 0, 0, 2]), num_classes=4, mode="balanced")
    assert len(w) == 4
    assert w[2] > w[0]
    assert w[1] == w[3]  # absent classes keep the unscaled neutral weight
    assert np.mean([w[0], w[2]]) == pytest.approx(1.0)


def test_weights_are_computed_after_resampling():
    res = rebalance_frame(train_frame(), 3, "random_over", 1.0, class_weight="balanced")
    assert res.class_weights == pytest.approx([1.0, 1.0, 1.0])


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        rebalance_frame(train_frame(), 3, "adasyn")


# ---- strategies (smote, gan, per-class ratios)
import hashlib  # noqa: E402
import json  # noqa: E402

from components.data.images import decode_image, encode_png  # noqa: E402
from components.rebalance import STRATEGIES, parse_strategy  # noqa: E402

IMG_COUNTS = {0: 60, 1: 20, 2: 8}
LEVELS = {0: 50, 1: 130, 2: 210}  # mean brightness per class: SMOTE must stay inside a class
W, H = 20, 28                      # non-square originals: synthetic rows must come back at this size


def image_frame(counts: dict[int, int] = IMG_COUNTS, n_other: int = 6, seed: int = 0) -> pd.DataFrame:
    """A prepared-shards-like frame: train rows per ``counts`` plus val/test rows of every class, shuffled."""
    rng = np.random.default_rng(seed)
    rows = []
    plan = [(c, "train") for c, n in counts.items() for _ in range(n)]
    plan += [(c, s) for s in ("val", "test") for c in counts for _ in range(n_other // len(counts) + 1)]
    for i, (c, split) in enumerate(plan):
        img = np.clip(LEVELS[c] + rng.normal(0, 12, (H, W)) + rng.uniform(-15, 15), 0, 255).astype(np.uint8)
        png = encode_png(img)
        rows.append({"image": png, "path": f"{split}/c{c}/{i:04d}.png", "label": c, "label_name": f"class{c}",
                     "split": split, "group": f"g{i}", "sha256": hashlib.sha256(png).hexdigest(), "width": W,
                     "height": H, "source": "real", "attrs": json.dumps({"i": i})})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    frame["label"] = frame["label"].astype(np.int64)
    return frame


def other_splits(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["split"] != "train"].reset_index(drop=True)


def train_counts(frame: pd.DataFrame) -> dict[int, int]:
    t = frame[frame["split"] == "train"]
    return {int(k): int(v) for k, v in sorted(t["label"].value_counts().items())}


def test_strategy_names_and_parsing():
    assert set(STRATEGIES) == {"none", "class_weight", "random_over", "random_under", "smote", "gan"}
    assert parse_strategy("class_weight+smote+random_under") == ("random_under", "smote", "class_weight")
    assert parse_strategy(["gan", "smote"]) == ("gan", "smote")
    assert parse_strategy("none") == ("none",) and parse_strategy([]) == ("none",)
    for bad, msg in [("adasyn", "unknown"), ("smote+smote", "twice"), ("none+smote", "cannot be combined")]:
        with pytest.raises(ValueError, match=msg):
            parse_strategy(bad)
    with pytest.raises(ValueError, match="generator="):
        rebalance_frame(image_frame(), 3, strategy="gan")


@pytest.mark.parametrize("strategy,ratio", [("random_over", 0.5), ("random_under", 0.5), ("smote", 0.4),
                                            ("none", 1.0)])
def test_strategies_change_train_counts_and_keep_other_splits(strategy, ratio):
    frame = image_frame()
    res = rebalance_frame(frame, 3, strategy=strategy, target_ratio=ratio, seed=3)
    if strategy == "none":
        expected = IMG_COUNTS
    else:
        kind = "random_under" if strategy == "random_under" else "random_over"
        expected = sampling_strategy(IMG_COUNTS, kind, ratio)
    assert res.counts_before == IMG_COUNTS
    assert res.counts_after == train_counts(res.frame) == expected
    # val/test rows: the same rows, byte for byte, in the same order
    pd.testing.assert_frame_equal(other_splits(res.frame), other_splits(frame))
    assert list(res.frame.columns) == list(frame.columns)
    synthetic = res.frame[res.frame["source"] != "real"]
    assert (synthetic["split"] == "train").all()
    assert set(synthetic["source"]) <= ({"smote"} if strategy == "smote" else set())


@pytest.mark.parametrize("keys", ["index", "name"])
def test_per_class_ratios_under_then_over_hit_exact_targets(keys):
    frame = image_frame()
    ratios = {0: 0.5, 1: 0.5, 2: 0.25}  # of the majority (60): 30, 30, 15
    if keys == "name":
        ratios = {f"class{c}": r for c, r in ratios.items()}
    res = rebalance_frame(frame, 3, strategy="random_under+random_over", target_ratio=ratios, seed=1)
    assert res.counts_after == {0: 30, 1: 30, 2: 15}
    assert res.strategy == ("random_under", "random_over")
    # a class left out of the dict keeps its count; over-only never drops
    res = rebalance_frame(frame, 3, strategy="random_over", target_ratio={"2": 0.5}, seed=1)
    assert res.counts_after == {0: 60, 1: 20, 2: 30}
    res = rebalance_frame(frame, 3, strategy="random_under", target_ratio={0: 0.5}, seed=1)
    assert res.counts_after == {0: 30, 1: 20, 2: 8}
    pd.testing.assert_frame_equal(other_splits(res.frame), other_splits(frame))
    with pytest.raises(ValueError, match="unknown class"):
        rebalance_frame(frame, 3, strategy="random_over", target_ratio={"nope": 0.5})
    with pytest.raises(ValueError, match=r"target_ratio\[1\]"):
        rebalance_frame(frame, 3, strategy="random_over", target_ratio={1: 1.5})


def test_smote_rows_are_new_marked_in_class_images_at_the_original_size():
    frame = image_frame()
    res = rebalance_frame(frame, 3, strategy="smote", target_ratio=1.0, seed=5)
    assert res.counts_after == {0: 60, 1: 60, 2: 60}
    assert res.added == {"smote": {0: 0, 1: 40, 2: 52}}
    real, syn = res.frame[res.frame["source"] == "real"], res.frame[res.frame["source"] == "smote"]
    pd.testing.assert_frame_equal(real.reset_index(drop=True), frame.reset_index(drop=True))  # no real row touched
    assert len(syn) == 92 and (syn["split"] == "train").all()
    assert res.frame.index[-92:].tolist() == syn.index.tolist()  # appended after the real rows
    originals = set(frame["sha256"])
    for _, row in syn.iterrows():
        img = decode_image(row["image"])
        assert img.shape == (H, W, 1) and (row["width"], row["height"]) == (W, H)
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest() and row["sha256"] not in originals
        assert row["label_name"] == f"class{row['label']}"
        assert json.loads(row["attrs"])["sampler"] == "smote"
        # interpolated between two images of its own class: brightness stays near that class's level
        assert abs(img.mean() - LEVELS[row["label"]]) < 25
    again = rebalance_frame(frame, 3, strategy="smote", target_ratio=1.0, seed=5).frame
    pd.testing.assert_frame_equal(again, res.frame)  # seeded


def test_smote_and_random_over_share_the_deficit_after_under_sampling():
    frame = image_frame()
    res = rebalance_frame(frame, 3, strategy=["random_under", "smote", "random_over", "class_weight"],
                          target_ratio={0: 0.5, 1: 0.5, 2: 0.5}, seed=2)
    assert res.counts_after == {0: 30, 1: 30, 2: 30}
    assert res.added == {"smote": {0: 0, 1: 5, 2: 11}, "random_over": {0: 0, 1: 5, 2: 11}}
    t = res.frame[res.frame["split"] == "train"]
    assert (t["source"] == "smote").sum() == 16
    # random_over rows are exact copies of real training rows
    real = t[t["source"] == "real"]
    assert real["path"].duplicated().sum() == 16 and set(real["path"]) <= set(frame["path"])
    assert res.class_weights == pytest.approx([1.0, 1.0, 1.0])
    pd.testing.assert_frame_equal(other_splits(res.frame), other_splits(frame))


def test_smote_needs_two_rows_of_a_class():
    frame = image_frame({0: 10, 1: 1}, n_other=0)
    with pytest.raises(ValueError, match="at least 2 training rows"):
        rebalance_frame(frame, 2, strategy="smote")
    with pytest.warns(UserWarning, match="k_neighbors lowered from 5 to 2"):
        res = rebalance_frame(image_frame({0: 10, 1: 3}, n_other=0), 2, strategy="smote", smote_k_neighbors=5)
    assert res.counts_after == {0: 10, 1: 10}


def test_gan_strategy_adds_marked_versioned_rows():
    frame = image_frame()
    asked = []

    def fake_generator(counts, seed):
        asked.append((dict(counts), seed))
        rows = [{"image": encode_png(np.full((8, 8), LEVELS[c], np.uint8)), "label": c, "path": f"gan/{c}/{i}",
                 "label_name": f"class{c}", "width": 8, "height": 8, "attrs": json.dumps({"index": i}),
                 "generator_version": "v-123"} for c, n in counts.items() for i in range(n)]
        return pd.DataFrame(rows)

    res = rebalance_frame(frame, 3, strategy="gan+class_weight", target_ratio=0.5, seed=9, generator=fake_generator)
    assert asked == [({1: 10, 2: 22}, 9)]
    assert res.counts_after == {0: 60, 1: 30, 2: 30}
    gan = res.frame[res.frame["source"] == "gan"]
    assert len(gan) == 32 and (gan["split"] == "train").all()
    assert all(json.loads(a)["generator_version"] == "v-123" for a in gan["attrs"])
    assert res.generator_version == "v-123"
    assert list(res.frame.columns) == list(frame.columns)  # schema of the shards kept
    assert res.class_weights is not None and res.class_weights[0] < res.class_weights[1]
    pd.testing.assert_frame_equal(other_splits(res.frame), other_splits(frame))
    with pytest.raises(ValueError, match="returned"):
        rebalance_frame(frame, 3, strategy="gan", target_ratio=0.5, generator=lambda c, s: fake_generator({1: 1}, s))


def test_class_weight_strategy_alone_keeps_rows():
    frame = image_frame()
    res = rebalance_frame(frame, 3, strategy="class_weight")
    pd.testing.assert_frame_equal(res.frame, frame)
    assert res.class_weights[2] > res.class_weights[1] > res.class_weights[0]
    sq = rebalance_frame(frame, 3, strategy="class_weight", class_weight="sqrt").class_weights
    assert sq[2] / sq[0] == pytest.approx(math.sqrt(res.class_weights[2] / res.class_weights[0]))
