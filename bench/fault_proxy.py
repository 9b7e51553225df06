"""A TCP proxy on 127.0.0.1 that can slow a server down: injected latency for fault tests.

Put it in front of the S3 server and point the services at it; `delay_s` then holds every chunk a
client sends (an HTTP request, in practice) for that long before it reaches the server, and
`bytes_per_s` (0: no limit) paces each direction as a link of that bandwidth would. When the
server behind it is down, the proxy accepts and closes at once, as a load balancer in front of a
dead backend does. Loopback only, in a daemon thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

_LOOPBACK = ("127.0.0.1", "localhost")


class DelayProxy:
    def __init__(self, target_host: str, target_port: int, *, delay_s: float = 0.0, bytes_per_s: float = 0.0) -> None:
        if target_host not in _LOOPBACK:
            raise ValueError(f"the fault proxy only forwards to loopback, not {target_host!r}")
        self.target = (target_host, target_port)
        self.delay_s = delay_s  # read per chunk: change it at any time
        self.bytes_per_s = bytes_per_s
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DelayProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="memory3-delay-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the delay proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return

        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._server = None

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, server_writer, delayed=True),
                             self._pipe(server_reader, client_writer, delayed=False))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool) -> None:
        try:
            while chunk := await reader.read(1 << 16):
                if delayed and self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                writer.write(chunk)
                await writer.drain()
                if self.bytes_per_s > 0:
                    await asyncio.sleep(len(chunk) / self.bytes_per_s)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()
