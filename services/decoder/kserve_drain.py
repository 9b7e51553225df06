"""SIGTERM for `serve kserve`: drain the model first, then let KServe stop its servers.

KServe's ModelServer lets Uvicorn take SIGTERM and SIGINT: Uvicorn closes the HTTP listener and
waits for the requests in flight, and only then re-raises the signal to KServe, which stops the
gRPC server and tells the model (`Model.stop`). Meanwhile v2 gRPC said ready and took new
requests, HTTP probes found no listener, and requests queued for a batch row waited for the
grace period's end, to be cut with a bare 500.

`DrainFirstModelServer` takes the signal before Uvicorn, as our gRPC services do
(services/rpc/server.py): the model turns not ready, refuses new requests and fails the queued
ones with UNAVAILABLE/503 at once, the running streams finish, and then Uvicorn gets the signal,
with what is left of the one grace period (`--grace`) for it and for the gRPC server. A second
signal ends the wait: the servers stop at once, cutting what still runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
from typing import Protocol

import kserve
import uvicorn

log = logging.getLogger("memory3.decoder")


class DrainingModel(Protocol):
    def stop(self) -> None:
        """Turn not ready, refuse new requests, fail the queued ones; the running ones go on."""

    async def drained(self) -> None:
        """Return once the running requests ended."""


class DrainFirstModelServer(kserve.ModelServer):
    """KServe's ModelServer (one HTTP worker) whose SIGTERM/SIGINT drains the model before its
    servers stop, within one grace period."""

    def __init__(self, model: DrainingModel, *, grace_s: float, **kwargs) -> None:
        super().__init__(grace_period=max(1, math.ceil(grace_s)), **kwargs)
        self.model = model
        self.grace_s = grace_s
        self._uvicorn: uvicorn.Server | None = None
        self._forward = None  # Uvicorn's signal handler
        self._drain: asyncio.Task | None = None  # held: the loop keeps only a weak reference to a task
        self._cut: asyncio.Event | None = None
        self._draining = self._forwarded = self._stopped = False

    def register_signal_handler(self) -> None:
        """KServe's handlers (they run once Uvicorn is done), and ours in place of Uvicorn's, which
        Uvicorn installs when it starts serving: it looks up `handle_exit` on its server then."""
        super().register_signal_handler()
        http = getattr(self._rest_server, "_server", None)
        if not isinstance(http, uvicorn.Server):
            raise RuntimeError("this KServe version runs its HTTP server otherwise: serve kserve cannot drain "
                               "its engine before the servers stop (see services/decoder/kserve_drain.py)")
        self._uvicorn, self._forward = http, http.handle_exit
        http.handle_exit = self._on_signal

    def stop(self, sig: int) -> None:
        """KServe's stop (the gRPC server, then the models), once: Uvicorn re-raises each signal it
        was given, and KServe would unload the model again, which raises."""
        if not self._stopped:
            self._stopped = True
            super().stop(sig)

    def _on_signal(self, sig: int, frame) -> None:
        """In the signal handler: begin the drain; a second signal ends it, a third lets Uvicorn's
        shutdown skip its wait."""
        name = signal.Signals(sig).name
        if self._forwarded:
            self._uvicorn.force_exit = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving: nothing to drain
            self._forwarded = True
            self._forward(sig, frame)
            return
        if self._draining:
            log.info("%s again: stopping the servers now", name)
            loop.call_soon_threadsafe(self._cut_short)
            return
        self._draining = True
        log.info("%s: not ready; draining for up to %gs before the servers stop", name, self.grace_s)
        loop.call_soon_threadsafe(self._begin_drain, sig)

    def _begin_drain(self, sig: int) -> None:
        self._cut = asyncio.Event()
        self._drain = asyncio.ensure_future(self._drain_then_stop(sig))
        self._drain.add_done_callback(_log_failure)

    def _cut_short(self) -> None:
        if self._cut is not None:
            self._cut.set()

    async def _drain_then_stop(self, sig: int) -> None:
        """The servers stop whatever happens here: a failed drain must not keep the process up."""
        left = 0.0
        try:
            left = await self._drain_model()
        finally:
            self._stop_servers(sig, left)

    async def _drain_model(self) -> float:
        """Stop the model and wait for its running requests, at most the grace period (or until a
        second signal); return what is left of it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        self.model.stop()
        drained = asyncio.ensure_future(self.model.drained())
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait({drained, cut}, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished = drained.done() and not drained.cancelled()
            for waiting in (drained, cut):
                waiting.cancel()
        if finished:
            drained.result()
            log.info("drained; stopping the servers")
            return max(0.0, deadline - loop.time())
        log.info("stopping the servers; the requests still running are cut")
        return 0.0

    def _stop_servers(self, sig: int, grace_s: float) -> None:
        """Hand the signal to Uvicorn, whose shutdown then KServe's gRPC stop get `grace_s` each:
        what they wait for is what the drain left running, nothing unless it was cut short."""
        self._forwarded = True
        self._rest_server.config.timeout_graceful_shutdown = grace_s
        if self._grpc_server is not None:
            self._grpc_server._grace_period = grace_s
        self._forward(sig, None)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the drain failed", exc_info=task.exception())
