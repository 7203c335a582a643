"""The router's application metrics (``ray.serve.metrics``)."""


class RouterMetrics:
    """Application metrics (``ray.serve.metrics``), exported on every node's Ray metrics endpoint
    (Prometheus text, ``ray_`` prefixed; the node's ``MetricsExportPort``) next to Serve's own."""

    CONFIDENCE_BOUNDARIES = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("resops_requests", description="images answered, by answering tier and mode",
                                        tag_keys=("tier", "mode"))
        self.escalations = metrics.Counter("resops_escalations",
                                           description="cascade images the edge escalated to the cloud")
        self.edge_confidence = metrics.Histogram("resops_edge_confidence",
                                                 description="the edge model's calibrated top probability",
                                                 boundaries=self.CONFIDENCE_BOUNDARIES)
        self.errors = metrics.Counter("resops_errors", description="refused requests and images, by reason",
                                      tag_keys=("reason",))
        self.latency = metrics.Histogram("resops_tier_latency_ms", description="time of a tier call as the router "
                                         "sees it (total: the whole image)", boundaries=self.LATENCY_BOUNDARIES_MS,
                                         tag_keys=("tier",))
        self.drift_score = metrics.Gauge("resops_drift_score", tag_keys=("statistic",),
                                         description="input drift over the last window of requests, in units of "
                                                     "the in-distribution 95th percentile (serve.drift)")
        self.drifted = metrics.Gauge("resops_drift_declared", description="1 while input drift is declared")

    def answered(self, result: dict) -> None:
        self.requests.inc(tags={"tier": result["tier"], "mode": result["mode"]})
        if result["escalated"]:
            self.escalations.inc()
        if result["edge_confidence"] is not None:
            self.edge_confidence.observe(result["edge_confidence"])
        for tier, ms in result["latency_ms"].items():
            self.latency.observe(ms, tags={"tier": tier})

    def refused(self, reason: str) -> None:
        self.errors.inc(tags={"reason": reason})

    def drift(self, score: dict) -> None:
        """The drift watch's latest score (serve.drift): per statistic, and whether drift is declared."""
        for name in ("intensity", "embedding"):
            if score[name] is not None:
                self.drift_score.set(score[name]["score"], tags={"statistic": name})
        self.drifted.set(float(score["drifted"]))
