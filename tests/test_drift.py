"""Drift statistics (components/feedback/drift.py): the formulas, and a monitor that stays quiet on
in-distribution inputs and speaks on shifted ones. Wiring into the servers: tests/test_serve.py."""
from __future__ import annotations

import numpy as np
import pytest

from components.feedback.drift import DriftMonitor, build_reference, frechet, input_histograms, intensity_histogram, psi


def test_frechet_and_psi_formulas():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4))
    cov = a @ a.T + np.eye(4)
    assert frechet(np.zeros(4), cov, np.zeros(4), cov) == pytest.approx(0, abs=1e-8)
    assert frechet(np.zeros(4), np.eye(4), np.full(4, 2.0), np.eye(4)) == pytest.approx(16.0)
    assert frechet(np.zeros(1), np.eye(1), np.zeros(1), 4 * np.eye(1)) == pytest.approx(1.0)  # (1 - 2)^2
    p = np.array([0.5, 0.5])
    assert psi(p, p) == pytest.approx(0) and psi(p, np.array([0.9, 0.1])) > 0.5
    h = intensity_histogram(np.array([[0, 255], [128, 128]], np.uint8), bins=4)
    assert h.tolist() == [[0.5, 0, 0, 0.5], [0, 0, 1.0, 0]]


def _images(rng, n, shift=0.0, contrast=1.0):
    x = 128 + contrast * (30 * rng.standard_normal((n, 16, 16))) + shift
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((64, 64))
    emb = lambda n: rng.standard_normal((n, 64)) @ basis / 8  # noqa: E731 - correlated features
    ref = build_reference(intensity_histogram(_images(rng, 2000)), emb(2000), intensity_histogram(_images(rng, 300)),
                          emb(300), window=200, k=8, seed=0)
    return ref, emb, basis


def test_in_distribution_stays_below_and_shifted_inputs_go_above(reference):
    ref, emb, basis = reference
    rng = np.random.default_rng(2)
    quiet = DriftMonitor(ref, 3.0)
    for img, e in zip(_images(rng, 200), emb(200)):
        quiet.observe(img, e)
    s = quiet.score()
    assert s["inputs_seen"] == 200 and not s["drifted"] and s["score"] < 3.0, s

    brighter = DriftMonitor(ref, 3.0)  # a new scanner: brighter, lower contrast; same content
    for img in _images(rng, 200, shift=40, contrast=0.6):
        brighter.observe(img)
    s = brighter.score()
    assert s["drifted"] and s["intensity"]["score"] > 3.0 and s["embedding"] is None, s

    other = DriftMonitor(ref, 3.0)  # other content: embeddings moved, pixels alike
    shift = rng.standard_normal(64) @ basis / 8
    for img, e in zip(_images(rng, 200), emb(200) + shift):
        other.observe(img, e)
    s = other.score()
    assert s["drifted"] and s["embedding"]["score"] > 3.0 and s["intensity"]["score"] < 3.0, s


def test_a_window_that_is_not_full_declares_nothing(reference):
    ref, _, _ = reference
    m = DriftMonitor(ref, threshold=0.5)
    m.observe(np.zeros((16, 16), np.uint8))
    s = m.score()
    assert s["intensity"]["score"] > 0.5 and not s["intensity"]["full"] and s["score"] is None and not s["drifted"]


def test_input_histograms_read_the_model_input_back_in_pixels():
    from components.augment.resize import normalise

    img = np.array([[0, 255], [128, 64]], np.uint8)[..., None]
    x = normalise(img)  # what the models see
    assert input_histograms(x, bins=4).tolist() == intensity_histogram(img[None, ..., 0], bins=4).tolist()
    assert input_histograms(np.stack([x, x]), bins=4).shape == (2, 4)


def test_the_periodic_check_warns_once_when_drift_is_declared_and_says_when_it_clears(reference, caplog):
    ref, _, _ = reference
    rng = np.random.default_rng(3)
    m = DriftMonitor(ref, 3.0, check_every=50, name="edge")
    with caplog.at_level("INFO", logger="resops.drift"):
        for img in _images(rng, 200):
            m.observe(img)
        assert m.last is not None and not m.last["drifted"] and caplog.records == []
        for img in _images(rng, 400, shift=60):
            m.observe(img)
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert m.last["drifted"] and len(warnings) == 1 and "edge: input drift" in warnings[0].getMessage()
        for img in _images(rng, 200):
            m.observe(img)
        assert not m.last["drifted"] and "cleared" in caplog.records[-1].getMessage()
