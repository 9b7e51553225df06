"""A client that leaves an OpenAI stream frees its batch rows at once, whenever it leaves: the routes
run behind WatchClients, as the KServe server runs them, over a connection driven by hand."""

import asyncio
import json

import pytest
from fastapi import FastAPI

from memory3.services.decoder.engine import EngineConfig, GenerationEngine
from memory3.services.decoder.http_clients import WatchClients
from memory3.services.decoder.kserve_model import generation_path
from memory3.services.decoder.openai_routes import add_completion_routes


def hang_up(model, codec, body: dict, *, leave_after: str) -> tuple[int, list[dict]]:
    """Stream `body`, hang up once the server sends a message of type `leave_after` (while that send
    is still being written: the connection stalls), and return the streams the engine still holds
    right after the request ended, and what was sent."""
    sent: list[dict] = []

    async def main():
        engine = GenerationEngine(model, codec, None, EngineConfig(max_batch=4))
        await engine.start()
        app = FastAPI()
        add_completion_routes(app, lambda: engine, "memory3")
        gone = asyncio.Event()
        messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == leave_after:
                gone.set()
                await asyncio.Event().wait()  # a stalled write: only a cancel ends it

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("10.0.0.7", 5000), "server": ("decoder", 80)}
        try:
            await asyncio.wait_for(WatchClients(app, watched=generation_path)(scope, receive, send), 30)
            return engine.accepted
        finally:
            await engine.close()

    return asyncio.run(main()), sent


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_leaves_while_the_headers_are_written_frees_its_rows(tiny_model, text_codec, n):
    """Cancelled in the headers' write, the reply's body was never started, and nothing closed its
    streams: they generated to max_tokens for nobody."""
    body = {"prompt": "The harbour of Yelbury", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "use_memory": False, "n": n}
    held, sent = hang_up(tiny_model, text_codec, body, leave_after="http.response.start")
    assert sent[0]["status"] == 200 and len(sent) == 1
    assert held == 0


def test_a_client_that_leaves_mid_stream_frees_its_rows(tiny_model, text_codec):
    body = {"prompt": "The harbour of Yelbury", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "use_memory": False, "n": 2}
    held, sent = hang_up(tiny_model, text_codec, body, leave_after="http.response.body")
    assert sent[-1]["body"].startswith(b"data: {")
    assert held == 0


def test_a_reply_cancelled_again_while_it_closes_still_closes_its_streams():
    """A hang-up cancels the reply, and the server's shutdown cancels it again while its body closes:
    the streams are closed all the same."""
    from memory3.services.decoder.openai_routes import _EventStream

    closed = []

    async def body():
        try:
            yield "data: {}\n\n"
        finally:
            await asyncio.sleep(0.05)  # closing takes a while (the streams' own closing)

    async def closing():
        closed.append(True)

    async def main():
        async def send(message):
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # a stalled write

        async def receive():
            await asyncio.Event().wait()

        reply = asyncio.ensure_future(_EventStream(body(), closing=closing)(
            {"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send))
        await asyncio.sleep(0.02)
        reply.cancel()  # the hang-up
        await asyncio.sleep(0.01)
        reply.cancel()  # the shutdown, while the body closes
        await asyncio.wait({reply})
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert closed == [True]
