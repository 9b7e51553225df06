"""What the decoder's HTTP doors (KServe v2 REST, OpenAI-style routes) know of their clients.

Who is asking, for the per-client stream limit: the `x-client-id` header, as the gRPC door reads
the metadata of that name, else the client's host. And whether the client is still there: Uvicorn
and Starlette cancel nothing when a client hangs up, so a non-streamed completion or v2 inference
would generate to `max_tokens` for nobody, holding its batch slot, and so would a stream still
waiting for its first token. `WatchClients` runs each generation request as a task of its own and
cancels it when its client leaves; the engine's stream then frees its slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

from .servicer import CLIENT_ID_HEADER, MAX_CLIENT_ID_CHARS

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]

# The most a generation request's body may hold: prompts are at most 64 KiB of text each, a batch of
# them a few MiB. A body was read whole, then parsed into objects several times its size, before any
# limit looked at it: a few bodies of gigabytes put the pod, and every stream on its GPU, out of memory.
MAX_BODY_BYTES = 16 << 20

# The host of the HTTP client whose request this task serves ("": none, e.g. a gRPC call). KServe
# hands a model the request's headers only; WatchClients sets this for the request's task.
CLIENT_HOST: ContextVar[str] = ContextVar("memory3_http_client_host", default="")


def client_id(headers: Mapping[str, str], host: str) -> str:
    """Who is asking, for the per-client stream limit: the `x-client-id` header (set it at the
    ingress, which the server then sees as the client), else the client's host."""
    given = headers.get(CLIENT_ID_HEADER)
    if isinstance(given, str) and given.strip():
        return given.strip()[:MAX_CLIENT_ID_CHARS]
    return host


class WatchClients:
    """ASGI middleware for the generation routes: each request runs as a task of its own, which is
    cancelled when its client hangs up, and knows its client's host (CLIENT_HOST).

    The middleware is the only reader of the connection's `receive`: it passes the body on to the
    app, and on `http.disconnect` before the response is complete it cancels the app. When the
    server cancels the request (a shutdown whose grace ran out), the app is cancelled too and may
    end its response first: an SSE stream then says it was cut. A request that had no response
    yet gets `cut_reply(path)`, a 503 its client can tell from a failure and retry elsewhere
    (Uvicorn's own answer is a bare 500).
    """

    def __init__(self, app: ASGIApp, *, watched: Callable[[str], bool],
                 cut_reply: Callable[[str], ASGIApp] | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        """A body over `max_body_bytes` (declared, or as it arrives) is answered 413, the app cancelled."""
        self.app = app
        self.watched = watched
        self.cut_reply = cut_reply
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.watched(scope["path"]):
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_body_bytes:
            await _too_large(send, self.max_body_bytes)
            return
        client = scope.get("client")
        CLIENT_HOST.set(client[0] if client else "")
        response = _ResponseState(send)
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        app = asyncio.ensure_future(self.app(scope, inbox.get, response.send))
        try:
            if await _forward_until_disconnect(receive, inbox, app, self.max_body_bytes):
                await _cancel(app)
                if not response.started:
                    await _too_large(response.send, self.max_body_bytes)
                return
            if not app.done() and not response.complete:
                app.cancel()  # the client hung up: stop generating for it
            await asyncio.wait({app})
        except asyncio.CancelledError:  # the server is stopping: the app may still end its response
            await _cancel(app)
            if not response.started and self.cut_reply is not None:
                await self.cut_reply(scope["path"])(scope, inbox.get, response.send)
            if not response.complete:
                raise
            return  # answered: nothing is left for the server's cancellation to stop
        except BaseException:
            await _cancel(app)
            raise
        if not app.cancelled():
            app.result()  # the app's own failure, for the server to report


async def _cancel(app: asyncio.Future) -> None:
    app.cancel()
    await asyncio.wait({app})


class _ResponseState:
    """The app's `send`, noting when the response is complete: a disconnect after that is the
    connection's end, not a client giving up."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.complete = False

    async def send(self, message: Message) -> None:
        self.started = True
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True


def _declared_length(scope: dict) -> int:
    """The body's Content-Length (0: none, or not a number: the bytes are counted as they come)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 0


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"error": {"message": f"the request body is over {limit >> 20} MiB: send less (a prompt is at "
                                            "most 64 KiB of text)", "type": "invalid_request_error", "param": None,
                                 "code": 413}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _forward_until_disconnect(receive: Receive, inbox: asyncio.Queue[Message], app: asyncio.Future,
                                    max_body_bytes: int) -> bool:
    """Pass the client's messages on to the app until the app ends or the connection does; True when
    the body went over `max_body_bytes` (the rest is not read)."""
    body_bytes = 0
    while not app.done():
        receiving = asyncio.ensure_future(receive())
        try:
            done, _ = await asyncio.wait({app, receiving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receiving.done():
                receiving.cancel()
        if receiving not in done:
            return False
        message = receiving.result()
        body_bytes += len(message.get("body", b"")) if message["type"] == "http.request" else 0
        if body_bytes > max_body_bytes:
            return True
        inbox.put_nowait(message)
        if message["type"] == "http.disconnect":
            return False
    return False
