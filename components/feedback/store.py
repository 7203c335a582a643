"""What serving saw, kept for the next data version: a bounded feedback store and its recorder.

A record is two objects in a directory or under an ``s3://`` prefix (one code path, pyarrow's
filesystems: :mod:`components.storage`): ``<name>.img``, the input bytes as they arrived, and
``<name>.json``: its sha256, both tiers' probabilities, the answer given, the model versions, the
reason it was kept and a timestamp. ``<name>`` starts with the time in nanoseconds, so names sort
oldest first. The JSON is written last: a record whose JSON exists has its image. On a local disk
each object is written to a temporary name and renamed (atomic); an S3 object appears whole or not at all.

The store is bounded in bytes: before a write that would exceed ``max_bytes``, the oldest records
are deleted (counted as ``evicted``). The recorder (:class:`FeedbackRecorder`) never blocks or fails
a request: records go to a bounded queue that one background thread drains; a full queue or a store
that cannot be written (full disk, read-only, unreachable bucket) drops the record and counts it.

Nothing here imports torch or Ray: the edge runtime records with the same code.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components import storage as _storage

IMAGE, RECORD = ".img", ".json"
REASONS = ("escalated", "degraded", "below_threshold", "sampled")


class FeedbackSettings(BaseModel):
    """``serve.feedback`` in params.yaml (unknown keys and out-of-range values refused, naming the key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = False
    location: str = "feedback"
    rate: float = Field(0.0, ge=0.0, le=1.0, description="share of the other (confident, not escalated) requests kept")
    max_bytes: int = Field(500_000_000, ge=1, description="the store's bound; the oldest records are deleted first")
    queue_size: int = Field(256, ge=1, description="records waiting for the writer thread; beyond it they are dropped")
    seed: int | None = Field(None, description="of the sampling (None: not reproducible)")

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeedbackSettings":
        try:
            s = cls.model_validate(dict(d or {}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"serve.feedback: {problems}") from None
        if s.enabled and not s.location:
            raise ValueError("serve.feedback.location is empty: a directory or s3://bucket/prefix")
        return s


class FeedbackStore:
    """Records in ``location`` (a path or a URI), at most ``max_bytes`` of them."""

    def __init__(self, location: str, max_bytes: int):
        self.location, self.max_bytes = str(location), int(max_bytes)
        self.local = not _storage.is_uri(self.location)
        if self.local:  # plain files: the edge runtime has no pyarrow
            self.root = str(Path(self.location).expanduser().resolve())
        else:
            self.fs, self.root = _storage.filesystem(self.location)
        self._sizes: dict[str, int] | None = None  # name -> bytes of both objects, loaded on first write
        self.evicted = 0

    # -------------------------------------------------------------- objects
    def _files(self) -> list[tuple[str, int]]:
        """(base name, size) of every object in the store (none while it does not exist)."""
        if self.local:
            root = Path(self.root)
            return [(f.name, f.stat().st_size) for f in root.iterdir() if f.is_file()] if root.is_dir() else []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [(i.base_name, int(i.size)) for i in infos if i.type == pafs.FileType.File]

    def _put(self, name: str, data: bytes) -> None:
        if not self.local:
            with self.fs.open_output_stream(f"{self.root}/{name}") as f:
                f.write(data)
            return
        tmp = Path(self.root) / f".tmp-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, Path(self.root) / name)  # a rename on one disk: readers see the whole object or none

    def _get(self, name: str) -> bytes:
        if self.local:
            return (Path(self.root) / name).read_bytes()
        with self.fs.open_input_stream(f"{self.root}/{name}") as f:
            return f.read()

    def _remove(self, name: str) -> None:
        try:
            if self.local:
                (Path(self.root) / name).unlink()
            else:
                self.fs.delete_file(f"{self.root}/{name}")
        except FileNotFoundError:
            pass

    def _mkdir(self) -> None:
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self.root, recursive=True)

    # -------------------------------------------------------------- records
    def _scan(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for base, size in self._files():
            if base.startswith(".tmp-"):
                continue
            for ext in (IMAGE, RECORD):
                if base.endswith(ext):
                    sizes[base[:-len(ext)]] = sizes.get(base[:-len(ext)], 0) + size
        return dict(sorted(sizes.items()))

    def names(self) -> list[str]:
        """Complete records (their JSON exists), oldest first."""
        return sorted(b[:-len(RECORD)] for b, _ in self._files() if b.endswith(RECORD) and not b.startswith(".tmp-"))

    def size(self) -> int:
        return sum(self._scan().values())

    def read(self, name: str) -> tuple[dict, bytes]:
        return json.loads(self._get(name + RECORD)), self._get(name + IMAGE)

    def write(self, record: dict, image: bytes) -> str:
        """Store one record; evict the oldest while over ``max_bytes``. Raises when the store cannot be written."""
        body = json.dumps(record, sort_keys=True).encode()
        size = len(body) + len(image)
        if size > self.max_bytes:
            raise ValueError(f"a record of {size} bytes does not fit in serve.feedback.max_bytes={self.max_bytes}")
        if self._sizes is None:
            self._mkdir()
            self._sizes = self._scan()
        if sum(self._sizes.values()) + size > self.max_bytes:
            self._sizes = self._scan()  # other writers (replicas) may have added or evicted records
            while self._sizes and sum(self._sizes.values()) + size > self.max_bytes:
                oldest = next(iter(self._sizes))
                self._remove(oldest + RECORD)  # the JSON first: a half-deleted record is never listed as complete
                self._remove(oldest + IMAGE)
                del self._sizes[oldest]
                self.evicted += 1
        name = f"{time.time_ns():020d}-{record['sha256'][:12]}"
        self._put(name + IMAGE, image)
        self._put(name + RECORD, body)
        self._sizes[name] = size
        return name


class FeedbackRecorder:
    """Decides which requests to keep and writes them in the background.

    Kept: every escalated request, every one whose answer's confidence is below the threshold, and
    a ``rate`` sample of the rest. :meth:`offer` returns at once; :meth:`stats` counts what happened.
    """

    def __init__(self, settings: FeedbackSettings | dict, *, source: str):
        self.settings = settings if isinstance(settings, FeedbackSettings) else FeedbackSettings.from_dict(settings)
        self.source = source  # "serve" or "edge": who answered
        self.store = FeedbackStore(self.settings.location, self.settings.max_bytes)
        self.counts = {"offered": 0, "selected": 0, "recorded": 0, "dropped": 0}
        self.last_error: str | None = None
        self._random = random.Random(self.settings.seed)
        self._queue: queue.Queue = queue.Queue(maxsize=int(self.settings.queue_size))
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="resops-feedback", daemon=True)
        self._thread.start()

    def reason(self, answer: dict, threshold: float | None) -> str | None:
        """Why this answer is worth keeping, or None."""
        if answer.get("escalated"):
            return "escalated"
        if answer.get("degraded"):  # the edge runtime escalated, the cloud did not answer: the edge's answer stood
            return "degraded"
        confidence = answer.get("edge_confidence")
        if confidence is None and answer.get("probabilities"):
            confidence = max(answer["probabilities"].values())
        if threshold is not None and confidence is not None and confidence < threshold:
            return "below_threshold"
        if self.settings.rate > 0 and self._random.random() < self.settings.rate:
            return "sampled"
        return None

    def offer(self, image: bytes, answer: dict, *, threshold: float | None, edge: dict | None = None,
              cloud: dict | None = None) -> str | None:
        """Keep ``image`` and ``answer`` if they are worth it (see :meth:`reason`); never raises, never waits.
        ``edge`` / ``cloud``: each tier's own answer (label, probabilities) when it ran."""
        try:
            with self._lock:
                self.counts["offered"] += 1
                why = self.reason(answer, threshold)
                if why is None:
                    return None
                self.counts["selected"] += 1
            record = {
                "sha256": hashlib.sha256(image).hexdigest(), "bytes": len(image), "reason": why,
                "source": self.source, "received_at": time.time(), "threshold": threshold,
                "answer": {k: answer.get(k) for k in ("label", "label_index", "tier", "mode", "escalated",
                                                      "edge_confidence", "model_name", "degraded")},
                "model_versions": dict(answer.get("model_versions") or {}),
                "edge": _tier(edge), "cloud": _tier(cloud),
            }
            self._queue.put_nowait((record, bytes(image)))
            return why
        except queue.Full:
            self._dropped("the feedback queue is full (the store is slower than the requests)")
        except Exception as exc:  # noqa: BLE001 - feedback must never fail a request
            self._dropped(f"{type(exc).__name__}: {exc}")
        return None

    def _dropped(self, why: str) -> None:
        with self._lock:
            self.counts["dropped"] += 1
            self.last_error = why

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.store.write(*item)
                with self._lock:
                    self.counts["recorded"] += 1
            except Exception as exc:  # noqa: BLE001 - a broken store drops records, counted
                self._dropped(f"{type(exc).__name__}: {exc}")
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued record is written or dropped (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stats(self) -> dict:
        with self._lock:
            return {"enabled": True, "location": self.settings.location, "rate": self.settings.rate,
                    "max_bytes": self.settings.max_bytes, **self.counts, "evicted": self.store.evicted,
                    "queued": self._queue.qsize(), "last_error": self.last_error}

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)


def _tier(answer: dict | None) -> dict | None:
    if not answer:
        return None
    return {k: answer.get(k) for k in ("label", "label_index", "probabilities", "model_version", "confidence")
            if k in answer}

