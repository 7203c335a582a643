"""Unit tests of components.registry (promotion gates, registry.json) and components.evaluate.metrics."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from components.evaluate.metrics import classification_metrics, summary_from_confusion
from components.registry import current_promoted, decide, dvc_out_hash, file_sha256, load_registry, register_candidate

GATES = {"min_accuracy": None, "min_balanced_accuracy": None, "min_macro_f1": 0.3,
         "min_gain_over_majority": 0.02, "compare_metric": "macro_f1", "max_regression": 0.02}


def metrics(acc=0.8, bal=0.7, f1=0.6, majority=0.5) -> dict:
    return {"accuracy": acc, "balanced_accuracy": bal, "macro_f1": f1, "majority_rate": majority}


# ------------------------------------------------------------------------------ decide
def test_decide_passes_when_every_gate_passes():
    d = decide(metrics(), None, GATES)
    assert d.promote and d.reasons == []
    gates = {c["gate"]: c for c in d.checks}
    # null floors are not checked; max_regression has nothing to compare to
    assert set(gates) == {"min_macro_f1", "min_gain_over_majority"}
    assert all(c["passed"] for c in d.checks)
    assert gates["min_gain_over_majority"]["value"] == pytest.approx(0.3)


@pytest.mark.parametrize("gate,value,candidate", [
    ("min_accuracy", 0.9, metrics(acc=0.8)),
    ("min_balanced_accuracy", 0.75, metrics(bal=0.7)),
    ("min_macro_f1", 0.65, metrics(f1=0.6)),
    ("min_gain_over_majority", 0.05, metrics(acc=0.52, majority=0.5)),
])
def test_decide_fails_each_gate_with_a_reason(gate, value, candidate):
    d = decide(candidate, None, {gate: value})
    assert not d.promote
    assert len(d.reasons) == 1 and d.reasons[0].startswith(f"{gate}:")
    assert f"{value:.4f}" in d.reasons[0]
    assert [c["passed"] for c in d.checks] == [False]
    # the same candidate passes a bound it meets
    assert decide(candidate, None, {gate: 0.0}).promote


def test_decide_bounds_are_inclusive():
    assert decide(metrics(f1=0.3), None, {"min_macro_f1": 0.3}).promote


def test_decide_lists_every_failed_gate():
    d = decide(metrics(acc=0.5, bal=0.4, f1=0.2, majority=0.5), None,
               {"min_accuracy": 0.6, "min_balanced_accuracy": 0.5, "min_macro_f1": 0.3, "min_gain_over_majority": 0.0})
    assert not d.promote
    assert [r.split(":")[0] for r in d.reasons] == ["min_accuracy", "min_balanced_accuracy", "min_macro_f1"]
    assert [c["passed"] for c in d.checks] == [False, False, False, True]


def test_max_regression_compares_to_the_promoted_model():
    current = {"version": "v1-abc", "metrics": metrics(f1=0.70)}
    ok = decide(metrics(f1=0.685), current, {"max_regression": 0.02})
    assert ok.promote and ok.checks[0]["gate"] == "max_regression(macro_f1)"
    assert ok.checks[0]["bound"] == pytest.approx(0.68)
    bad = decide(metrics(f1=0.67), current, {"max_regression": 0.02})
    assert not bad.promote and bad.reasons[0].startswith("max_regression(macro_f1): 0.6700 is not >= 0.6800")
    # another compare_metric
    acc = decide(metrics(acc=0.7), {"metrics": metrics(acc=0.9)}, {"max_regression": 0.1, "compare_metric": "accuracy"})
    assert not acc.promote and "max_regression(accuracy)" in acc.reasons[0]
    # no regression gate: the current model does not matter
    assert decide(metrics(f1=0.1), current, {}).promote


# ------------------------------------------------------------------------ registration
@pytest.fixture
def model_files(tmp_path):
    def make(tag: str) -> dict:
        d = tmp_path / "candidates" / tag
        d.mkdir(parents=True)
        full, edge = d / "model.pt", d / "edge.npz"
        full.write_bytes(f"full weights {tag}".encode())
        edge.write_bytes(f"edge weights {tag}".encode())
        return {"full": full, "edge": edge}
    return make


def test_register_candidate_promotes_and_rejects(tmp_path, model_files):
    reg, promoted = tmp_path / "models" / "registry.json", tmp_path / "models" / "promoted"
    lineage = {"git_rev": "abc123", "data_version": "md5-1", "params": {"train": {"epochs": 3}}}

    # 1. first candidate passes: promoted, files copied to stable names
    f1 = model_files("one")
    e1 = register_candidate(reg, promoted, f1, metrics(f1=0.6), GATES, lineage)
    assert e1["status"] == "promoted" and e1["reasons"] == [] and e1["previous"] is None
    assert e1["version"] == f"v1-{hashlib.sha256(b'full weights one').hexdigest()[:8]}"
    assert e1["files_sha256"] == {"full": file_sha256(f1["full"]), "edge": file_sha256(f1["edge"])}
    assert e1["git_rev"] == "abc123" and e1["params"] == {"train": {"epochs": 3}}
    assert (promoted / "full.pt").read_bytes() == b"full weights one"
    assert (promoted / "edge.npz").read_bytes() == b"edge weights one"
    card = json.loads((promoted / "model.json").read_text())
    assert card["version"] == e1["version"] and card["metrics"]["macro_f1"] == 0.6
    registry = json.loads(reg.read_text())
    assert registry["promoted"] == e1["version"] and len(registry["entries"]) == 1

    # 2. a regression beyond max_regression: rejected, the promoted files stay those of v1
    f2 = model_files("two")
    e2 = register_candidate(reg, promoted, f2, metrics(f1=0.55), GATES, lineage)
    assert e2["status"] == "rejected" and e2["previous"] == e1["version"]
    assert e2["version"].startswith("v2-")
    assert any(r.startswith("max_regression(macro_f1)") for r in e2["reasons"])
    assert "files" not in e2
    assert (promoted / "full.pt").read_bytes() == b"full weights one"
    assert json.loads((promoted / "model.json").read_text())["version"] == e1["version"]
    registry = load_registry(reg)
    assert registry["promoted"] == e1["version"]
    assert [e["status"] for e in registry["entries"]] == ["promoted", "rejected"]
    assert current_promoted(registry)["version"] == e1["version"]

    # 3. a better candidate replaces v1
    f3 = model_files("three")
    e3 = register_candidate(reg, promoted, f3, metrics(f1=0.7), GATES, lineage)
    assert e3["status"] == "promoted" and e3["previous"] == e1["version"]
    assert (promoted / "full.pt").read_bytes() == b"full weights three"
    assert load_registry(reg)["promoted"] == e3["version"]
    assert len(load_registry(reg)["entries"]) == 3


def test_rejected_first_candidate_copies_nothing(tmp_path, model_files):
    reg, promoted = tmp_path / "registry.json", tmp_path / "promoted"
    entry = register_candidate(reg, promoted, model_files("weak"), metrics(acc=0.51, f1=0.2, majority=0.5), GATES, {})
    assert entry["status"] == "rejected"
    assert {r.split(":")[0] for r in entry["reasons"]} == {"min_macro_f1", "min_gain_over_majority"}
    assert not promoted.exists()
    registry = load_registry(reg)
    assert registry["promoted"] is None and current_promoted(registry) is None
    assert registry["entries"][0]["version"] == entry["version"]


def test_load_registry_of_a_missing_file_is_empty(tmp_path):
    assert load_registry(tmp_path / "none.json") == {"promoted": None, "entries": []}


def test_dvc_out_hash_reads_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  prepare:\n    cmd: x\n    outs:\n"
                    "    - path: data/prepared/elpv\n      hash: md5\n      md5: 0123abcd.dir\n")
    assert dvc_out_hash(lock, "data/prepared/elpv") == "0123abcd.dir"
    assert dvc_out_hash(lock, "data/other") is None
    assert dvc_out_hash(tmp_path / "missing.lock", "data/prepared/elpv") is None


def test_file_sha256(tmp_path):
    p = tmp_path / "blob"
    data = np.random.default_rng(0).bytes(3_000_000)  # more than one read chunk
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- metrics
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(6))
def test_summary_from_confusion_agrees_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 5
    y_true = rng.integers(0, k, 200)
    y_pred = np.where(rng.random(200) < 0.5, y_true, rng.integers(0, k, 200))
    if seed % 2:  # a class absent from the truth (only predicted), and one absent from both
        y_true[y_true == 3] = 0
        y_true[y_true == 4] = 1
        y_pred[y_pred == 4] = 2
    cm = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    s = summary_from_confusion(cm)
    assert s["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert s["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))


def test_summary_from_an_empty_confusion_matrix():
    assert summary_from_confusion(np.zeros((3, 3))) == {"accuracy": 0.0, "balanced_accuracy": 0.0, "macro_f1": 0.0}


def test_classification_metrics_multiclass():
    rng = np.random.default_rng(7)
    names = ["a", "b", "c"]
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, proba, names)
    pred = proba.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["num_samples"] == 300
    assert m["majority_rate"] == pytest.approx(np.bincount(y).max() / 300)
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert set(m["per_class"]) == set(names)
    per_f1 = f1_score(y, pred, average=None)
    for i, name in enumerate(names):
        pc = m["per_class"][name]
        assert pc["support"] == int((y == i).sum())
        assert pc["recall"] == pytest.approx(((pred == i) & (y == i)).sum() / (y == i).sum())
        assert pc["precision"] == pytest.approx(((pred == i) & (y == i)).sum() / (pred == i).sum())
        assert pc["f1"] == pytest.approx(per_f1[i])
    assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))
    assert 0.5 < m["roc_auc_ovr"] <= 1.0
    json.dumps(m)  # metrics.json material: plain Python types only


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_binary_auc_and_missing_class():
    y = np.array([0, 0, 1, 1, 1, 0])
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45], [0.2, 0.8], [0.35, 0.65]])
    m = classification_metrics(y, proba, ["ok", "defect"])
    assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(y, proba[:, 1]))
    assert m["per_class"]["defect"]["support"] == 3
    # a class missing from the truth: AUC undefined, per-class values still reported
    m3 = classification_metrics(np.array([0, 1, 0, 1]), np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1],
                                                                  [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]]), ["a", "b", "c"])
    assert m3["roc_auc_ovr"] is None
    assert m3["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m3["accuracy"] == pytest.approx(0.75)
