"""Ray Serve application serving a classification model over HTTP.

Two deployments, composed with a DeploymentHandle so more tiers can be added (edge/cloud cascade):

* ``Classifier`` -- one model tier: loads a model file, decodes and preprocesses each image exactly
  like training validation does (``AugmentOperator(policy=None, output="tensor")``), and runs
  batched inference (``@serve.batch``) in eval mode, channels_last, under ``torch.inference_mode``.
* ``Router`` -- the FastAPI ingress (OpenAPI at ``/docs``): checks the request, sends the image
  bytes to the classifier handle, shapes the answer.

HTTP API::

    POST /predict   multipart/form-data with a file field ``file``, or the raw image as the body
                    (any content type: image/png, application/octet-stream, ...)
                    -> PredictResponse
    GET  /healthz   -> HealthResponse
    GET  /models    -> ModelInfo

Errors are JSON ``{"error": "<what is wrong>"}`` and never take the server down:

    400  empty body, empty uploaded file, invalid Content-Length, malformed multipart body
    413  body above ``max_body_bytes`` (Content-Length checked first, then the bytes actually
         received, so chunked uploads are bounded too), or an image whose header declares more
         than ``max_image_pixels`` pixels (decompression bomb; refused before decoding)
    415  the bytes are not a decodable image: unknown format, corrupt or truncated
    422  multipart/form-data without a ``file`` field
    404  unknown path

Placement: the classifier asks for ``num_cpus`` and, only when ``resources`` is given, for Ray custom
resources (e.g. ``{"cloud": 0.01}``), so on a plain local Ray it needs nothing special.
"""
import asyncio
import io
import signal
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.data.images import ImageDecodeError
from components.registry import file_sha256
from components.serve.schema import PREDICT_ERRORS, ErrorResponse, HealthResponse, ModelInfo, PredictResponse

UNDECODABLE, TOO_LARGE = "undecodable", "too_large"
_STATUS = {UNDECODABLE: 415, TOO_LARGE: 413}


class ImageTooLargeError(ImageDecodeError):
    """The image header declares more pixels than allowed; raised before any pixel is decoded."""


def check_pixel_count(data: bytes, max_pixels: int) -> None:
    """Refuse images whose header declares more than ``max_pixels`` pixels (or PIL's own bomb limit).

    Only the header is read. Data PIL cannot identify passes through: decoding names that problem.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large (decompression bomb): {exc}") from None
    except Exception:  # not an image, unreadable header: decode_image says what is wrong
        return
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image has {w}x{h}={w * h} pixels, above the limit of {max_pixels}")
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"image has {w}x{h}={w * h} pixels, above PIL's decompression-bomb "
                                 f"limit of {Image.MAX_IMAGE_PIXELS}")


def read_model_info(model_path: str) -> dict:
    """Load a model file in this process to validate it; return its metadata.

    Raises ``CheckpointError`` naming the file and the problem (missing, malformed, weights that do
    not fit, class names that do not match the head), so a bad model fails at build time, not on
    the first request.
    """
    from components.models.checkpoint import CheckpointError, load_model

    _, meta = load_model(model_path)
    names = list(meta["class_names"])
    if len(names) != int(meta["num_classes"]):
        raise CheckpointError(f"model file {model_path}: {len(names)} class_names {names} "
                              f"but num_classes is {meta['num_classes']}")
    return {"model_name": str(meta["model_name"]), "class_names": [str(n) for n in names],
            "num_classes": int(meta["num_classes"]), "image_size": int(meta["image_size"]),
            "in_chans": int(meta["in_chans"])}


@serve.deployment(max_constructor_retry_count=2)
class Classifier:
    """One model tier: image bytes in, softmax probabilities out, inference batched across requests.

    ``predict`` never raises for bad input; it answers ``{"error": msg, "reason": "undecodable" |
    "too_large"}`` so a caller can map the reason to a status (and a cascade can tell input errors
    from model errors).
    """

    def __init__(self, model_path: str, *, model_version: str = "unknown", max_image_pixels: int = 50_000_000,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, threads: int = 2,
                 sha256: str | None = None):
        import torch  # imported here: the router process never needs torch

        from components.augment.operator import AugmentOperator
        from components.models.checkpoint import CheckpointError, load_model

        if sha256 is not None and Path(model_path).exists() and (found := file_sha256(model_path)) != sha256:
            # Another node's copy, or the file was replaced after build_app: the version label would lie.
            raise CheckpointError(f"model file {model_path} on this node has sha256 {found}, "
                                  f"not {sha256} as when the app was built")
        self._torch = torch
        self.threads = threads
        torch.set_num_threads(threads)
        model, meta = load_model(model_path)
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.meta = meta
        self.model_version = model_version
        self.class_names = [str(n) for n in meta["class_names"]]
        self.max_image_pixels = max_image_pixels
        # The validation transform of training: decode, resize, normalise; no augmentation.
        self.preprocess_op = AugmentOperator(policy=None, output="tensor", image_size=int(meta["image_size"]),
                                             in_chans=int(meta["in_chans"]), max_pixels=max_image_pixels)
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # One thread runs the forward passes so the event loop keeps accepting and decoding requests
        # while a batch computes (torch releases the GIL).
        self._forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward",
                                                initializer=torch.set_num_threads, initargs=(threads,))
        # Decoding runs off the event loop too, at most `threads` images at once: bounded memory
        # even when many large images arrive together.
        self._decode_pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode")
        self.batch_stats = {"batches": 0, "images": 0, "max_batch_size": 0}

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> float32 CHW array; raises ImageDecodeError naming the problem."""
        check_pixel_count(data, self.max_image_pixels)
        out = self.preprocess_op({"image": np.array([data], dtype=object), "label": np.array([0])})
        return out["image"][0]

    def forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return torch.softmax(self.model(x).float(), dim=1).numpy()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(self._forward_pool, self.forward, np.stack(images))
        st = self.batch_stats
        st["batches"], st["images"] = st["batches"] + 1, st["images"] + len(images)
        st["max_batch_size"] = max(st["max_batch_size"], len(images))
        return list(probs)

    async def predict(self, data: bytes) -> dict:
        try:
            image = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self.preprocess, data)
        except ImageTooLargeError as exc:
            return {"error": str(exc), "reason": TOO_LARGE}
        except ImageDecodeError as exc:
            return {"error": str(exc), "reason": UNDECODABLE}
        probs = await self._infer(image)
        index = int(np.argmax(probs))
        return {"label": self.class_names[index], "label_index": index,
                "probabilities": {name: float(p) for name, p in zip(self.class_names, probs)},
                "model_version": self.model_version, "model_name": str(self.meta["model_name"])}

    def stats(self) -> dict:
        """Batches run by this replica: how well requests are being batched."""
        return dict(self.batch_stats)

    def info(self) -> dict:
        return {"model_name": str(self.meta["model_name"]), "model_version": self.model_version,
                "class_names": self.class_names, "num_classes": int(self.meta["num_classes"]),
                "image_size": int(self.meta["image_size"]), "in_chans": int(self.meta["in_chans"])}


api = FastAPI(title="resops", description="ResNet18-family visual inspection: classify an image.",
              version="1")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()))


_PREDICT_BODY = {
    "required": True,
    "description": "the image: a multipart form with a file field `file`, or the raw encoded bytes as the body",
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@serve.deployment
@serve.ingress(api)
class Router:
    """HTTP ingress: validates requests, forwards image bytes to the classifier tier, shapes answers."""

    def __init__(self, classifier: DeploymentHandle, model_info: dict, *, model_version: str = "unknown",
                 max_body_bytes: int = 10_000_000):
        self.classifier = classifier
        self.info = ModelInfo(model_version=model_version, **model_info)
        self.max_body_bytes = max_body_bytes
        self._classifier_seen = False

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                raise _BadRequest(400, f"invalid Content-Length header {declared!r}") from None
            if declared_n > self.max_body_bytes:
                raise _BadRequest(413, f"request body of {declared_n} bytes is above the limit of "
                                       f"{self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # the real size: Content-Length may be absent (chunked) or lie
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BadRequest(413, f"request body is above the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _image_bytes(self, request: Request) -> bytes:
        body = await self._read_body(request)
        if not body:
            raise _BadRequest(400, "empty request body: send an image as the body or as multipart field 'file'")
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return body

        sent = False

        async def replay() -> dict:  # parse the form from the bytes already read and size-checked
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        form_request = Request(request.scope, receive=replay)
        try:
            form = await form_request.form(max_files=1, max_fields=16)
        except StarletteHTTPException as exc:
            raise _BadRequest(400, f"malformed multipart/form-data body: {exc.detail}") from None
        try:
            upload = form.get("file")
            if upload is None:
                raise _BadRequest(422, "multipart/form-data request has no 'file' field; "
                                       f"fields present: {sorted(form.keys())}")
            if not isinstance(upload, UploadFile):
                raise _BadRequest(422, "multipart field 'file' must be a file upload, not a text value")
            data = await upload.read()
        finally:
            await form.close()
        if not data:
            raise _BadRequest(400, "uploaded file 'file' is empty")
        return data

    async def classify(self, data: bytes) -> dict:
        """Where tiers are chosen; a cascade overrides this (edge first, escalate to cloud)."""
        return await self.classifier.predict.remote(data)

    @api.post("/predict", response_model=PredictResponse, openapi_extra={"requestBody": _PREDICT_BODY},
              responses={code: {"model": ErrorResponse, "description": why} for code, why in PREDICT_ERRORS.items()})
    async def predict(self, request: Request):
        """Classify one image (multipart field `file`, or the raw bytes as the body)."""
        start = time.perf_counter()
        try:
            data = await self._image_bytes(request)
        except _BadRequest as exc:
            return _error(exc.status, str(exc))
        result = await self.classify(data)
        if "error" in result:
            return _error(_STATUS[result["reason"]], result["error"])
        return PredictResponse(**result, latency_ms=(time.perf_counter() - start) * 1000.0)

    @api.get("/healthz", response_model=HealthResponse,
             responses={503: {"model": ErrorResponse, "description": "the classifier has not answered yet"}})
    async def healthz(self):
        """OK once a classifier replica has answered: the router alone is up before the model is loaded."""
        if not self._classifier_seen:
            try:
                await asyncio.wait_for(self._ask_classifier(), timeout=1.0)
            except Exception as exc:  # any failure means "not ready yet"
                return _error(503, f"model not ready: the classifier did not answer ({type(exc).__name__})")
            self._classifier_seen = True
        return HealthResponse(model_version=self.info.model_version, model_name=self.info.model_name)

    async def _ask_classifier(self) -> None:
        await self.classifier.info.remote()

    @api.get("/models", response_model=ModelInfo)
    async def models(self) -> ModelInfo:
        return self.info


def build_app(model_path: str, *, model_version: str = "unknown", max_body_bytes: int = 10_000_000,
              max_image_pixels: int = 50_000_000, num_replicas: int = 1, max_batch_size: int = 8,
              batch_wait_timeout_s: float = 0.01, threads: int = 2, resources: dict | None = None,
              num_cpus: float = 1.0):
    """The Serve application for one model file: ``Router.bind(Classifier.bind(...), ...)``.

    The model file is loaded here once to validate it: a missing or malformed file raises
    ``CheckpointError`` now, naming the file, instead of failing replicas after deployment.
    ``resources`` (e.g. ``{"cloud": 0.01}``) adds Ray custom resources to the classifier's placement;
    by default it asks only for ``num_cpus``.
    """
    # Absolute: replicas do not share the caller's working directory. On a multi-node cluster the
    # path must reach the same file on the classifier's node (shared volume or baked into the image);
    # the replica checks the sha256 taken here.
    model_path = str(Path(model_path).resolve())
    model_info = read_model_info(model_path)
    actor_options: dict = {"num_cpus": num_cpus}
    if resources:
        actor_options["resources"] = dict(resources)
    classifier = Classifier.options(
        num_replicas=num_replicas,
        # Room for a full batch waiting while the previous one computes.
        max_ongoing_requests=2 * max_batch_size,
        ray_actor_options=actor_options,
    ).bind(model_path, model_version=model_version, max_image_pixels=max_image_pixels,
           max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s, threads=threads,
           sha256=file_sha256(model_path))
    router = Router.options(
        # The router only parses requests and awaits the classifier: many in flight, little CPU.
        max_ongoing_requests=max(64, 4 * max_batch_size * num_replicas),
        ray_actor_options={"num_cpus": 0.1},
    )
    return router.bind(classifier, model_info, model_version=model_version, max_body_bytes=max_body_bytes)


def app_builder(args: dict):
    """Application builder for ``serve run components.serve.app:app_builder model_path=...`` and
    RayService ``import_path``; ``args`` are ``build_app`` keyword arguments plus ``model_path``."""
    args = dict(args)
    return build_app(args.pop("model_path"), **args)


def _deploy_failure(name: str) -> str:
    """The exception line of each failed deployment of app ``name``, from Serve's status."""
    try:
        app_status = serve.status().applications.get(name)
    except Exception:  # status is best effort: the deploy error is raised anyway
        return ""
    if app_status is None:
        return ""
    lines = []
    for dep_name, dep in app_status.deployments.items():
        if dep.message and getattr(dep.status, "value", dep.status) != "HEALTHY":
            last = [ln for ln in dep.message.strip().splitlines() if ln.strip()][-1].strip()
            lines.append(f"{dep_name}: {last}")
    return "; ".join(lines)


def deploy(app, *, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
           name: str = "default") -> DeploymentHandle:
    """Start Serve's HTTP proxy on ``host:port`` (if Serve is not running yet) and deploy ``app``.

    When a replica cannot start, raises the replica's own error: ``CheckpointError`` for a model
    file problem, else ``RuntimeError`` with the reason; the failed application is deleted.
    """
    from components.models.checkpoint import CheckpointError

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    try:
        return serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as exc:
        reason = _deploy_failure(name)
        try:
            serve.delete(name)
        except Exception:
            pass
        marker = "CheckpointError: "
        if marker in reason:
            raise CheckpointError(f"deploying {name!r} failed: {reason.split(marker, 1)[1]}") from None
        raise RuntimeError(f"{exc} {reason}".strip()) from None


def run(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
        blocking: bool = True, name: str = "default", **build_kwargs) -> DeploymentHandle:
    """Build the app for ``model_path`` and serve it over HTTP on ``host:port`` (127.0.0.1 by default).

    Uses the Ray connection the caller made (``ray.init``), or starts a local Ray. A bad model
    file raises ``CheckpointError`` before anything is deployed. Returns the ingress handle when
    ``blocking`` is False; otherwise serves until Ctrl-C, then shuts Serve down.
    """
    app = build_app(model_path, **build_kwargs)  # validates the model file before touching Ray
    if not blocking:
        return deploy(app, host=host, port=port, route_prefix=route_prefix, name=name)
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (kill, Kubernetes) stops like Ctrl-C
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: _raise_interrupt())
    handle = None
    try:
        handle = deploy(app, host=host, port=port, route_prefix=route_prefix, name=name)
        prefix = "" if route_prefix in (None, "/") else route_prefix.rstrip("/")
        print(f"Serving {model_path} on http://{host}:{port}{prefix}/ (OpenAPI docs: {prefix}/docs). "
              "Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
    return handle


def _raise_interrupt():
    raise KeyboardInterrupt
