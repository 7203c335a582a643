"""The HTTP side of ``POST /predict``: reading, checking and answering requests.

Shared by the Ray Serve router (``components.serve.app``) and the edge runtime on the device
(``components.edge``), so both accept the same inputs and refuse malformed ones with the same
status and message. Needs FastAPI/Starlette, numpy and Pillow only: no Ray, no torch.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
import time
import warnings

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.data.images import ImageDecodeError
from components.http.schema import MODES

UNDECODABLE, TOO_LARGE, TOO_SMALL, UNSUPPORTED = "undecodable", "too_large", "too_small", "unsupported"
DEFAULT_MAX_BODY_BYTES = 10_000_000  # serve.max_body_bytes
STATUS_OF_REASON = {UNDECODABLE: 415, TOO_LARGE: 413, TOO_SMALL: 422, UNSUPPORTED: 501}
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")


class ImageTooLargeError(ImageDecodeError):
    """The image header declares more pixels than allowed; raised before any pixel is decoded."""


class ImageTooSmallError(ImageDecodeError):
    """The image is smaller than the smallest side a classifier can say anything about."""


def check_image_header(data: bytes, max_pixels: int, min_side: int = 1) -> None:
    """Refuse images whose header declares more than ``max_pixels`` pixels (or PIL's own bomb limit)
    or a side shorter than ``min_side``.

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
    if min(w, h) < min_side:
        raise ImageTooSmallError(f"image is {w}x{h} pixels; its shorter side must be at least {min_side}")


def decode_error(exc: ImageDecodeError) -> dict:
    """``{"error", "reason"}`` of an image that cannot be used (the reason maps to a status)."""
    reason = (TOO_LARGE if isinstance(exc, ImageTooLargeError) else TOO_SMALL if isinstance(exc, ImageTooSmallError)
              else UNDECODABLE)
    return {"error": str(exc), "reason": reason}


class BadRequest(Exception):
    """A request refused before any model runs: its status code and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


def refused(exc: BadRequest) -> JSONResponse:
    return error(exc.status, str(exc), {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


def install_error_handlers(api: FastAPI) -> None:
    """Every framework error (404, 405, validation) answers ``{"error": ...}`` like the app's own."""

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()))


PREDICT_BODY = {
    "required": True,
    "description": "an image (multipart field `file`, or the raw encoded bytes as the body), or a JSON batch "
                   "{\"images\": [base64, ...], \"mode\": \"cascade\", \"threshold\": 0.6}",
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
            "mode": {"type": "string", "enum": list(MODES)},
            "threshold": {"type": "number", "minimum": 0, "maximum": 1}}}},
    },
}
PREDICT_PARAMS = [
    {"name": "mode", "in": "query", "required": False, "schema": {"type": "string", "enum": list(MODES)},
     "description": "edge | cloud | cascade (default: the app's default_mode)"},
    {"name": "threshold", "in": "query", "required": False,
     "schema": {"type": "number", "minimum": 0, "maximum": 1},
     "description": "cascade only: escalate when the edge's calibrated confidence is below this "
                    "(default: the calibrated threshold)"},
]


def answer(results: list[dict], ctype: str, start: float, one, batch):
    """The HTTP answer to one image (``one(**result)``) or a JSON batch (``batch(predictions=...)``);
    the first image error becomes its status code, naming the image of a batch."""
    for i, result in enumerate(results):
        if "error" in result:
            where = f"images[{i}]: " if ctype == "application/json" else ""
            return error(STATUS_OF_REASON[result["reason"]], where + result["error"])
    if ctype == "application/json":
        return batch(predictions=[one(**r) for r in results], latency_ms=(time.perf_counter() - start) * 1000.0)
    return one(**results[0])


def parse_mode(value, default: str) -> str:
    if value is None or value == "":
        return default
    if value not in MODES:
        raise BadRequest(422, f"mode must be one of {', '.join(MODES)}, got {value!r}")
    return value


def parse_threshold(value, default: float, name: str = "threshold") -> float:
    if value is None or value == "":
        return default
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise BadRequest(422, f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= t <= 1.0:  # also refuses NaN
        raise BadRequest(422, f"{name} must be a number in [0, 1], got {value!r}")
    return t


def b64decode(text, index: int) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(400, f"images[{index}] must be a base64 string, not {type(text).__name__}")
    if text.startswith("data:"):  # data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(400, f"images[{index}] is not valid base64: {exc}") from None
    if not data:
        raise BadRequest(400, f"images[{index}] is empty")
    return data


class RequestReader:
    """Reads the images of a request under the app's limits and checks its bearer token.

    The token never sits in a config file: the app is given the name of an environment variable
    (a Kubernetes Secret on a cluster), read where the app runs.
    """

    def __init__(self, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_batch_images: int = 64,
                 auth_token: str | None = None, auth_token_env: str | None = None):
        self.max_body_bytes, self.max_batch_images = int(max_body_bytes), int(max_batch_images)
        token = auth_token or (os.environ.get(auth_token_env) if auth_token_env else None)
        self._token = token.encode() if token else None

    def authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise BadRequest(401, "missing or invalid bearer token: send 'Authorization: Bearer <token>'")

    async def body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                raise BadRequest(400, f"invalid Content-Length header {declared!r}") from None
            if declared_n > self.max_body_bytes:
                raise BadRequest(413, f"request body of {declared_n} bytes is above the limit of "
                                      f"{self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # the real size: Content-Length may be absent (chunked) or lie
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BadRequest(413, f"request body is above the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    async def multipart_file(request: Request, body: bytes) -> bytes:
        sent = False

        async def replay() -> dict:  # parse the form from the bytes already read and size-checked
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive=replay).form(max_files=1, max_fields=16)
        except StarletteHTTPException as exc:
            raise BadRequest(400, f"malformed multipart/form-data body: {exc.detail}") from None
        try:
            upload = form.get("file")
            if upload is None:
                raise BadRequest(422, "multipart/form-data request has no 'file' field; "
                                      f"fields present: {sorted(form.keys())}")
            if not isinstance(upload, UploadFile):
                raise BadRequest(422, "multipart field 'file' must be a file upload, not a text value")
            data = await upload.read()
        finally:
            await form.close()
        if not data:
            raise BadRequest(400, "uploaded file 'file' is empty")
        return data

    def json_batch(self, body: bytes, fields: tuple[str, ...] = ("mode", "threshold")) -> tuple[list[bytes], dict]:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(400, f"malformed JSON body: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
            raise BadRequest(422, 'JSON body must be an object {"images": [base64, ...]}')
        images = doc["images"]
        if not images:
            raise BadRequest(422, "'images' is empty")
        if len(images) > self.max_batch_images:
            raise BadRequest(413, f"{len(images)} images in one request, above the limit of "
                                  f"{self.max_batch_images}")
        unknown = sorted(set(doc) - {"images", *fields})
        if unknown:
            raise BadRequest(422, f"unknown JSON fields {unknown}; allowed: {', '.join(('images', *fields))}")
        return [b64decode(s, i) for i, s in enumerate(images)], doc

    async def images(self, request: Request,
                     fields: tuple[str, ...] = ("mode", "threshold")) -> tuple[list[bytes], str, dict]:
        """The image(s) of a /predict or /detect request: (images, content type, JSON fields or {})."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not (ctype in ("multipart/form-data", "application/json")
                          or ctype.startswith(RAW_CONTENT_TYPES)):
            raise BadRequest(415, f"unsupported content type {ctype!r}: send an image (image/*, "
                                  "application/octet-stream), multipart/form-data with field 'file', or "
                                  'application/json {"images": [base64, ...]}')
        body = await self.body(request)
        if not body:
            raise BadRequest(400, "empty request body: send an image as the body, as multipart field 'file', "
                                  'or a JSON batch {"images": [base64, ...]}')
        if ctype == "application/json":
            images, doc = self.json_batch(body, fields)
            return images, ctype, doc
        return [await self.multipart_file(request, body) if ctype == "multipart/form-data" else body], ctype, {}
