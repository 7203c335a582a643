"""Real servers for tests on 127.0.0.1: an ASGI app under uvicorn in a thread, and a TCP relay that
can be cut (the process behind it looks dead: connections refused) or made to hang (a cloud that
accepts and never answers), without touching the server behind it."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from conftest import free_port


@contextlib.contextmanager
def uvicorn_server(app, timeout: float = 30.0):
    """Serve ``app`` on a free loopback port in a thread (lifespan on); yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive(), "uvicorn exited before it started"
        assert time.monotonic() < deadline, f"uvicorn did not start within {timeout:g} s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


class TcpRelay:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``. ``cut()`` closes the listener and every
    open connection (the next connect is refused), ``restore()`` listens again on the same port,
    ``hang = True`` accepts connections and forwards nothing (open connections included)."""

    def __init__(self, target: int):
        self.target, self.port, self.hang = target, free_port(), False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = None
        self._writers: set = set()
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def restore(self) -> None:
        async def start():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._call(start())

    def cut(self) -> None:
        async def stop():
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            for w in list(self._writers):
                w.close()
            self._writers.clear()
        self._call(stop())

    async def _handle(self, reader, writer):
        self._writers.add(writer)
        if self.hang:
            await reader.read()  # until the client gives up and closes
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)

        async def pipe(src, dst):
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if self.hang:  # swallowed: the other side waits for an answer that never comes
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def assert_docs_are_local(client, prefix: str = ""):
    """/docs and /redoc reference no remote script, stylesheet or icon, and every asset they name is served."""
    import re

    for page in ("/docs", "/redoc"):
        r = client.get(prefix + page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text)
        assert any(ref.endswith(".js") for ref in refs), refs
        for ref in refs:
            assert not re.match(r"^(https?:)?//", ref), f"{page} loads {ref} from the network"
            assert client.get(ref).status_code == 200, ref
    assert client.get(prefix + "/openapi.json").json()["paths"]

