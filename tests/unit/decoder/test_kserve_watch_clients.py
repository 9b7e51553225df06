"""WatchClients when the HTTP server cancels a request (its shutdown grace ran out): a request with
no response yet gets the route's 503 instead of Uvicorn's bare 500; one whose app ends its response
on the way out (an SSE stream saying it was cut) is left to do so."""

import asyncio

from starlette.responses import JSONResponse

from memory3.services.decoder.http_clients import WatchClients

SCOPE = {"type": "http", "path": "/v1/completions", "client": ("10.0.0.7", 5000)}


def cut_reply(path: str) -> JSONResponse:
    return JSONResponse({"error": f"cut: {path}"}, status_code=503)


async def connected() -> dict:
    await asyncio.Event().wait()  # the client stays: no disconnect
    return {}


def served_until_cancelled(app) -> tuple[list[dict], BaseException | None]:
    """Run `app` behind WatchClients, cancel the request as Uvicorn does, and return what it sent
    and how the request's task ended (None: normally)."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> BaseException | None:
        middleware = WatchClients(app, watched=lambda path: True, cut_reply=cut_reply)
        request = asyncio.ensure_future(middleware(SCOPE, connected, send))
        await asyncio.sleep(0.05)
        request.cancel("Task cancelled, timeout graceful shutdown exceeded")
        await asyncio.wait({request})
        return asyncio.CancelledError() if request.cancelled() else request.exception()

    ended = asyncio.run(asyncio.wait_for(main(), 10))
    return sent, ended


def test_a_request_cut_before_its_response_gets_the_cut_reply():
    async def generating(scope, receive, send):
        await asyncio.Event().wait()

    sent, ended = served_until_cancelled(generating)
    assert ended is None  # answered: Uvicorn has nothing to report
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    assert sent[-1]["body"] == b'{"error":"cut: /v1/completions"}' and not sent[-1].get("more_body")


def test_a_response_the_app_ends_when_cut_is_kept():
    async def stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await send({"type": "http.response.body", "body": b"data: cut\n\n", "more_body": False})

    sent, ended = served_until_cancelled(stream)
    assert ended is None
    assert [m.get("status") for m in sent] == [200, None] and sent[-1]["body"] == b"data: cut\n\n"


def test_a_response_left_unfinished_is_the_server_s_to_close():
    async def stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await asyncio.Event().wait()

    sent, ended = served_until_cancelled(stream)
    assert isinstance(ended, asyncio.CancelledError)  # Uvicorn closes the connection
    assert [m.get("status") for m in sent] == [200, None]


def served(app, messages: list[dict], *, headers=(), max_body_bytes: int = 10) -> list[dict]:
    """Run `app` behind WatchClients with a client that sends `messages`, then stays."""
    sent: list[dict] = []
    pending = list(messages)

    async def receive() -> dict:
        return pending.pop(0) if pending else await connected()

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> None:
        middleware = WatchClients(app, watched=lambda path: True, max_body_bytes=max_body_bytes)
        await middleware({**SCOPE, "headers": list(headers)}, receive, send)

    asyncio.run(asyncio.wait_for(main(), 10))
    return sent


async def echo(scope, receive, send):
    """Reads the whole body, then answers it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_a_body_over_the_limit_is_answered_413_declared_or_as_it_arrives():
    """A body was buffered whole (and parsed into objects several times its size) before any limit looked."""
    called = []

    async def never(scope, receive, send):
        called.append(scope)

    declared = served(never, [], headers=[(b"content-length", b"11")])
    assert not called and declared[0]["status"] == 413
    assert b"the request body is over 0 MiB" in declared[-1]["body"]
    chunks = [{"type": "http.request", "body": b"123456", "more_body": True},
              {"type": "http.request", "body": b"78901", "more_body": False}]
    arriving = served(echo, chunks)  # no Content-Length: counted as it comes, the app cut at 11 bytes
    assert [m.get("status") for m in arriving] == [413, None]
    within = served(echo, [{"type": "http.request", "body": b"1234567890", "more_body": False}],
                    headers=[(b"content-length", b"10")])
    assert [m.get("status") for m in within] == [200, None] and within[-1]["body"] == b"1234567890"
