"""Progress bars with rate and ETA on a terminal (tqdm); nothing extra where output is a log.

Every long loop keeps its plain lines (one per epoch or stage): CI logs and ``dvc repro`` logs read
the same whether or not a person watches. On a terminal a tqdm bar is drawn as well, on stderr.
``RESOPS_PROGRESS`` decides: ``auto`` (the default: a bar when stderr is a terminal), ``on`` or ``off``.

Loops that run in Ray workers (training epochs of Ray Train, the GAN) have no terminal: the driver
draws their bar (:class:`RemoteBar`), fed through a small Ray actor the workers post to.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Iterable

from tqdm import tqdm

ENV = "RESOPS_PROGRESS"
_MODES = {"auto": None, "on": True, "1": True, "true": True, "off": False, "0": False, "false": False}


def enabled(stream=None) -> bool:
    """Whether to draw bars: ``RESOPS_PROGRESS`` (on | off), else whether ``stream`` (stderr) is a terminal."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"{ENV} must be auto, on or off, got {mode!r}")
    if _MODES[mode] is not None:
        return bool(_MODES[mode])
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr when :func:`enabled`, else a disabled one (iterating it costs nothing)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), file=sys.stderr,
                dynamic_ncols=True, leave=True, **kwargs)


class _Board:
    """A Ray actor holding the latest progress a worker posted: a fraction in [0, 1] and a short text."""

    def __init__(self) -> None:
        self.fraction, self.text, self.closed = 0.0, "", False

    def post(self, fraction: float, text: str = "") -> None:
        self.fraction, self.text = max(self.fraction, min(1.0, float(fraction))), str(text)

    def read(self) -> tuple[float, str]:
        return self.fraction, self.text


class RemoteBar:
    """A driver-side bar for work that runs in Ray workers.

    ``with RemoteBar("train") as board:`` gives ``board``: None when bars are off (the workers then
    post nothing), else an actor handle to pass to the workers, which call
    ``post(board, fraction, text)``. The driver redraws every ``interval_s`` seconds until the block
    ends; tqdm shows the elapsed time, the rate and the ETA of the fraction done.
    """

    def __init__(self, desc: str, interval_s: float = 0.5) -> None:
        self.desc, self.interval_s = desc, interval_s
        self.board = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if not enabled():
            return None
        import ray

        self.board = ray.remote(num_cpus=0)(_Board).remote()
        self._bar = bar(total=100, desc=self.desc, unit="%",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        self._thread = threading.Thread(target=self._poll, name=f"progress-{self.desc}", daemon=True)
        self._thread.start()
        return self.board

    def _poll(self) -> None:
        import ray

        while True:
            stopping = self._stop.wait(self.interval_s)
            try:
                fraction, text = ray.get(self.board.read.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - the bar is cosmetic; the run decides success
                fraction, text = None, ""
            if fraction is not None:
                self._bar.n = round(100 * fraction, 1)
                self._bar.set_postfix_str(text, refresh=False)
                self._bar.refresh()
            if stopping:
                return

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        if exc_type is None:  # the work finished: the last post may predate its last steps
            self._bar.n = 100
            self._bar.refresh()
        self._bar.close()
        import ray

        ray.kill(self.board)


def post(board, fraction: float, text: str = ""):
    """From a worker: tell the driver's :class:`RemoteBar` how far the run is. Fire and forget: the
    returned reference need not be waited on (None when there is no board)."""
    return board.post.remote(fraction, text) if board is not None else None
