"""The feedback store and recorder (components/feedback): bounded, atomic, never failing a request.
Over real HTTP: the Serve app in tests/test_serve.py, the edge runtime in tests/test_edge.py."""
from __future__ import annotations

import hashlib
import json
import threading

import pytest

from components.feedback import FeedbackRecorder, FeedbackSettings, FeedbackStore
from components.feedback.store import IMAGE, RECORD

ESCALATED = {"label": "crack", "label_index": 1, "tier": "cloud", "mode": "cascade", "escalated": True,
             "edge_confidence": 0.41, "probabilities": {"ok": 0.3, "crack": 0.7}, "model_versions": {"edge": "v1"}}
CONFIDENT = {"label": "ok", "label_index": 0, "tier": "edge", "mode": "cascade", "escalated": False,
             "edge_confidence": 0.97, "probabilities": {"ok": 0.97, "crack": 0.03}, "model_versions": {"edge": "v1"}}


def _record(i: int, image: bytes) -> dict:
    return {"sha256": hashlib.sha256(image).hexdigest(), "i": i}


def test_store_evicts_the_oldest_records_to_stay_under_its_bound(tmp_path):
    images = [bytes([i]) * 1000 for i in range(6)]
    one = 1000 + len(json.dumps(_record(0, images[0]), sort_keys=True))
    store = FeedbackStore(str(tmp_path / "fb"), max_bytes=3 * one + 10)
    names = [store.write(_record(i, im), im) for i, im in enumerate(images)]
    assert store.names() == names[-3:]  # the three newest; names sort oldest first
    assert store.evicted == 3 and store.size() <= 3 * one + 10
    record, image = store.read(names[-1])
    assert record["i"] == 5 and image == images[5]
    assert not [f for f in (tmp_path / "fb").iterdir() if f.name.startswith(".tmp-")]  # no partial objects left
    # A second writer (another replica) sees what the first left and keeps to the same bound.
    other = FeedbackStore(str(tmp_path / "fb"), max_bytes=3 * one + 10)
    other.write(_record(9, images[0]), images[0])
    assert len(store.names()) == 3 and other.evicted == 1


def test_store_refuses_a_record_bigger_than_its_bound(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        FeedbackStore(str(tmp_path), max_bytes=100).write(_record(0, b"x" * 200), b"x" * 200)


def test_a_half_written_record_is_not_listed(tmp_path):
    store = FeedbackStore(str(tmp_path), max_bytes=10_000)
    name = store.write(_record(0, b"abc"), b"abc")
    (tmp_path / f"{name[:-1]}x{IMAGE}").write_bytes(b"image without its json")  # as if the writer died
    assert store.names() == [name]


def _wait(rec: FeedbackRecorder) -> dict:
    assert rec.flush(timeout=30)
    return rec.stats()


def test_recorder_keeps_escalated_and_unsure_answers_and_samples_the_rest(tmp_path):
    rec = FeedbackRecorder({"enabled": True, "location": str(tmp_path), "rate": 0.0}, source="serve")
    assert rec.offer(b"img-1", ESCALATED, threshold=0.5, edge={"label": "ok", "probabilities": {"ok": 0.41}}) == "escalated"
    assert rec.offer(b"img-2", CONFIDENT, threshold=0.5) is None
    assert rec.offer(b"img-3", {**CONFIDENT, "mode": "edge", "edge_confidence": 0.45}, threshold=0.5) == "below_threshold"
    cloud_only = {**CONFIDENT, "mode": "cloud", "edge_confidence": None, "probabilities": {"ok": 0.52, "crack": 0.48}}
    assert rec.offer(b"img-4", cloud_only, threshold=0.6) == "below_threshold"  # the cloud's own confidence
    assert rec.offer(b"img-5", {**CONFIDENT, "degraded": True}, threshold=0.5) == "degraded"
    stats = _wait(rec)
    assert stats["offered"] == 5 and stats["selected"] == stats["recorded"] == 4 and stats["dropped"] == 0
    store = FeedbackStore(str(tmp_path), 10**9)
    records = [store.read(n) for n in store.names()]
    assert [img for _, img in records] == [b"img-1", b"img-3", b"img-4", b"img-5"]
    first = records[0][0]
    assert first["sha256"] == hashlib.sha256(b"img-1").hexdigest() and first["reason"] == "escalated"
    assert first["answer"]["label"] == "crack" and first["edge"]["probabilities"] == {"ok": 0.41}
    assert first["model_versions"] == {"edge": "v1"} and first["source"] == "serve" and first["received_at"] > 0
    rec.close()

    everything = FeedbackRecorder({"enabled": True, "location": str(tmp_path / "all"), "rate": 1.0}, source="edge")
    assert everything.offer(b"img-6", CONFIDENT, threshold=0.5) == "sampled"
    assert _wait(everything)["recorded"] == 1
    everything.close()


def test_a_broken_store_drops_records_and_never_raises(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rec = FeedbackRecorder({"enabled": True, "location": str(blocker / "feedback")}, source="serve")
    for i in range(3):
        assert rec.offer(f"img-{i}".encode(), ESCALATED, threshold=0.5) == "escalated"  # offered, returns at once
    stats = _wait(rec)
    assert stats["recorded"] == 0 and stats["dropped"] == 3 and "Error" in stats["last_error"]
    rec.close()


def test_a_full_queue_drops_instead_of_waiting(tmp_path):
    rec = FeedbackRecorder({"enabled": True, "location": str(tmp_path), "queue_size": 1}, source="serve")
    gate = threading.Event()
    write = rec.store.write
    rec.store.write = lambda *a: (gate.wait(30), write(*a))  # a store that is slow until the gate opens
    results = [rec.offer(f"img-{i}".encode(), ESCALATED, threshold=0.5) for i in range(5)]
    gate.set()
    stats = _wait(rec)
    # One record is in the writer, one waits in the queue of one; the other offers found it full.
    assert stats["recorded"] + stats["dropped"] == 5 and stats["dropped"] >= 3
    assert results.count(None) == stats["dropped"] and "queue is full" in stats["last_error"]
    rec.close()


@pytest.mark.parametrize("bad,match", [({"rate": 2.0}, "serve.feedback: rate: Input should be less than or equal to 1"),
                                       ({"max_bytes": 0}, "serve.feedback: max_bytes: Input should be greater than"),
                                       ({"enabled": True, "location": ""}, "location is empty"),
                                       ({"rat": 0.1}, "serve.feedback: rat: Extra inputs are not permitted")])
def test_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        FeedbackSettings.from_dict(bad)


def test_records_are_two_files_json_last(tmp_path):
    store = FeedbackStore(str(tmp_path), 10_000)
    name = store.write(_record(0, b"png"), b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name + IMAGE, name + RECORD]


# ---------------------------------------------------------------------------- export and data.extra
def _served(store_dir, n: int = 6):
    """A store of n escalated images, classes alternating, with the cloud's labels."""
    import numpy as np

    from components.data.images import encode_png

    rec = FeedbackRecorder({"enabled": True, "location": str(store_dir)}, source="serve")
    images = []
    for i in range(n):
        png = encode_png(np.full((20, 20), 40 * i, np.uint8))
        name = ["ok", "crack"][i % 2]
        rec.offer(png, {**ESCALATED, "label": name}, threshold=0.5, edge={"label": "ok"}, cloud={"label": name})
        images.append((png, name))
    assert rec.flush()
    rec.close()
    return images


def test_export_writes_class_folders_a_manifest_and_takes_corrections(tmp_path):
    from components.feedback.export import export

    images = _served(tmp_path / "store")
    fix = hashlib.sha256(images[0][0]).hexdigest()
    (tmp_path / "fixes.csv").write_text(f"sha256,label\n{fix[:16]},crack\n")
    out = export(str(tmp_path / "store"), tmp_path / "fb", corrections=tmp_path / "fixes.csv", class_names=["ok", "crack"])
    assert out["exported"] == 6 and out["corrected"] == 1 and out["by_class"] == {"crack": 4, "ok": 2}
    assert (tmp_path / "fb" / "crack" / f"{fix[:16]}.png").read_bytes() == images[0][0]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "fb" / "manifest.csv")))
    assert {r["label_source"] for r in rows} == {"model:cloud", "person"}
    assert all(r["reason"] == "escalated" and r["edge_label"] == "ok" for r in rows)
    with pytest.raises(ValueError, match="not one of the model's classes"):
        export(str(tmp_path / "store"), tmp_path / "fb2", class_names=["a", "b"])


def test_extra_rows_join_training_only_skip_known_images_and_record_corrections(tmp_path):
    from components.data.prepare import prepare_dataset
    from components.data.sources import get_source
    from components.feedback.export import export

    get_source("synthetic").ingest(tmp_path / "raw", num_images=40, image_size=16, num_classes=2)
    _served(tmp_path / "store")
    export(str(tmp_path / "store"), tmp_path / "extra", class_names=["ok", "crack"])
    moved = next((tmp_path / "extra" / "ok").iterdir())
    moved.rename(tmp_path / "extra" / "crack" / moved.name)  # a person's correction
    leak = next((tmp_path / "raw" / "ok").iterdir())  # an image that is already in the data set (maybe in test)
    (tmp_path / "extra" / "ok" / "again.png").write_bytes(leak.read_bytes())
    plain = prepare_dataset(tmp_path / "raw", tmp_path / "p0", "synthetic", "multiclass", threads=1)
    res = prepare_dataset(tmp_path / "raw", tmp_path / "p1", "synthetic", "multiclass", threads=1,
                          extra=[str(tmp_path / "extra")])
    m = res.manifest
    fb = m[m["source"] == "feedback"]
    assert len(fb) == 6 and set(fb["split"]) == {"train"}
    real = m[m["source"] == "real"].sort_values("path")
    assert list(real["split"]) == list(plain.manifest.sort_values("path")["split"])  # the split did not move
    [extra] = res.report["extra"]
    assert extra["rows"] == 6 and extra["left_out_already_in_data"] == 1
    assert extra["label_sources"] == {"model:cloud": 5, "person": 1} and extra["by_class"] == {"crack": 4, "ok": 2}
    assert res.report["data_digest"] != plain.report["data_digest"]  # the training data changed: a new run
    with pytest.raises(ValueError, match="not the dataset's classes"):
        (tmp_path / "extra" / "weird").mkdir()
        prepare_dataset(tmp_path / "raw", tmp_path / "p2", "synthetic", "multiclass", threads=1,
                        extra=[str(tmp_path / "extra")])

