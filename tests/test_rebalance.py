"""Unit tests of components.rebalance: samplers on the training split and loss class weights."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from components.rebalance import CLASS_WEIGHTS, SAMPLERS, class_weights, rebalance_frame, sampling_strategy

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
    assert SAMPLERS == ("none", "random_over", "random_under")
    assert set(CLASS_WEIGHTS) == {"none", "balanced", "sqrt"}


@pytest.mark.parametrize("ratio", [0.35, 0.5, 1.0])
def test_random_over_raises_every_class_and_drops_nothing(ratio):
    frame = train_frame()
    res = rebalance_frame(frame, num_classes=3, sampler="random_over", target_ratio=ratio, seed=1)
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
    res = rebalance_frame(frame, num_classes=3, sampler="random_under", target_ratio=ratio, seed=1)
    cap = math.floor(min(COUNTS.values()) / ratio)
    for c, n in COUNTS.items():
        assert res.counts_after[c] == min(n, cap)
    # only original rows, none repeated
    assert res.frame["row_id"].is_unique
    assert set(res.frame["row_id"]) <= set(frame["row_id"])
    assert len(res.frame) == sum(min(n, cap) for n in COUNTS.values())


def test_none_is_identity():
    frame = train_frame()
    res = rebalance_frame(frame, num_classes=3, sampler="none")
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


@pytest.mark.parametrize("split", ["val", "test"])
def test_non_train_split_is_refused(split):
    frame = train_frame()
    frame.loc[frame.index[:3], "split"] = split
    with pytest.raises(ValueError, match="only the training split"):
        rebalance_frame(frame, 3, "random_over", 1.0)
    with pytest.raises(ValueError, match=split):
        rebalance_frame(frame, 3, "none")


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="rebalance.sampler"):
        rebalance_frame(train_frame(), 3, "smote")
