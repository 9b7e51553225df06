"""OpenAI-style `POST /v1/completions` and `/v1/chat/completions` on the KServe HTTP server, with
server-sent-event streaming.

The same routes are under `/openai/v1/`, beside `GET /openai/v1/models` in OpenAI's list format,
so that an OpenAI SDK pointed at `http://HOST:PORT/openai/v1` works whole: KServe itself answers
`GET /v1/models` with its v1 protocol's list, which the SDKs cannot read (KServe's own OpenAI
server uses the same `/openai/v1` prefix).

KServe's own OpenAI classes need vLLM, so this route is ours. It reads an OpenAI completion
request, validates it with the decoder's shared rules (validation.py), and relays the engine's
events either as one completion JSON or, with `"stream": true`, as `text/event-stream` chunks
`data: {...}` ending with `data: [DONE]`. Errors are OpenAI-shaped
(`{"error": {"message", "type", "param", "code"}}`) with the HTTP status of the domain error;
a request that fails before its first token gets that status, never a 200 stream.

Defaults follow OpenAI (temperature 1, top_p 1) except `max_tokens`, which defaults to the
server's `--default-max-tokens`. A prompt given as token ids is the text's ids: the context's `<s>`
is put before them, as before a text prompt (so `usage.prompt_tokens` counts one more).
Extensions: `top_k`, `use_memory` (default true) and
`include_reference_text`; replies carry `citations` (per 64-token chunk, the references read)
and `warnings` when there are any.

`POST /tokenize` and `/detokenize` answer as vLLM's do: a prompt's (or a chat's) token ids as the
engine reads them, with the context's leading `<s>` unless `add_special_tokens` is false, and the
text of token ids.

A chat request's messages become one prompt through the server's chat template (chat.py); without
one (`serve kserve --chat-template`), the chat route answers 400 and says how to set one. Its
replies are OpenAI's chat shapes: a `message` in a `chat.completion`, or `delta`s in
`chat.completion.chunk`s, the first of which names the assistant's role.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..rpc.errors import InvalidInput, NotFound
from .chat import ChatTemplate, chat_messages
from .engine import Citation, GenerationEngine, GenerationEvent, GenerationRequest
from .http_clients import client_id
from .http_errors import http_status
from .validation import build_request, detokenize, tokenize

log = logging.getLogger("memory3.decoder")

COMPLETIONS_PATHS = ("/v1/completions", "/openai/v1/completions")
CHAT_PATHS = ("/v1/chat/completions", "/openai/v1/chat/completions")
GENERATION_PATHS = COMPLETIONS_PATHS + CHAT_PATHS
MODELS_PATH = "/openai/v1/models"
TOKENIZE_PATH, DETOKENIZE_PATH = "/tokenize", "/detokenize"  # as vLLM's server has them
# OpenAI parameters this server does not implement: accepted only at their neutral values.
NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (), "suffix": ("",),
           "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},)}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "stream", "stream_options", "stop", "seed", "user",
         "top_k", "use_memory", "include_reference_text", *NEUTRAL}
CHAT_NEUTRAL = {"n": (1,), "logprobs": (False,), "top_logprobs": (), "presence_penalty": (0,),
                "frequency_penalty": (0,), "logit_bias": ({},), "tools": (), "tool_choice": ("none",),
                "parallel_tool_calls": (), "response_format": ({"type": "text"},)}
CHAT_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream",
              "stream_options", "stop", "seed", "user", "top_k", "use_memory", "include_reference_text",
              *CHAT_NEUTRAL}
STARTED = int(time.time())  # a model's `created`: when this server started
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
               503: "service_unavailable_error", 504: "timeout_error"}
CUT = "the server stopped this stream before it finished (it is shutting down); retry the request"


def add_completion_routes(app: FastAPI, current: Callable[[], GenerationEngine], model_name: str,
                          chat_template: ChatTemplate | None = None) -> None:
    """Register the routes; `current` returns the running engine or raises Unavailable."""

    def route(required: str, answer: Callable[[Request, dict, GenerationEngine], Awaitable[Response]]):
        """A POST route whose body is a JSON object (with at least `required`), for the running engine;
        every failure becomes an OpenAI-style error."""
        async def handle(request: Request) -> Response:
            try:
                return await answer(request, _json_object(await request.body(), required), current())
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-style error
                return error_response(exc)
        return handle

    async def completions(request: Request, body: dict, engine: GenerationEngine) -> Response:
        generation, stream, include_usage = await parse_completion(
            body, engine, model_name, client=client_id(request.headers, _host(request)))
        return await _answer(engine, generation, model_name, stream, include_usage, chat=False)

    async def chat_completions(request: Request, body: dict, engine: GenerationEngine) -> Response:
        if chat_template is None:
            raise InvalidInput("this server has no chat template, and the model was trained on plain text: "
                               "start it with --chat-template (qa, the format `memory3 train` teaches, or a "
                               "Jinja2 file), or send the prompt to /v1/completions")
        generation, stream, include_usage = await parse_chat(
            body, engine, model_name, chat_template, client=client_id(request.headers, _host(request)))
        return await _answer(engine, generation, model_name, stream, include_usage, chat=True)

    async def tokenize_route(_request: Request, body: dict, engine: GenerationEngine) -> Response:
        tokens = await tokenize_body(body, engine, model_name, chat_template)
        return JSONResponse({"count": len(tokens), "max_model_len": engine.max_seq_len, "tokens": tokens})

    async def detokenize_route(_request: Request, body: dict, engine: GenerationEngine) -> Response:
        _check_fields(body, {"model", "tokens"}, {})
        _check_model(body, engine, model_name)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidInput("tokens is required: a list of token ids")
        return JSONResponse({"prompt": await detokenize(engine, ids)})

    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": STARTED,
                                                         "owned_by": "memory3"}]})

    for paths, required, answer in [(COMPLETIONS_PATHS, "prompt", completions),
                                    (CHAT_PATHS, "messages", chat_completions),
                                    ((TOKENIZE_PATH,), "prompt", tokenize_route),
                                    ((DETOKENIZE_PATH,), "tokens", detokenize_route)]:
        for path in paths:
            app.add_api_route(path, route(required, answer), methods=["POST"])
    app.add_api_route(MODELS_PATH, models, methods=["GET"])


def _host(request: Request) -> str:
    return request.client.host if request.client is not None else ""


def error_response(exc: BaseException) -> JSONResponse:
    status, message = http_status(exc)
    if status == 500:
        log.error("completion failed", exc_info=exc)
    return JSONResponse(_error_body(status, message), status_code=status)


def _error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": status}}


def _json_object(raw: bytes, required: str) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"the body is not valid JSON ({e}); send a JSON object with at least \"{required}\"") from e
    if not isinstance(body, dict):
        raise InvalidInput(f"the body must be a JSON object with at least \"{required}\"")
    return body


async def parse_completion(body: dict, engine: GenerationEngine, model_name: str,
                           client: str = "") -> tuple[GenerationRequest, bool, bool]:
    """An OpenAI completion request as a validated engine request, whether to stream it, and whether
    the stream ends with a usage chunk (`stream_options.include_usage`); `client` is who asks, for the
    per-client stream limit (http_clients.client_id)."""
    _check_fields(body, KNOWN, NEUTRAL)
    _check_model(body, engine, model_name)
    prompt, token_ids = _prompt(body.get("prompt"))
    return await _request(body, engine, client, prompt=prompt, prompt_token_ids=token_ids,
                          max_tokens=_typed(body, "max_tokens", int, 0))


async def parse_chat(body: dict, engine: GenerationEngine, model_name: str, template: ChatTemplate,
                     client: str = "") -> tuple[GenerationRequest, bool, bool]:
    """`parse_completion` for a chat request: its messages through `template` make the prompt, and
    the template's stop strings are added to the request's."""
    _check_fields(body, CHAT_KNOWN, CHAT_NEUTRAL)
    _check_model(body, engine, model_name)
    prompt = template.render(chat_messages(body.get("messages")))
    max_tokens, newer = _typed(body, "max_tokens", int, 0), _typed(body, "max_completion_tokens", int, 0)
    if max_tokens and newer and max_tokens != newer:
        raise InvalidInput("max_tokens and max_completion_tokens differ: give one of them")
    return await _request(body, engine, client, prompt=prompt, max_tokens=newer or max_tokens,
                          extra_stop=template.stop)


async def tokenize_body(body: dict, engine: GenerationEngine, model_name: str,
                        chat_template: ChatTemplate | None) -> list[int]:
    """The token ids the engine would read for a `prompt`, or for chat `messages` through the chat
    template; `add_special_tokens` false leaves out the context's leading `<s>`, giving the ids a
    completion's token-id prompt takes."""
    _check_fields(body, {"model", "prompt", "messages", "add_special_tokens"}, {})
    _check_model(body, engine, model_name)
    if ("prompt" in body) == ("messages" in body):
        raise InvalidInput("give either prompt (text) or messages (a chat, through the chat template)")
    if "messages" in body:
        if chat_template is None:
            raise InvalidInput("this server has no chat template (--chat-template) to write messages as a prompt")
        prompt = chat_template.render(chat_messages(body["messages"]))
    else:
        prompt = _typed(body, "prompt", str, "")
    ids = await tokenize(engine, prompt)
    return ids if _typed(body, "add_special_tokens", bool, True) else ids[1:]


def _check_fields(body: dict, known: set[str], neutral_values: dict) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidInput(f"unknown field(s) {unknown}; this route takes {sorted(known)}")
    for name, neutral in neutral_values.items():
        value = body.get(name)
        if value is not None and not any(value == n and isinstance(value, bool) == isinstance(n, bool)
                                         for n in neutral):
            allowed = f" (only {neutral[0]!r})" if neutral else ""
            raise InvalidInput(f"{name} is not supported by this server{allowed}: leave it out")


def _check_model(body: dict, engine: GenerationEngine, model_name: str) -> None:
    model = _typed(body, "model", str, None)
    if model is not None and model not in (model_name, engine.release):
        raise NotFound(f"model {model!r} is not served here; this server serves {model_name!r} "
                       f"(release {engine.release!r})")


async def _request(body: dict, engine: GenerationEngine, client: str, *, prompt: str,
                   prompt_token_ids: list[int] | None = None, max_tokens: int,
                   extra_stop: tuple[str, ...] = ()) -> tuple[GenerationRequest, bool, bool]:
    """The fields both routes share, with the prompt each made: the engine request, whether to
    stream, and whether the stream ends with a usage chunk."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidInput("stop must be a string or a list of strings")
    stream = _typed(body, "stream", bool, False)
    include_usage = _include_usage(body.get("stream_options"), stream)
    request = await build_request(
        engine, prompt=prompt, prompt_token_ids=prompt_token_ids or (),
        temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
        top_k=_typed(body, "top_k", int, 0), max_tokens=max_tokens,
        stop=tuple(stop or ()), server_stop=extra_stop, seed=_typed(body, "seed", int, None),
        use_memory=_typed(body, "use_memory", bool, True),
        include_reference_text=_typed(body, "include_reference_text", bool, False), client_id=client)
    return request, stream, include_usage


def _include_usage(options, stream: bool) -> bool:
    """`stream_options`, as OpenAI reads it: null, or with a stream an object of `include_usage` and
    `include_obfuscation` (no padding is added to the chunks here, so it changes nothing)."""
    if options is None:
        return False
    if not stream:
        raise InvalidInput("stream_options is only allowed with \"stream\": true")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"} or \
            not all(isinstance(v, bool) for v in options.values()):
        raise InvalidInput('stream_options must be an object such as {"include_usage": true}')
    return options.get("include_usage", False)


def _prompt(value) -> tuple[str, list[int]]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return value, []
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return "", value
    if value is None:
        raise InvalidInput("prompt is required: a string, or a list of token ids")
    raise InvalidInput("prompt must be a string or a list of token ids; this server takes one prompt per request")


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"{name} must be {'an integer' if kind is int else f'a {kind.__name__}'}, got {value!r}")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number, got {value!r}")
    return float(value)


async def _answer(engine: GenerationEngine, request: GenerationRequest, model_name: str, stream: bool,
                  include_usage: bool, *, chat: bool) -> Response:
    if not stream:
        return JSONResponse(_chunk(request, model_name, await engine.complete(request), chat=chat))
    events = engine.generate(request)
    try:
        first = await anext(events, None)  # validation and capacity errors surface here, as HTTP errors
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(_sse(first, events, request, model_name, include_usage, chat=chat),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(first: GenerationEvent | None, events: AsyncIterator[GenerationEvent], request: GenerationRequest,
               model_name: str, include_usage: bool = False, *, chat: bool = False) -> AsyncIterator[str]:
    """Chunks as they come, then `data: [DONE]`; an error after the first chunk is sent as an error
    event first (the status line is gone), so that a client can tell a cut stream from a whole one.
    With `include_usage`, the last chunk before `[DONE]` has no choices and the usage, as OpenAI's."""
    try:
        event, sent = first, 0
        while event is not None:
            if event.text or event.citations or event.warnings or event.finish_reason is not None:
                # a chunk carries text, not token ids; a chat stream's first names the role
                chunk = _chunk(request, model_name, event, chat=chat, delta=True, first=not sent)
                if include_usage:  # the usage goes in the last chunk alone, as OpenAI's
                    chunk.pop("usage", None)
                yield _data(chunk)
                sent += 1
            if event.finish_reason is not None and include_usage:
                yield _data({**_head(request, model_name, chat=chat, delta=True), "choices": [],
                             "usage": _usage(event)})
            event = await anext(events, None)
    except asyncio.CancelledError:
        # The server cut the request: it is stopping and its grace ran out. (A client that hung up
        # is cancelled too, and reads nothing more.) The stream still ends as a stream does.
        yield _data(_error_body(503, CUT))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
        status, message = http_status(exc)
        if status == 500:
            log.error("completion stream failed", exc_info=exc)
        yield _data(_error_body(status, message))
    finally:
        await events.aclose()  # a client that hung up cancels its stream and frees its slot
    yield "data: [DONE]\n\n"


def _head(request: GenerationRequest, model_name: str, *, chat: bool = False, delta: bool = False) -> dict:
    kind = ("chat.completion.chunk" if delta else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id}", "object": kind,
            "created": int(time.time()), "model": model_name}


def _chunk(request: GenerationRequest, model_name: str, event: GenerationEvent, *, chat: bool = False,
           delta: bool = False, first: bool = False) -> dict:
    """A completion (`delta`: a stream's chunk) of `event`'s text, in the shape of its route."""
    if not chat:
        choice = {"index": 0, "text": event.text}
    elif delta:
        choice = {"index": 0, "delta": {**({"role": "assistant"} if first else {}),
                                        **({"content": event.text} if event.text or first else {})}}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": event.text}}
    chunk = {**_head(request, model_name, chat=chat, delta=delta),
             "choices": [{**choice, "logprobs": None, "finish_reason": event.finish_reason}]}
    if event.citations:
        chunk["citations"] = [citation_json(c) for c in event.citations]
    if event.warnings:
        chunk["warnings"] = list(event.warnings)
    if event.finish_reason is not None:
        chunk["usage"] = _usage(event)
    return chunk


def _usage(event: GenerationEvent) -> dict:
    u = event.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens, "retrievals": u.retrievals,
            "memories_read": u.memories_read}


def citation_json(c: Citation) -> dict:
    """A citation as plain JSON: the chunk, whether it was generated text, and the references read."""
    return {"chunk_index": c.chunk_index, "generated": c.generated,
            "references": [{"id": r.id, "score": r.score, **({"text": r.text} if r.text else {})}
                           for r in c.references]}


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
