"""The edge runtime's outbox: escalated inputs the cloud could not answer, kept on disk until it can.

A ``diskcache.Deque`` (SQLite and files, safe across restarts) bounded in items and bytes: when
full, the oldest input is dropped and counted, so a long outage fills the disk up to the bound and
no further. Once the cloud answers again the runtime resends the inputs oldest first and keeps the
cloud's answers (``resolved``, bounded too) next to what the edge said at the time.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path


class Outbox:
    def __init__(self, directory: str | Path, max_items: int = 500, max_bytes: int = 200_000_000,
                 keep_resolved: int = 500):
        from diskcache import Deque

        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"the outbox needs room for one input: max_items={max_items}, max_bytes={max_bytes}")
        self.directory = Path(directory)
        self.pending = Deque(directory=str(self.directory / "pending"))
        self.resolved = Deque(directory=str(self.directory / "resolved"), maxlen=int(keep_resolved))
        self.max_items, self.max_bytes = int(max_items), int(max_bytes)
        # Counts of this process's lifetime; `pending` itself survives restarts.
        self.counts = {"queued": 0, "resent": 0, "dropped": 0, "refused": 0}

    def __len__(self) -> int:
        return len(self.pending)

    def bytes(self) -> int:
        return int(self.pending.cache.volume())

    def put(self, data: bytes, edge_answer: dict) -> str:
        """Keep one input (and the edge's answer to it); drops the oldest ones while over a bound."""
        if len(data) > self.max_bytes:
            self.counts["dropped"] += 1
            return ""
        while len(self.pending) and (len(self.pending) >= self.max_items
                                     or self.bytes() + len(data) > self.max_bytes):
            self.pending.popleft()
            self.counts["dropped"] += 1
        item_id = uuid.uuid4().hex
        self.pending.append({"id": item_id, "queued_at": time.time(), "data": data, "edge": edge_answer})
        self.counts["queued"] += 1
        return item_id

    def peek(self) -> dict | None:
        try:
            return self.pending.peekleft()
        except IndexError:
            return None

    def done(self, item: dict, cloud_answer: dict | None, status: int) -> None:
        """The oldest input was answered by the cloud (or refused for good, ``cloud_answer`` None)."""
        head = self.peek()
        if head is not None and head["id"] == item["id"]:
            self.pending.popleft()
        self.counts["resent" if cloud_answer is not None else "refused"] += 1
        self.resolved.append({"id": item["id"], "queued_at": item["queued_at"], "resent_at": time.time(),
                              "status": status, "edge_label": item["edge"].get("label"),
                              "cloud_label": (cloud_answer or {}).get("label"),
                              "cloud_probabilities": (cloud_answer or {}).get("probabilities")})

    def stats(self, recent: int = 0) -> dict:
        out = {"pending": len(self.pending), "pending_bytes": self.bytes(), "max_items": self.max_items,
               "max_bytes": self.max_bytes, **self.counts}
        if recent:
            n = len(self.resolved)
            out["recent"] = [self.resolved[i] for i in range(max(0, n - recent), n)]
        return out

    def close(self) -> None:
        self.pending.cache.close()
        self.resolved.cache.close()
