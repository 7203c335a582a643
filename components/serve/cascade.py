"""What the classifier and the detector cascades share: the escalation rule's frame and the trace of
the tiers one request went through (each tier's latency, model version and batch size, and the tier
whose answer is returned)."""
from __future__ import annotations

import time


def escalates(mode: str, uncertain: bool) -> bool:
    """Whether an input goes to the cloud tier: always in ``cloud`` mode, never in ``edge`` mode, and in
    ``cascade`` mode when the edge's answer is ``uncertain`` (a classifier's confidence below the
    threshold; a detector's box scored below it)."""
    return mode == "cloud" or (mode == "cascade" and uncertain)


class Trace:
    """One request's path through the tiers, as its answer reports it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.latency: dict[str, float] = {}
        self.versions: dict[str, str] = {}
        self.batch_sizes: dict[str, int] = {}
        self.tier: str | None = None

    def record(self, tier: str, started: float, result: dict) -> None:
        """A tier answered ``result`` (not an error) for a call begun at ``started`` (perf_counter)."""
        self.latency[tier] = (time.perf_counter() - started) * 1000.0
        self.tier, self.versions[tier] = tier, result["model_version"]
        if "batch_size" in result:
            self.batch_sizes[tier] = result["batch_size"]

    def finish(self) -> dict[str, float]:
        """The latencies with the request's total so far (ms)."""
        self.latency["total"] = (time.perf_counter() - self.start) * 1000.0
        return self.latency
