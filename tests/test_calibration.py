"""Unit tests of components.evaluate.calibration: temperature scaling, ECE and the cascade threshold."""
from __future__ import annotations

import json

import numpy as np
import pytest

from components.evaluate.calibration import (calibrate_cascade, choose_threshold, expected_calibration_error,
                                             fit_temperature, reliability_bins, softmax)


def sample_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's categorical distribution (inverse CDF)."""
    u = rng.random(len(probs))
    return np.minimum((np.cumsum(probs, axis=1) < u[:, None]).sum(1), probs.shape[1] - 1)


@pytest.fixture(scope="module")
def synthetic():
    """Logits z whose softmax is calibrated by construction: labels are drawn from softmax(z)."""
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(4000, 4))
    return z, sample_labels(softmax(z), rng)


# ----------------------------------------------------------------------------- softmax / temperature


def test_softmax_stable_and_normalised():
    z = np.array([[1000.0, 1000.0, 0.0], [-5.0, 0.0, 5.0]])
    p = softmax(z)
    assert p.dtype == np.float64
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-12)
    # Temperature 2 equals halving the logits; a higher temperature flattens the distribution.
    np.testing.assert_allclose(softmax(z[1:], 2.0), softmax(z[1:] / 2.0))
    assert softmax(z[1:], 2.0).max() < p[1].max()
    with pytest.raises(ValueError, match="temperature"):
        softmax(z, 0.0)


@pytest.mark.parametrize("scale, expected", [(3.0, 3.0), (0.5, 0.5), (1.0, 1.0)])
def test_fit_temperature_recovers_known_temperature(synthetic, scale, expected):
    z, y = synthetic
    t = fit_temperature(z * scale, y)
    assert t == pytest.approx(expected, rel=0.10)


def test_fit_temperature_minimises_nll(synthetic):
    z, y = synthetic
    zs = z * 3

    def nll(t):
        p = softmax(zs, t)
        return -np.mean(np.log(p[np.arange(len(y)), y]))

    t = fit_temperature(zs, y)
    assert nll(t) < nll(1.0)
    assert nll(t) <= min(nll(t * 0.95), nll(t * 1.05))


# ----------------------------------------------------------------------------- ECE / reliability


def test_ece_small_when_calibrated_and_falls_after_scaling(synthetic):
    z, y = synthetic
    assert expected_calibration_error(softmax(z), y) < 0.03
    over = z * 3
    ece_raw = expected_calibration_error(softmax(over), y)
    ece_fit = expected_calibration_error(softmax(over, fit_temperature(over, y)), y)
    assert ece_raw > 0.05
    assert ece_fit < ece_raw / 2


def test_ece_by_hand():
    # Confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct); 10 bins.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    # Bin (0.8, 0.9]: acc 0.5, conf 0.9 -> 2/3 * 0.4; bin (0.5, 0.6]: acc 1, conf 0.6 -> 1/3 * 0.4.
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)
    bins = reliability_bins(probs, labels, n_bins=10)
    assert [b["count"] for b in bins] == [1, 2]
    assert bins[0]["lower"] == pytest.approx(0.5) and bins[0]["upper"] == pytest.approx(0.6)
    assert bins[1]["accuracy"] == pytest.approx(0.5) and bins[1]["confidence"] == pytest.approx(0.9)


def test_reliability_bins_cover_all_samples(synthetic):
    z, y = synthetic
    p = softmax(z * 3)
    bins = reliability_bins(p, y, n_bins=15)
    assert sum(b["count"] for b in bins) == len(y)
    assert all(b["count"] > 0 for b in bins)
    for b in bins:
        assert b["lower"] <= b["confidence"] <= b["upper"]
        assert 0.0 <= b["accuracy"] <= 1.0
    # ECE recomputed from the bins matches the direct computation.
    ece = sum(b["count"] / len(y) * abs(b["accuracy"] - b["confidence"]) for b in bins)
    assert ece == pytest.approx(expected_calibration_error(p, y, n_bins=15))


# ----------------------------------------------------------------------------- choose_threshold

# Five samples; sorted distinct confidences 0.3 0.4 0.6 0.8 0.9, so the candidates are
# 0.0, 0.35, 0.5, 0.7, 0.85, 1.0 with escalation rates 0, .2, .4, .6, .8, 1.
CONF = np.array([0.9, 0.8, 0.6, 0.4, 0.3])
LABELS = np.array([0, 1, 2, 0, 1])
EDGE_OK = np.array([1, 1, 0, 1, 0], dtype=bool)   # edge accuracy 0.6
CLOUD_OK = np.array([1, 0, 1, 1, 1], dtype=bool)  # cloud accuracy 0.8
EDGE = np.where(EDGE_OK, LABELS, (LABELS + 1) % 3)
CLOUD = np.where(CLOUD_OK, LABELS, (LABELS + 2) % 3)
# Cascade accuracy by hand per candidate: 0.6, 0.8, 0.8, 1.0, 0.8, 0.8.


def pick(target, value, conf=CONF, edge=EDGE, cloud=CLOUD, labels=LABELS):
    return choose_threshold(conf, edge, cloud, labels, target=target, value=value)


def test_choose_threshold_accuracy_drop_by_hand():
    r = pick("accuracy_drop", 0.0)  # need >= 0.8: first reached at 0.35
    assert r["threshold"] == pytest.approx(0.35)
    assert r["escalation_rate"] == pytest.approx(0.2)
    assert r["cascade_accuracy"] == pytest.approx(0.8)
    assert r["edge_accuracy"] == pytest.approx(0.6) and r["cloud_accuracy"] == pytest.approx(0.8)
    assert r["reached"] is True and r["n"] == 5
    # A drop of 0.2 is already met by the edge alone: threshold 0.0 escalates nothing.
    r = pick("accuracy_drop", 0.2)
    assert r["threshold"] == 0.0 and r["escalation_rate"] == 0.0
    assert r["cascade_accuracy"] == pytest.approx(0.6)
    assert np.mean(CONF < r["threshold"]) == 0.0


def test_choose_threshold_accuracy_by_hand():
    r = pick("accuracy", 0.95)
    assert r["threshold"] == pytest.approx(0.7)
    assert r["escalation_rate"] == pytest.approx(0.6)
    assert r["cascade_accuracy"] == pytest.approx(1.0)
    assert r["reached"] is True


def test_choose_threshold_accuracy_unreachable():
    # Candidates 0.0 (acc .5), 0.7 (esc .5, acc .5), 1.0 (acc 0): best is a tie, broken to no escalation.
    conf, labels = np.array([0.9, 0.5]), np.array([0, 0])
    r = pick("accuracy", 0.9, conf=conf, edge=np.array([0, 1]), cloud=np.array([1, 1]), labels=labels)
    assert r["reached"] is False
    assert r["threshold"] == 0.0
    assert r["cascade_accuracy"] == pytest.approx(0.5)
    assert r["escalation_rate"] == 0.0


def test_choose_threshold_escalation_budget_by_hand():
    # Within 50 %: candidates 0, .35, .5 with accuracies .6, .8, .8 -> tie broken to .35.
    r = pick("escalation_rate", 0.5)
    assert r["threshold"] == pytest.approx(0.35)
    assert r["escalation_rate"] == pytest.approx(0.2)
    assert r["cascade_accuracy"] == pytest.approx(0.8)
    r = pick("escalation_rate", 0.6)
    assert r["threshold"] == pytest.approx(0.7) and r["cascade_accuracy"] == pytest.approx(1.0)
    r = pick("escalation_rate", 0.0)
    assert r["threshold"] == 0.0 and r["escalation_rate"] == 0.0


def brute_force(conf, edge, cloud, labels):
    """(threshold, escalation rate, cascade accuracy) per candidate, computed the slow obvious way."""
    u = np.unique(conf)
    out = []
    for t in [0.0, *((u[:-1] + u[1:]) / 2), 1.0]:
        esc = conf < t
        out.append((t, esc.mean(), np.mean(np.where(esc, cloud == labels, edge == labels))))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_choose_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 300
    labels = rng.integers(0, 5, n)
    conf = np.round(rng.uniform(0.2, 1.0, n), 2)  # rounded: many ties in confidence
    # Edge right more often when confident; cloud right 90 % of the time.
    edge = np.where(rng.random(n) < conf, labels, (labels + 1) % 5)
    cloud = np.where(rng.random(n) < 0.9, labels, (labels + 2) % 5)
    cands = brute_force(conf, edge, cloud, labels)
    cloud_acc = np.mean(cloud == labels)

    r = choose_threshold(conf, edge, cloud, labels, target="accuracy_drop", value=0.02)
    # The reported numbers are what the threshold really does.
    assert r["escalation_rate"] == pytest.approx(np.mean(conf < r["threshold"]))
    assert r["cascade_accuracy"] == pytest.approx(
        np.mean(np.where(conf < r["threshold"], cloud == labels, edge == labels)))
    assert r["reached"] is True
    assert r["cascade_accuracy"] >= cloud_acc - 0.02 - 1e-12
    lower = [c for c in cands if c[1] < r["escalation_rate"]]
    assert lower, "the test needs some candidate below the chosen escalation rate"
    assert all(acc < cloud_acc - 0.02 for _, _, acc in lower)

    r = choose_threshold(conf, edge, cloud, labels, target="escalation_rate", value=0.3)
    assert r["escalation_rate"] <= 0.3
    best = max(acc for _, esc, acc in cands if esc <= 0.3)
    assert r["cascade_accuracy"] == pytest.approx(best)


def test_choose_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="allowed targets"):
        pick("latency", 0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        choose_threshold(CONF, EDGE[:4], CLOUD, LABELS, target="accuracy", value=0.9)
    with pytest.raises(ValueError, match="empty"):
        choose_threshold(np.array([]), np.array([]), np.array([]), np.array([]), target="accuracy", value=0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pick("escalation_rate", 1.5)


# ----------------------------------------------------------------------------- calibrate_cascade


def test_calibrate_cascade_json_and_calibrated_threshold(synthetic):
    z, y = synthetic
    edge = z * 3  # over-confident edge
    cloud = z * 2 + np.eye(4)[y] * 2.0  # more accurate cloud
    out = calibrate_cascade(edge, cloud, y, target="accuracy_drop", value=0.01)
    assert json.loads(json.dumps(out)) == out
    assert set(out) == {"edge", "cloud", "threshold", "n_bins"}
    for tier in ("edge", "cloud"):
        rep = out[tier]
        assert set(rep) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "accuracy"}
        assert rep["temperature"] > 0
        assert rep["nll_after"] <= rep["nll_before"] + 1e-12
    assert out["edge"]["temperature"] == pytest.approx(3.0, rel=0.10)
    assert out["edge"]["ece_after"] < out["edge"]["ece_before"] / 2
    assert out["cloud"]["accuracy"] > out["edge"]["accuracy"]
    th = out["threshold"]
    assert th["target"] == "accuracy_drop" and th["n"] == len(y)
    # The threshold is applied to the calibrated edge confidence.
    conf = softmax(edge, out["edge"]["temperature"]).max(1)
    assert th["escalation_rate"] == pytest.approx(np.mean(conf < th["threshold"]))
    assert th["cascade_accuracy"] >= th["cloud_accuracy"] - 0.01 - 1e-12


def test_calibrate_cascade_without_scaling(synthetic):
    z, y = synthetic
    out = calibrate_cascade(z * 3, z, y, target="escalation_rate", value=0.25, temperature_scaling=False, n_bins=10)
    json.dumps(out)
    assert out["edge"]["temperature"] == 1.0 and out["cloud"]["temperature"] == 1.0
    assert out["edge"]["ece_after"] == out["edge"]["ece_before"]
    assert out["n_bins"] == 10
    assert out["threshold"]["escalation_rate"] <= 0.25
    raw_conf = softmax(z * 3).max(1)
    assert out["threshold"]["escalation_rate"] == pytest.approx(np.mean(raw_conf < out["threshold"]["threshold"]))


# ----------------------------------------------------------------------------- validation


def test_input_validation_messages():
    z = np.zeros((4, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        fit_temperature(z, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(np.zeros((0, 3)), np.array([], dtype=int))
    with pytest.raises(ValueError, match="out of range"):
        fit_temperature(z, np.array([0, 1, 2, 3]))
    bad = z.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_temperature(bad, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="shape mismatch"):
        expected_calibration_error(softmax(z), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape mismatch"):
        calibrate_cascade(z, np.zeros((5, 3)), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="allowed targets"):
        calibrate_cascade(z, z, np.array([0, 1, 2, 0]), target="cost")


def test_confidence_level_escalates_more_and_keeps_the_bound():
    """With a bootstrap confidence level the threshold only rises (more escalation), the point-estimate
    goal still holds, and the bound it reports is met where the point estimate alone would not be."""
    rng = np.random.default_rng(7)
    n = 300
    y = rng.integers(0, 4, n)
    conf = rng.uniform(0.3, 1.0, n)
    # The edge is right more often when confident; the cloud is right 75% of the time.
    edge_pred = np.where(rng.uniform(size=n) < conf, y, (y + 1) % 4)
    cloud_pred = np.where(rng.uniform(size=n) < 0.75, y, (y + 2) % 4)
    plain = choose_threshold(conf, edge_pred, cloud_pred, y, target="accuracy_drop", value=0.01)
    safe = choose_threshold(conf, edge_pred, cloud_pred, y, target="accuracy_drop", value=0.01,
                            confidence_level=0.9)
    assert plain["confidence_level"] is None and safe["confidence_level"] == 0.9
    assert safe["threshold"] > plain["threshold"] and safe["escalation_rate"] > plain["escalation_rate"]
    assert safe["cascade_accuracy"] >= safe["cloud_accuracy"] - 0.01
    safer = choose_threshold(conf, edge_pred, cloud_pred, y, target="accuracy_drop", value=0.01,
                             confidence_level=0.99)
    assert safer["threshold"] >= safe["threshold"]
    with pytest.raises(ValueError, match="confidence_level"):
        choose_threshold(conf, edge_pred, cloud_pred, y, target="accuracy", value=0.7, confidence_level=1.0)
