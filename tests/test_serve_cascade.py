"""The escalation frame both serving cascades share (components/serve/cascade.py)."""
from __future__ import annotations

import time

import pytest

from components.serve.cascade import Trace, escalates


@pytest.mark.parametrize("mode, uncertain, expected", [
    ("cloud", False, True), ("cloud", True, True),      # cloud mode always asks the cloud
    ("edge", False, False), ("edge", True, False),      # edge mode never does
    ("cascade", False, False), ("cascade", True, True),  # the cascade when the edge is unsure
])
def test_escalation_rule(mode, uncertain, expected):
    assert escalates(mode, uncertain) is expected


def test_trace_reports_each_tier_and_the_one_that_answered():
    trace = Trace()
    t = time.perf_counter()
    trace.record("edge", t, {"model_version": "e1", "batch_size": 3})
    assert trace.tier == "edge" and trace.versions == {"edge": "e1"} and trace.batch_sizes == {"edge": 3}
    trace.record("cloud", time.perf_counter(), {"model_version": "c1"})  # a detector's answer: no batch size
    latency = trace.finish()
    assert trace.tier == "cloud" and trace.versions == {"edge": "e1", "cloud": "c1"}
    assert trace.batch_sizes == {"edge": 3}
    assert set(latency) == {"edge", "cloud", "total"} and latency["total"] >= latency["edge"] >= 0
