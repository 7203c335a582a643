"""The edge runtime's HTTP app: ``POST /predict`` like the Serve app's, answered on the device.

Per request (``?mode=``, the JSON field ``mode``, or the default):

* ``edge``: the local model answers;
* ``cascade``: the local model answers when its calibrated confidence reaches the threshold; below
  it the image goes to the cloud app (``POST {cloud}/predict?mode=cloud``, bearer token);
* ``cloud``: the cloud app answers.

When the cloud does not answer (connection refused, timeout, 5xx, a bad token) the local answer is
returned with ``degraded: true`` and the reason, and the image goes to the outbox, which is resent
in the background once the cloud answers again. After a failure the runtime stops calling the cloud
(answers degraded at once) until a resend succeeds, so an outage does not add the timeout to every
request. Inputs the cloud refuses for good (413/415/422) are not queued. Requests are read and
refused exactly as the Serve app does (components.http.requests).

    GET /healthz   the local model is loaded -> the cloud link and the outbox (200 with or without the cloud)
    GET /models    the edge model, its calibration and threshold, the cloud URL
    GET /outbox    the outbox counts and the latest resent inputs (edge label next to the cloud's)
    GET /feedback  what the feedback recorder kept (--feedback)
    GET /drift     input drift against the training inputs (the bundle's drift reference: intensities)
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline

from components.edge.bundle import load_bundle
from components.edge.model import EdgeModel
from components.edge.outbox import Outbox
from components.feedback import FeedbackRecorder, FeedbackSettings
from components.feedback.drift import DriftMonitor, input_histograms, load_reference
from components.http.requests import (PREDICT_BODY, PREDICT_PARAMS, BadRequest, RequestReader, answer, error,
                                   install_error_handlers, parse_mode, parse_threshold, refused)
from components.http.schema import (MODES, PREDICT_ERRORS, BatchPredictResponse, CloudLink, EdgeHealthResponse,
                                     ErrorResponse, OutboxStats, PredictResponse)

# The cloud refused the image itself: resending would be refused again.
FINAL_REFUSALS = (400, 413, 415, 422)


class CloudUnavailable(Exception):
    """The cloud did not answer usefully; the message says how."""


class EdgeRuntime:
    """The local model, the link to the cloud app and the outbox, shared by the app's routes."""

    def __init__(self, bundle_path: str | Path, *, cloud_url: str | None = None, cloud_token: str | None = None,
                 default_mode: str = "cascade", threshold: float | None = None, timeout_s: float = 2.0,
                 outbox_dir: str | Path | None = None, outbox_max_items: int = 500,
                 outbox_max_bytes: int = 200_000_000, resend_interval_s: float = 5.0, threads: int = 1,
                 feedback: dict | None = None):
        if default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {', '.join(MODES)}, got {default_mode!r}")
        bundle, onnx_path = load_bundle(bundle_path)
        self.bundle = bundle
        self.model = EdgeModel(bundle, onnx_path, threads=threads)
        self.default_mode = default_mode
        self.threshold = float(bundle.threshold if threshold is None else threshold)
        self.cloud_url = cloud_url.rstrip("/") if cloud_url else None
        self._cloud_headers = {"authorization": f"Bearer {cloud_token}"} if cloud_token else {}
        self.timeout_s = float(timeout_s)
        self.resend_interval_s = float(resend_interval_s)
        self.outbox = None
        if self.cloud_url:
            where = Path(outbox_dir) if outbox_dir else Path(bundle_path).resolve().parent / "outbox"
            self.outbox = Outbox(where, max_items=outbox_max_items, max_bytes=outbox_max_bytes)
        self.cloud_available: bool | None = None
        self.last_error: str | None = None
        settings = FeedbackSettings.from_dict(feedback)
        # what the device saw: escalated, unsure and sampled inputs, for the next data version (components.feedback)
        self.feedback = FeedbackRecorder(settings, source="edge") if settings.enabled else None
        self.drift = None
        if bundle.drift_reference:  # the intensities of what the device sees against the training inputs'
            self.drift = DriftMonitor(load_reference(onnx_path.parent / bundle.drift_reference), bundle.drift_threshold,
                                      check_every=bundle.drift_check_every, name="edge")
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="edge-model")
        self._client = None
        self._resender: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(timeout=self.timeout_s)
        if self.outbox is not None:
            self._resender = asyncio.create_task(self._resend_forever())

    async def stop(self) -> None:
        if self._resender is not None:
            self._resender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resender
        if self._client is not None:
            await self._client.aclose()
        if self.outbox is not None:
            self.outbox.close()
        if self.feedback is not None:
            self.feedback.close()
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ the cloud
    async def _post_cloud(self, data: bytes) -> tuple[int, dict]:
        """``(status, JSON)`` of ``POST {cloud}/predict?mode=cloud``; raises CloudUnavailable."""
        import httpx

        try:
            r = await self._client.post(f"{self.cloud_url}/predict", params={"mode": "cloud"}, content=data,
                                        headers={"content-type": "application/octet-stream", **self._cloud_headers})
        except httpx.TimeoutException:
            raise CloudUnavailable(f"cloud did not answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise CloudUnavailable(f"cloud unreachable ({type(exc).__name__}: {exc})") from None
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:200]}
        if r.status_code != 200 and r.status_code not in FINAL_REFUSALS:
            raise CloudUnavailable(f"cloud answered {r.status_code}: {body.get('error', '')}".rstrip(": "))
        return r.status_code, body

    def _cloud_failed(self, reason: str) -> None:
        self.cloud_available, self.last_error = False, reason

    async def _resend_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resend_interval_s)
            await self.resend()

    async def resend(self) -> int:
        """Send the outbox, oldest first, until it is empty or the cloud fails; returns inputs sent."""
        sent = 0
        while (item := self.outbox.peek()) is not None:
            try:
                status, body = await self._post_cloud(item["data"])
            except CloudUnavailable as exc:
                self._cloud_failed(str(exc))
                return sent
            self.cloud_available, self.last_error = True, None
            self.outbox.done(item, body if status == 200 else None, status)
            sent += 1
        return sent

    # ------------------------------------------------------------------ one image
    async def _local(self, data: bytes) -> dict:
        observe = self._observe if self.drift is not None else None
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.model.predict, data, observe)

    def _observe(self, x) -> None:
        self.drift.observe(histogram=input_histograms(x, self.drift.ref["bins"])[0])

    async def classify(self, data: bytes, mode: str, threshold: float) -> dict:
        start = time.perf_counter()
        latency: dict[str, float] = {}
        edge = None
        if mode in ("edge", "cascade"):
            t = time.perf_counter()
            edge = await self._local(data)
            latency["edge"] = (time.perf_counter() - t) * 1000.0
            if "error" in edge:
                return edge
        escalate = mode == "cloud" or (mode == "cascade" and edge["confidence"] < threshold)
        cloud, reason = None, None
        if escalate:
            if self.cloud_url is None:
                reason = "no cloud configured (standalone edge runtime)"
            elif self.cloud_available is False:
                reason = f"cloud unavailable since the last failure: {self.last_error}"
            else:
                t = time.perf_counter()
                try:
                    status, body = await self._post_cloud(data)
                    latency["cloud"] = (time.perf_counter() - t) * 1000.0
                    self.cloud_available, self.last_error = True, None
                    if status != 200:
                        reason = f"cloud refused the image ({status}: {body.get('error', '')})"
                    else:
                        cloud = body
                except CloudUnavailable as exc:
                    latency["cloud"] = (time.perf_counter() - t) * 1000.0
                    self._cloud_failed(str(exc))
                    reason = str(exc)
        if escalate and cloud is None and edge is None:  # cloud mode: the local model answers instead
            t = time.perf_counter()
            edge = await self._local(data)
            latency["edge"] = (time.perf_counter() - t) * 1000.0
            if "error" in edge:
                return edge
        degraded = escalate and cloud is None
        if degraded and self.outbox is not None and not (reason or "").startswith("cloud refused"):
            self.outbox.put(data, {k: edge[k] for k in ("label", "probabilities", "model_version")})
        versions = {"edge": self.bundle.model_version} if edge is not None else {}
        if cloud is not None:
            versions.update({k: v for k, v in cloud.get("model_versions", {}).items() if k == "cloud"})
        src = cloud if cloud is not None else edge
        latency["total"] = (time.perf_counter() - start) * 1000.0
        batch = {"edge": 1} if edge is not None else {}
        if cloud is not None and "cloud" in cloud.get("batch_size", {}):
            batch["cloud"] = int(cloud["batch_size"]["cloud"])
        result = {"label": src["label"], "label_index": src["label_index"], "probabilities": src["probabilities"],
                  "tier": "cloud" if cloud is not None else "edge", "mode": mode,
                  "escalated": mode == "cascade" and cloud is not None,
                  "edge_confidence": edge["confidence"] if edge is not None and mode != "cloud" else None,
                  "threshold": threshold if mode == "cascade" else None, "model_name": src["model_name"],
                  "model_versions": versions, "batch_size": batch, "latency_ms": latency,
                  "degraded": degraded, "degraded_reason": reason if degraded else None}
        if self.feedback is not None:
            self.feedback.offer(data, result, threshold=threshold,
                                edge=edge and {**edge, "model_version": self.bundle.model_version}, cloud=cloud)
        return result

    def health(self) -> dict:
        return {"default_mode": self.default_mode, "model_versions": {"edge": self.bundle.model_version},
                "cloud": CloudLink(url=self.cloud_url, available=self.cloud_available, last_error=self.last_error,
                                   timeout_s=self.timeout_s),
                "outbox": OutboxStats(**self.outbox.stats()) if self.outbox is not None else None}


def create_app(bundle_path: str | Path, *, auth_token: str | None = None, auth_token_env: str | None = None,
               cloud_token_env: str | None = "RESOPS_API_TOKEN", **runtime) -> FastAPI:
    """The edge runtime's FastAPI app. ``runtime``: :class:`EdgeRuntime`'s keyword arguments
    (``cloud_url``, ``default_mode``, ``threshold``, ``timeout_s``, ``outbox_dir``, ...); the cloud's
    bearer token is read from ``cloud_token_env``, this app's own (if any) from ``auth_token_env``."""
    cloud_token = os.environ.get(cloud_token_env) if cloud_token_env else None
    rt = EdgeRuntime(bundle_path, cloud_token=cloud_token, **runtime)
    b = rt.bundle
    reader = RequestReader(max_body_bytes=b.max_body_bytes, max_batch_images=b.max_batch_images,
                           auth_token=auth_token, auth_token_env=auth_token_env)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await rt.start()
        try:
            yield
        finally:
            await rt.stop()

    api = FastAPIOffline(title="resops edge", version="1", lifespan=lifespan,  # /docs without a CDN
                  description="The resops edge runtime on the device: the int8 edge model answers confident inputs; "
                              "the rest escalate to the cloud app, or are answered locally (degraded) and queued "
                              "when the cloud is down.")
    install_error_handlers(api)
    api.state.runtime = rt

    @api.post("/predict", response_model=PredictResponse | BatchPredictResponse,
              openapi_extra={"requestBody": PREDICT_BODY, "parameters": PREDICT_PARAMS},
              responses={code: {"model": ErrorResponse, "description": why} for code, why in PREDICT_ERRORS.items()})
    async def predict(request: Request):
        """Classify one image (multipart field `file`, or the raw bytes) or a JSON batch of base64 images."""
        start = time.perf_counter()
        try:
            reader.authorize(request)
            images, ctype, doc = await reader.images(request)
            query = request.query_params
            mode = parse_mode(doc.get("mode", query.get("mode")), rt.default_mode)
            threshold = parse_threshold(doc.get("threshold", query.get("threshold")), rt.threshold)
        except BadRequest as exc:
            return refused(exc)
        results = await asyncio.gather(*(rt.classify(data, mode, threshold) for data in images))
        return answer(results, ctype, start, PredictResponse, BatchPredictResponse)

    @api.get("/healthz", response_model=EdgeHealthResponse)
    async def healthz():
        """OK while the local model answers; the cloud link and the outbox as they are."""
        try:
            await asyncio.get_running_loop().run_in_executor(rt._pool, rt.model.probabilities, _probe(b))
        except Exception as exc:  # the model itself failed: this runtime cannot answer
            return error(503, f"edge model failed ({type(exc).__name__}: {exc})")
        return EdgeHealthResponse(**rt.health())

    add_status_routes(api, rt, reader)
    return api


def add_status_routes(api: FastAPI, rt: EdgeRuntime, reader: RequestReader) -> None:
    """The runtime's read-only routes behind the bearer token: /models, /feedback, /drift, /outbox."""
    b = rt.bundle

    @api.get("/models", responses={401: {"model": ErrorResponse}})
    async def models(request: Request):
        """The edge model (version, file, calibration), the cascade threshold and the cloud URL."""
        try:
            reader.authorize(request)
        except BadRequest as exc:
            return refused(exc)
        return {"default_mode": rt.default_mode, "threshold": rt.threshold, "cloud_url": rt.cloud_url,
                "edge": {**b.model_dump(), "backend": "onnxruntime"}}

    @api.get("/feedback", responses={401: {"model": ErrorResponse}})
    async def feedback_stats(request: Request):
        """What the feedback recorder kept, dropped and evicted (--feedback)."""
        try:
            reader.authorize(request)
        except BadRequest as exc:
            return refused(exc)
        return rt.feedback.stats() if rt.feedback is not None else {"enabled": False}

    @api.get("/drift", responses={401: {"model": ErrorResponse}})
    async def drift(request: Request):
        """Do the device's inputs still look like the training inputs? The intensity score against the
        bundle's drift reference (1 = the in-distribution 95th percentile) and whether drift is declared."""
        try:
            reader.authorize(request)
        except BadRequest as exc:
            return refused(exc)
        return rt.drift.check() if rt.drift is not None else {"enabled": False}

    @api.get("/outbox", response_model=OutboxStats, responses={401: {"model": ErrorResponse},
                                                                404: {"model": ErrorResponse}})
    async def outbox(request: Request, recent: int = 20):
        """Queued inputs waiting for the cloud, and the latest resent ones with both answers."""
        try:
            reader.authorize(request)
        except BadRequest as exc:
            return refused(exc)
        if rt.outbox is None:
            return error(404, "no cloud configured: nothing is queued")
        return OutboxStats(**rt.outbox.stats(recent=max(0, min(int(recent), 500))))


def _probe(bundle):
    import numpy as np

    return np.zeros((1, bundle.in_chans, bundle.image_size, bundle.image_size), dtype=np.float32)
