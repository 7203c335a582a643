"""``resops edge``: the edge runtime that runs on the device next to the camera.

An industrial PC or a Jetson on a factory network gets the promoted int8 ONNX edge model and its
calibration (the bundle the ``calibrate`` stage writes to ``models/serve/edge/``), answers
confident inputs itself, escalates the rest over HTTP to the cloud app (``/predict?mode=cloud``)
and, when the cloud is unreachable or slow, answers locally (``degraded: true``) and keeps the
input in a bounded on-disk queue that it resends once the cloud answers again.

It needs onnxruntime, numpy, Pillow and FastAPI/uvicorn/httpx only: no Ray, no torch, no
OpenCV (``requirements-edge.lock``). Nothing here imports them.
"""
