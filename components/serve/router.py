"""The HTTP ingress of cloud-edge collaborative inference on Ray Serve (the ``Router`` deployment).

Deployments, composed with DeploymentHandles:

* ``Router`` -- the FastAPI ingress (OpenAPI at ``/docs``). With ``serve.edge.placement`` ingress
  (the default for an int8 ONNX edge classifier) it also runs the edge model itself
  (:class:`IngressEdge`, ONNX Runtime in a thread of the replica), so an edge answer crosses the
  proxy and one replica, and the image is decoded once: an escalation sends the cloud the decoded,
  preprocessed input;
* ``EdgeClassifier`` -- with placement replica (a torch edge model, a detector, or by choice): the
  edge model in its own deployment, several small replicas on ``edge`` nodes, batched;
* ``CloudClassifier`` -- the promoted full model with dynamic batching (``@serve.batch``), placed on
  ``cloud`` nodes.

Per request (``?mode=`` or the JSON field ``mode``) or by default: ``edge`` (edge only), ``cloud``
(cloud only) or ``cascade`` (edge first; the request escalates to the cloud when the edge's
calibrated confidence is below the threshold).

Every tier decodes and preprocesses each image exactly like training validation does
(``components.augment.resize.validation_tensor``), and reports temperature-calibrated
probabilities (the temperatures come from the validation split, see
``components.evaluate.calibration``).

HTTP API::

    POST /predict   an image: multipart field ``file``, or the raw bytes as the body (image/*,
                    application/octet-stream, or no content type) -> PredictResponse
                    a batch: application/json {"images": [base64, ...], "mode": ..., "threshold": ...}
                    -> BatchPredictResponse
    POST /detect    (an app of detector models) the same inputs -> boxes, classes and scores in the
                    image's pixels: DetectResponse / BatchDetectResponse; ``score_threshold``,
                    ``iou_threshold``; cascade escalates when the edge found a box scored below
                    ``threshold``
    GET  /healthz   both tiers answer -> HealthResponse (never needs a token: probes use it)
    GET  /models    the tiers, their files and versions, calibration, the cascade threshold

Errors are JSON ``{"error": "<what is wrong>"}`` and never take the server down:

    400  empty body, bad Content-Length, malformed multipart or JSON body, bad base64
    401  a token is configured and the request has no valid ``Authorization: Bearer <token>``
    413  body above ``max_body_bytes`` (Content-Length first, then the bytes received), more than
         ``max_batch_images`` images, or an image header declaring more than ``max_image_pixels``
         pixels (decompression bomb; refused before decoding)
    415  an unsupported content type, or bytes that are not a decodable image
    422  no ``file`` field, an image smaller than ``min_image_side``, a bad ``mode`` or ``threshold``
"""
# No `from __future__ import annotations` here: Serve ships the Router class to its replica by value
# (cloudpickle), with only the globals its code uses, so string annotations such as "Request" could
# not be resolved there and FastAPI would take `request` for a query parameter.

import asyncio
import logging
import random
import time

import numpy as np
from fastapi import Request
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle

from components.feedback.drift import DriftMonitor, input_histograms
from components.http.requests import (PREDICT_BODY, PREDICT_PARAMS, STATUS_OF_REASON, BadRequest, RequestReader,
                                      answer, error, install_error_handlers, parse_mode, parse_threshold, refused)
from components.http.schema import (DETECT_ERRORS, EXPLAIN_ERRORS, MODES, PREDICT_ERRORS, SIGNAL_ERRORS,
                                     BatchDetectResponse, BatchPredictResponse, DetectResponse, ErrorResponse,
                                     ExplainResponse, HealthResponse, ModelsResponse, PredictResponse,
                                     SignalPredictResponse)
from components.serve.cascade import Trace, escalates
from components.serve.metrics import RouterMetrics
from components.serve.tiers import IngressEdge

logger = logging.getLogger("ray.serve")

# /docs and /redoc load Swagger UI and ReDoc from the package (fastapi-offline), not a CDN: they render offline.
api = FastAPIOffline(title="resops", version="2",
              description="ResNet18-family visual inspection with cloud-edge collaborative inference: the edge "
                          "model answers confident inputs, the rest escalate to the full model in the cloud.")
install_error_handlers(api)



@serve.deployment
@serve.ingress(api)
class Router:
    """HTTP ingress: checks requests, routes them to the edge and/or cloud tier, shapes the answers."""

    def __init__(self, edge: DeploymentHandle | dict, cloud: DeploymentHandle, info: dict, *, default_mode: str,
                 threshold: float, max_body_bytes: int, max_batch_images: int, auth_token: str | None,
                 auth_token_env: str | None, signal: dict | None, detection: dict, feedback: dict | None,
                 drift: dict | None, health_timeout_s: float = 2.0):
        """Built by :func:`components.serve.app.plan` from :class:`~components.serve.args.AppArgs` (which
        holds the defaults and validates them); ``edge`` is the edge deployment's handle, or the settings
        of the ONNX edge model this replica runs itself (placement ingress)."""
        if default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {default_mode!r}")
        # `edge` is the edge deployment's handle, or (placement: ingress) the settings of the edge model
        # this replica runs itself.
        self.local_edge = IngressEdge(**edge) if isinstance(edge, dict) else None
        self.edge = None if self.local_edge else edge
        self.cloud = cloud
        self.info = dict(info)
        self.task = self.info["cloud"].get("task", "classify")
        self.score_threshold = float(detection["score_threshold"])
        self.iou_threshold = float(detection["iou_threshold"])
        self.max_detections = int(detection["max_detections"])
        self.default_mode = default_mode
        self.threshold = float(threshold)
        self.health_timeout_s = float(health_timeout_s)
        self.metrics = RouterMetrics()
        self.reader = RequestReader(max_body_bytes=max_body_bytes, max_batch_images=max_batch_images,
                                    auth_token=auth_token, auth_token_env=auth_token_env)
        from components.serve.signal import check_settings

        self.signal = check_settings(signal) if signal else None
        from components.feedback import FeedbackRecorder, FeedbackSettings

        settings = FeedbackSettings.from_dict(feedback)
        # serve.feedback: escalated, unsure and sampled requests kept for the next data version (never
        # blocking or failing a request; components.feedback)
        self.feedback = FeedbackRecorder(settings, source="serve") if settings.enabled else None
        self.drift, self._embed_tasks = None, set()
        if drift and self.task == "classify":
            # serve.drift: rolling statistics of what this replica receives against the training inputs'
            self.drift = DriftMonitor(drift["reference"], drift["threshold"], check_every=drift["check_every"],
                                      name="serve")
            self.embed_rate = float(drift["embed_rate"]) if self.drift.has_embeddings else 0.0
            self._rng = random.Random()

    # ------------------------------------------------------------------ routing
    async def classify(self, data: bytes, mode: str, threshold: float) -> dict:
        """One image through the tiers ``mode`` names; escalate iff the edge confidence < threshold."""
        trace = Trace()
        edge_conf, result, decoded, edge_result, cloud_result = None, None, None, None, None
        t = time.perf_counter()
        if self.local_edge is not None:  # decoded here once; the edge model runs in this replica
            result, decoded = await self.local_edge.predict(data, with_edge=mode != "cloud")
        elif mode in ("edge", "cascade"):
            result = await self.edge.predict.remote(data, histogram=self.drift is not None)
        if result is not None and "error" in result:
            self.metrics.refused(result["reason"])
            return result
        if mode in ("edge", "cascade"):
            trace.record("edge", t, result)
            edge_result, edge_conf = result, result["confidence"]
        escalate = escalates(mode, edge_conf is not None and edge_conf < threshold)
        # drift: the input's histogram from whoever decoded it; the cloud embedding of a random sample
        embed = self.drift is not None and self.embed_rate > 0 and self._rng.random() < self.embed_rate
        cloud_input = None
        if decoded is not None and (escalate or embed):
            cloud_input = self.local_edge.cloud_input(data, decoded)
        if self.drift is not None:
            self._observe_input(result, decoded, cloud_input)
        if escalate:
            t = time.perf_counter()
            result = await self._cloud_call(data if cloud_input is None else cloud_input, embed=embed,
                                            histogram=self.drift is not None and decoded is None and edge_result is None)
            if "error" in result:
                self.metrics.refused(result["reason"])
                return result
            trace.record("cloud", t, result)
            cloud_result = result
        elif embed:  # not escalated: the cloud embeds it in the background, for the drift watch only
            task = asyncio.create_task(self._embed_only(data if cloud_input is None else cloud_input))
            self._embed_tasks.add(task)
            task.add_done_callback(self._embed_tasks.discard)
        answer = {"label": result["label"], "label_index": result["label_index"],
                  "probabilities": result["probabilities"], "tier": trace.tier, "mode": mode,
                  "escalated": mode == "cascade" and escalate, "edge_confidence": edge_conf,
                  "threshold": threshold if mode == "cascade" else None, "model_name": result["model_name"],
                  "model_versions": trace.versions, "batch_size": trace.batch_sizes, "latency_ms": trace.finish()}
        self.metrics.answered(answer)
        if self.feedback is not None:
            self.feedback.offer(data, answer, threshold=threshold, edge=edge_result, cloud=cloud_result)
        return answer

    # ------------------------------------------------------------------ drift
    def _observe_input(self, result: dict | None, decoded: tuple | None, cloud_input) -> None:
        """The histogram of this request's model input: computed here when this replica decoded it,
        else as the edge tier returned it (the cloud's, for a cloud-mode request: :meth:`_cloud_call`)."""
        if decoded is not None:
            img, x = decoded
            if x is None:
                x = cloud_input if isinstance(cloud_input, np.ndarray) else None
            if x is None:
                from components.augment.resize import validation_tensor

                x = validation_tensor(img, int(self.drift.ref.get("image_size", self.local_edge.image_size)))
            self._drift_observe(histogram=input_histograms(x, self.drift.ref["bins"])[0])
        elif result is not None and result.get("input_histogram") is not None:
            self._drift_observe(histogram=result.pop("input_histogram"))

    def _drift_observe(self, **stats) -> None:
        before = self.drift.last
        self.drift.observe(**stats)
        if self.drift.last is not before:  # rescored: the metrics follow
            self.metrics.drift(self.drift.last)

    async def _cloud_call(self, cloud_input, *, embed: bool = False, histogram: bool = False) -> dict:
        """The cloud tier on the ingress-decoded input (an array) or the bytes; the drift statistics it
        returns on request (``embed``: its embedding; ``histogram``: of the input it decoded) are taken
        out of the answer and observed."""
        if isinstance(cloud_input, np.ndarray):
            result = await self.cloud.predict_array.remote(cloud_input, embed=embed)
        else:
            result = await self.cloud.predict.remote(cloud_input, histogram=histogram, embed=embed)
        h, e = result.pop("input_histogram", None), result.pop("embedding", None)
        if self.drift is not None and (h is not None or e is not None):
            self._drift_observe(histogram=h, embedding=e)
        return result

    async def _embed_only(self, cloud_input) -> None:
        try:
            await self._cloud_call(cloud_input, embed=True)
        except Exception as exc:  # the drift watch never fails a request; a lost sample is only a smaller window
            logger.debug("drift: a sampled cloud embedding failed (%s: %s)", type(exc).__name__, exc)

    @api.post("/predict", response_model=PredictResponse | BatchPredictResponse,
              openapi_extra={"requestBody": PREDICT_BODY, "parameters": PREDICT_PARAMS},
              responses={code: {"model": ErrorResponse, "description": why} for code, why in PREDICT_ERRORS.items()})
    async def predict(self, request: Request):
        """Classify one image (multipart field `file`, or the raw bytes) or a JSON batch of base64 images."""
        start = time.perf_counter()
        try:
            self.reader.authorize(request)
            if self.task == "detect":
                raise BadRequest(404, "this app serves a detector: POST /detect")
            images, ctype, doc = await self.reader.images(request)
            query = request.query_params
            mode = parse_mode(doc.get("mode", query.get("mode")), self.default_mode)
            threshold = parse_threshold(doc.get("threshold", query.get("threshold")), self.threshold)
        except BadRequest as exc:
            return self._refused(exc)
        # The images of a batch go through the tiers concurrently, so the tiers batch them together.
        results = await asyncio.gather(*(self.classify(data, mode, threshold) for data in images))
        return answer(results, ctype, start, PredictResponse, BatchPredictResponse)

    async def detect_one(self, data: bytes, mode: str, threshold: float, score_threshold: float,
                         iou_threshold: float) -> dict:
        """One image through the detector tiers; cascade escalates when the edge found an uncertain box."""
        trace = Trace()
        escalate = mode == "cloud"
        if mode in ("edge", "cascade"):
            t = time.perf_counter()
            result = await self.edge.detect.remote(data, score_threshold, iou_threshold, self.max_detections)
            if "error" in result:
                return result
            trace.record("edge", t, result)
            escalate = escalates(mode, any(d["score"] < threshold for d in result["detections"]))
        if escalate:
            t = time.perf_counter()
            result = await self.cloud.detect.remote(data, score_threshold, iou_threshold, self.max_detections)
            if "error" in result:
                return result
            trace.record("cloud", t, result)
        return {"detections": result["detections"], "image_size": result["image_size"], "tier": trace.tier,
                "mode": mode, "escalated": mode == "cascade" and escalate, "score_threshold": score_threshold,
                "iou_threshold": iou_threshold, "model_name": result["model_name"], "model_versions": trace.versions,
                "latency_ms": trace.finish()}

    @api.post("/detect", response_model=DetectResponse | BatchDetectResponse,
              openapi_extra={"requestBody": PREDICT_BODY},
              responses={code: {"model": ErrorResponse, "description": why} for code, why in DETECT_ERRORS.items()})
    async def detect(self, request: Request):
        """Detect objects on one image (multipart field `file`, or the raw bytes) or a JSON batch of base64
        images; `score_threshold`, `iou_threshold` (NMS) and `mode` as query parameters or JSON fields."""
        start = time.perf_counter()
        fields = ("mode", "threshold", "score_threshold", "iou_threshold")
        try:
            self.reader.authorize(request)
            if self.task != "detect":
                raise BadRequest(404, "this app serves a classifier: POST /predict")
            images, ctype, doc = await self.reader.images(request, fields)
            q = {**request.query_params, **doc}
            mode = parse_mode(q.get("mode"), self.default_mode)
            threshold = parse_threshold(q.get("threshold"), self.threshold)
            score = parse_threshold(q.get("score_threshold"), self.score_threshold, "score_threshold")
            iou = parse_threshold(q.get("iou_threshold"), self.iou_threshold, "iou_threshold")
        except BadRequest as exc:
            return self._refused(exc)
        results = await asyncio.gather(*(self.detect_one(data, mode, threshold, score, iou) for data in images))
        return answer(results, ctype, start, DetectResponse, BatchDetectResponse)

    @api.post("/explain", response_model=ExplainResponse, openapi_extra={"requestBody": PREDICT_BODY},
              responses={200: {"content": {"image/png": {}}, "description": "with `Accept: image/png`: the heat map"},
                         **{code: {"model": ErrorResponse, "description": why} for code, why in EXPLAIN_ERRORS.items()}})
    async def explain(self, request: Request):
        """Explain one image (multipart field `file`, the raw bytes, or a JSON {"images": [one base64]}): the
        cloud model's answer and a Grad-CAM heat map of the predicted class over the image (base64 PNG in
        JSON; with `Accept: image/png` the PNG itself, the label in the `X-Label` header)."""
        start = time.perf_counter()
        try:
            self.reader.authorize(request)
            if self.task == "detect":
                raise BadRequest(404, "this app serves a detector: POST /detect")
            images, ctype, _ = await self.reader.images(request, ())
            if len(images) != 1:
                raise BadRequest(422, f"/explain takes one image, got {len(images)}")
        except BadRequest as exc:
            return self._refused(exc)
        t = time.perf_counter()
        result = await self.cloud.explain.remote(images[0])
        if "error" in result:
            self.metrics.refused(result["reason"])
            where = "images[0]: " if ctype == "application/json" else ""  # as /predict names a JSON image
            return error(STATUS_OF_REASON[result["reason"]], where + result["error"])
        latency = {"cloud": (time.perf_counter() - t) * 1000.0, "total": (time.perf_counter() - start) * 1000.0}
        accept = request.headers.get("accept", "")
        if "image/png" in accept and "application/json" not in accept:
            from fastapi.responses import Response

            return Response(content=result["heatmap_png"], media_type="image/png",
                            headers={"X-Label": result["label"], "X-Model-Version": result["model_version"],
                                     "X-Explained-Class": result["explained_class"]})
        import base64

        return ExplainResponse(**{k: v for k, v in result.items() if k != "compute_ms"} | {
            "heatmap_png": base64.b64encode(result["heatmap_png"]).decode("ascii"), "latency_ms": latency})

    @api.post("/predict_signal", response_model=SignalPredictResponse,
              responses={code: {"model": ErrorResponse, "description": why} for code, why in SIGNAL_ERRORS.items()})
    async def predict_signal(self, request: Request):
        """Classify a signal (EEG): JSON {"signal": [...]}, text with one number per line, or a 1-D .npy.
        It is cut into the training windows, each window becomes a scalogram, the answer averages them."""
        from components.serve.signal import SIGNAL_CONTENT_TYPES, SignalError, parse_signal, signal_images

        start = time.perf_counter()
        try:
            self.reader.authorize(request)
            if self.signal is None:
                raise BadRequest(404, "this app serves images (POST /predict): it was not built from an EEG dataset")
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in SIGNAL_CONTENT_TYPES:
                raise BadRequest(415, f"unsupported content type {ctype!r}: send application/json "
                                       '{"signal": [...]}, text/plain (one number per line) or application/x-npy')
            body = await self.reader.body(request)
            if not body:
                raise BadRequest(400, "empty request body: send a signal")
            x, doc = parse_signal(body, ctype, self.signal["max_samples"])
            query = request.query_params
            mode = parse_mode(doc.get("mode", query.get("mode")), self.default_mode)
            threshold = parse_threshold(doc.get("threshold", query.get("threshold")), self.threshold)
            fs = doc.get("fs", query.get("fs"))
            if isinstance(fs, str):
                try:
                    fs = float(fs)
                except ValueError:
                    raise BadRequest(422, f"fs must be a number of Hz, got {fs!r}") from None
            images = await asyncio.get_running_loop().run_in_executor(None, signal_images, x, self.signal, fs)
        except (BadRequest, SignalError) as exc:
            return self._refused(exc)
        results = await asyncio.gather(*(self.classify(data, mode, threshold) for data in images))
        for i, result in enumerate(results):
            if "error" in result:
                return error(STATUS_OF_REASON[result["reason"]], f"window {i}: " + result["error"])
        names = list(results[0]["probabilities"])
        mean = {n: float(np.mean([r["probabilities"][n] for r in results])) for n in names}
        best = max(range(len(names)), key=lambda k: mean[names[k]])
        return SignalPredictResponse(label=names[best], label_index=best, probabilities=mean, num_windows=len(results),
                                     window_seconds=self.signal["window"] / self.signal["fs"],
                                     windows=[PredictResponse(**r) for r in results],
                                     latency_ms=(time.perf_counter() - start) * 1000.0)

    def _refused(self, exc) -> object:
        self.metrics.refused(f"http_{exc.status}")
        return refused(exc)

    def reconfigure(self, config: dict) -> None:
        """Serve ``user_config`` (``{"threshold": t, "default_mode": m}``): a changed value in the Serve
        config takes effect on the running router, without restarting it."""
        config = dict(config or {})
        mode = config.get("default_mode", self.default_mode)
        if mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {mode!r}")
        threshold = float(config.get("threshold", self.threshold))
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if "edge_temperature" in config and self.local_edge is not None:
            self.local_edge.set_temperature(config["edge_temperature"])
        self.default_mode, self.threshold = mode, threshold

    @api.get("/healthz", response_model=HealthResponse,
             responses={503: {"model": ErrorResponse, "description": "a tier does not answer"}})
    async def healthz(self):
        """OK when both tiers answer now (asked on every call: a probe sees a tier that died)."""
        if self.local_edge is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self.local_edge.pool, self.local_edge.check_health)
            except Exception as exc:
                return error(503, f"the edge model in the ingress failed a forward pass ({type(exc).__name__}: {exc})")
        for tier, handle in (("edge", self.edge), ("cloud", self.cloud)):
            if handle is None:
                continue
            try:
                await asyncio.wait_for(handle.info.remote(), timeout=self.health_timeout_s)
            except Exception as exc:  # any failure means "not serving"
                return error(503, f"the {tier} tier did not answer within {self.health_timeout_s:g} s "
                                  f"({type(exc).__name__})")
        return HealthResponse(default_mode=self.default_mode,
                              model_versions={t: self.info[t]["model_version"] for t in ("edge", "cloud")})

    @api.get("/drift", responses={401: {"model": ErrorResponse}})
    async def drift_score(self, request: Request):
        """Does what this replica receives still look like the training inputs? Rolling scores against
        the drift reference (1 = the in-distribution 95th percentile) and whether drift is declared."""
        try:
            self.reader.authorize(request)
        except BadRequest as exc:
            return self._refused(exc)
        return self.drift.check() if self.drift is not None else {"enabled": False}

    @api.get("/feedback", responses={401: {"model": ErrorResponse}})
    async def feedback_stats(self, request: Request):
        """What this replica's feedback recorder kept, dropped and evicted (serve.feedback)."""
        try:
            self.reader.authorize(request)
        except BadRequest as exc:
            return self._refused(exc)
        return self.feedback.stats() if self.feedback is not None else {"enabled": False}

    @api.get("/models", response_model=ModelsResponse, responses={401: {"model": ErrorResponse}})
    async def models(self, request: Request):
        """The two tiers (model, version, files, backend, temperature) and the cascade settings."""
        try:
            self.reader.authorize(request)
        except BadRequest as exc:
            return self._refused(exc)
        info = dict(self.info)
        live = {"cloud": (await self.cloud.info.remote())["temperature"]}
        live["edge"] = (self.local_edge.temperature if self.local_edge is not None
                        else (await self.edge.info.remote())["temperature"])
        for tier, temperature in live.items():  # temperatures may have been reconfigured
            info[tier] = {**info[tier], "temperature": temperature}
        return ModelsResponse(default_mode=self.default_mode, threshold=self.threshold, **info)
