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
Extensions: `top_k`, `use_memory` (default true), `include_reference_text`, and vLLM's `ignore_eos`
(always `max_tokens`, for benchmarks), `stop_token_ids` (a stop token is counted but not in the text, as
vLLM's default), `min_tokens` (no end-of-sequence token, stop token or client's stop string ends a
choice before that many tokens; a chat template's turn end does) and `prompt_logprobs` (not with a
stream: per prompt token, None for the context's `<s>`, the token's logprob, vocabulary rank and text
and its most likely alternatives', on a completion's choices and a chat reply; `<s>` comes first for a
token-id prompt too, where vLLM adds none, so the list has one entry more than the ids; with
`max_tokens` 0 the prompt alone is scored; with memory, a scored prompt reads memories as README.md's
prompt scoring says, so what follows may differ from the unscored prompt's; each choice of `n`
scores the prompt again); replies carry
`citations` (per 64-token chunk, the references it retrieved, with the `index` of the choice) and
`warnings` when there are any.

A completion's prompt may be a batch, a list of texts or of token-id lists, as OpenAI's. `n` choices
of each prompt are as many streams of the engine, decoded side by side, prompt p's choice j being
choice p·n + j (with a seed, choice j draws with seed + j). A reply's `usage` counts each prompt once
and every choice's tokens; streamed, each chunk
carries one choice's `index`, each choice's last chunk that choice's own usage, and with
`include_usage` a last chunk the whole request's. A stream of one choice starts with its first token,
so that what fails before it is the reply's status; of several, once each is queued for a batch row
(a choice may wait for another's row), after which a failure is an error event. `presence_penalty`,
`frequency_penalty` and `logit_bias` are OpenAI's, applied before temperature and the filters.
`logprobs` (a completion's number, or a chat's `logprobs` with `top_logprobs`) reports the model's own
log-probabilities, before those adjustments (as vLLM's default does), for the tokens of each chunk; a
completion's `top_logprobs` hold the sampled token too, a token that is part of a character is named
by its bytes, `bytes:\\xe6`, and the end-of-sequence token that ends a choice is reported too (no
text), as vLLM reports them. A completion's `echo` puts the prompt before each
choice's text, and with `logprobs` its tokens' logprobs (every prompt token after the context's `<s>`)
before the choice's, as lm-evaluation-harness's `local-completions` asks for a loglikelihood (with
`max_tokens` 1, the generated token dropped); with `max_tokens` 0 nothing is generated: the prompt
alone, scored. `best_of` is taken only equal to `n`; `suffix` is not
supported.

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
import codecs
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from memory3.model.tokenizer import TextCodec

from ..rpc.errors import InvalidInput, NotFound, shown
from .chat import ChatTemplate, chat_messages
from .engine import Citation, GenerationEngine, GenerationEvent, GenerationRequest, TokenLogprob
from .http_clients import client_id
from .http_errors import http_status
from .validation import INT64_MIN, build_request, detokenize, finite_float, tokenize

log = logging.getLogger("memory3.decoder")

COMPLETIONS_PATHS = ("/v1/completions", "/openai/v1/completions")
CHAT_PATHS = ("/v1/chat/completions", "/openai/v1/chat/completions")
GENERATION_PATHS = COMPLETIONS_PATHS + CHAT_PATHS
MODELS_PATH = "/openai/v1/models"
TOKENIZE_PATH, DETOKENIZE_PATH = "/tokenize", "/detokenize"  # as vLLM's server has them
# OpenAI parameters this server does not implement: accepted only at their neutral values.
NEUTRAL = {"suffix": ("",)}
SAMPLING = {"n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "min_tokens", "stop_token_ids",
            "prompt_logprobs"}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "stream", "stream_options", "stop", "seed",
         "user", "top_k", "use_memory", "include_reference_text", "ignore_eos", "best_of", "echo", *SAMPLING,
         *NEUTRAL}
CHAT_NEUTRAL = {"tools": (), "tool_choice": ("none",), "parallel_tool_calls": (),
                "response_format": ({"type": "text"},)}
CHAT_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream",
              "stream_options", "stop", "seed", "user", "top_k", "use_memory", "include_reference_text", "ignore_eos",
              "top_logprobs", *SAMPLING, *CHAT_NEUTRAL}
STARTED = int(time.time())  # a model's `created`: when this server started
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
               503: "service_unavailable_error", 504: "timeout_error"}
CUT = "the server stopped this stream before it finished (it is shutting down); retry the request"
TOKEN_ID = re.compile(r"\s*[0-9]{1,10}\s*")  # a logit_bias key: ASCII digits (str.isdigit takes others)


def add_completion_routes(app: FastAPI, current: Callable[[], GenerationEngine], model_name: str,
                          chat_template: ChatTemplate | None = None) -> None:
    """Register the routes; `current` returns the running engine or raises Unavailable."""

    def route(required: str, answer: Callable[[Request, dict, GenerationEngine], Awaitable[Response]]):
        """A POST route whose body is a JSON object (with at least `required`), for the running engine;
        every failure becomes an OpenAI-style error."""
        async def handle(request: Request) -> Response:
            try:
                return await answer(request, _json_object(await request.body(), required), current())
            except ClientDisconnect:  # gone while sending its body: nobody reads a reply, and nothing failed
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-style error
                return error_response(exc)
        return handle

    async def completions(request: Request, body: dict, engine: GenerationEngine) -> Response:
        ask = await parse_completion(body, engine, model_name, client=client_id(request.headers, _host(request)))
        return await _answer(engine, ask, model_name, chat=False)

    async def chat_completions(request: Request, body: dict, engine: GenerationEngine) -> Response:
        if chat_template is None:
            raise InvalidInput("this server has no chat template, and the model was trained on plain text: "
                               "start it with --chat-template (qa, the format `memory3 train` teaches, or a "
                               "Jinja2 file), or send the prompt to /v1/completions")
        ask = await parse_chat(body, engine, model_name, chat_template,
                               client=client_id(request.headers, _host(request)))
        return await _answer(engine, ask, model_name, chat=True)

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
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and what JSON parses but Python cannot hold:
        # an integer of over 4300 digits, arrays nested a thousand deep (a 500, logged as the server's fault)
        raise InvalidInput(f"the body is not valid JSON ({str(e)[:200]}); send a JSON object with at least "
                           f"\"{required}\"") from e
    if not isinstance(body, dict):
        raise InvalidInput(f"the body must be a JSON object with at least \"{required}\"")
    return body


@dataclass(frozen=True)
class Ask:
    """A parsed OpenAI request: an engine request per prompt (a chat's one), how many choices each, and
    how to answer."""

    requests: list[GenerationRequest]
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # a stream ends with a usage chunk (`stream_options.include_usage`)
    echo: list[str] | None = None  # each prompt's text, to put before its choices' text (`echo`)
    prompt_logprobs: int | None = None  # vLLM's extension: report each prompt token's, and this many alternatives

    @property
    def request(self) -> GenerationRequest:
        """The first prompt's: its id names the reply, and its options are every prompt's."""
        return self.requests[0]

    def choices(self) -> list[GenerationRequest]:
        """One engine request per choice, prompt p's choice j being choice p * n + j, as OpenAI numbers
        them. With a seed, choice j draws with seed + j, as vLLM's do: choices of one seed differ, and
        each repeats. A whole reply's prompt is scored by its first choice alone (`_Reply.completion`
        gives the others its scores); a stream's choices each score it, as each may send first, and
        choices that generate nothing are the scoring itself."""
        if self.n == 1:
            return list(self.requests)
        out = []
        for request in self.requests:
            seed = request.sampling.seed
            scored_once = not self.stream and request.max_tokens > 0
            out += [dataclasses.replace(
                request, request_id=f"{request.request_id}-{j}",
                sampling=dataclasses.replace(request.sampling, seed=_wrap_int64(seed + j)) if seed is not None
                else request.sampling,
                prompt_logprobs=None if j and scored_once else request.prompt_logprobs) for j in range(self.n)]
        return out


async def parse_completion(body: dict, engine: GenerationEngine, model_name: str, client: str = "") -> Ask:
    """An OpenAI completion request, validated; `client` is who asks, for the per-client stream limit
    (http_clients.client_id). Its prompt may be a batch: a list of texts or of token-id lists."""
    _check_fields(body, KNOWN, NEUTRAL)
    _check_model(body, engine, model_name)
    prompts = _prompts(body.get("prompt"))
    n = _choices(body, engine, len(prompts))
    best_of = _typed(body, "best_of", int, None)
    if best_of is not None and best_of != n:
        raise InvalidInput(f"best_of={best_of} with n={n}: this server does not rank extra choices; leave "
                           "best_of out or set it to n")
    logprobs, echo = _typed(body, "logprobs", int, None), _typed(body, "echo", bool, False)
    max_tokens = _typed(body, "max_tokens", int, None)
    options, stream, include_usage = _options(body, client)
    asked = _asked_prompt_logprobs(body, stream)
    score_only = (echo or asked is not None) and max_tokens == 0  # the prompt alone, scored
    if max_tokens == 0 and not score_only:
        raise InvalidInput("max_tokens must be at least 1 (0 scores the prompt alone, with \"echo\" or "
                           "\"prompt_logprobs\"); leave it out for the server's default")
    # What the engine reports of the prompt: enough for the echo's logprobs and for the extension's.
    wanted = [k for k in (logprobs if echo else None, asked, 0 if score_only else None) if k is not None]
    prompt_logprobs = max(wanted) if wanted else None

    async def request(p: int, text: str, ids: list[int]) -> GenerationRequest:
        """Prompt p's, judged before any prompt of the batch starts (then none has to be cancelled)."""
        try:
            built = await build_request(engine, prompt=text, prompt_token_ids=ids, max_tokens=max_tokens or 0,
                                        logprobs=logprobs, prompt_logprobs=prompt_logprobs, score_only=score_only,
                                        **options)
            engine.validate(built)
        except InvalidInput as e:
            if len(prompts) == 1:
                raise
            raise InvalidInput(f"prompt[{p}]: {e}") from None
        return built

    requests = await _all([request(p, text, ids) for p, (text, ids) in enumerate(prompts)])
    echoed = [text or await detokenize(engine, ids) for text, ids in prompts] if echo else None
    return Ask(requests, n, stream, include_usage, echoed, asked)


async def parse_chat(body: dict, engine: GenerationEngine, model_name: str, template: ChatTemplate,
                     client: str = "") -> Ask:
    """`parse_completion` for a chat request: its messages through `template` make the prompt, and
    the template's stop strings are added to the request's."""
    _check_fields(body, CHAT_KNOWN, CHAT_NEUTRAL)
    _check_model(body, engine, model_name)
    prompt = template.render(chat_messages(body.get("messages")))
    max_tokens, newer = _typed(body, "max_tokens", int, None), _typed(body, "max_completion_tokens", int, None)
    if max_tokens is not None and newer is not None and max_tokens != newer:
        raise InvalidInput("max_tokens and max_completion_tokens differ: give one of them")
    if 0 in (max_tokens, newer):  # it meant the server's default, where OpenAI and vLLM refuse it
        raise InvalidInput(f"{'max_tokens' if max_tokens == 0 else 'max_completion_tokens'} must be at least 1; "
                           "leave it out for the server's default")
    top_logprobs = _typed(body, "top_logprobs", int, None)
    if top_logprobs is not None and not _typed(body, "logprobs", bool, False):
        raise InvalidInput("top_logprobs needs \"logprobs\": true")
    logprobs = (top_logprobs or 0) if _typed(body, "logprobs", bool, False) else None
    n = _choices(body, engine, 1)
    options, stream, include_usage = _options(body, client, extra_stop=template.stop)
    asked = _asked_prompt_logprobs(body, stream)
    request = await build_request(engine, prompt=prompt, max_tokens=newer or max_tokens or 0, logprobs=logprobs,
                                  prompt_logprobs=asked, **options)
    return Ask([request], n, stream, include_usage, prompt_logprobs=asked)


def _asked_prompt_logprobs(body: dict, stream: bool) -> int | None:
    """vLLM's `prompt_logprobs`: not with a stream, as in vLLM (the range is the engine's to judge)."""
    asked = _typed(body, "prompt_logprobs", int, None)
    if asked is not None and stream:
        raise InvalidInput("prompt_logprobs are not available with \"stream\": true (as in vLLM): ask without "
                           "streaming, or with echo and logprobs on a completion")
    return asked


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


def _options(body: dict, client: str, *, extra_stop: tuple[str, ...] = ()) -> tuple[dict, bool, bool]:
    """The fields both routes share, as build_request arguments; whether to stream, and whether a
    stream ends with a usage chunk."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidInput("stop must be a string or a list of strings")
    stream = _typed(body, "stream", bool, False)
    include_usage = _include_usage(body.get("stream_options"), stream)
    options = {
        "temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", 1.0),
        "top_k": _typed(body, "top_k", int, 0), "stop": tuple(stop or ()), "server_stop": extra_stop,
        "seed": _typed(body, "seed", int, None), "use_memory": _typed(body, "use_memory", bool, True),
        "include_reference_text": _typed(body, "include_reference_text", bool, False),
        "ignore_eos": _typed(body, "ignore_eos", bool, False), "client_id": client,
        "presence_penalty": _number(body, "presence_penalty", 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0),
        "logit_bias": _logit_bias(body.get("logit_bias")),
        "min_tokens": _typed(body, "min_tokens", int, 0), "stop_token_ids": _token_ids(body, "stop_token_ids")}
    return options, stream, include_usage


def _choices(body: dict, engine: GenerationEngine, prompts: int) -> int:
    """`n`: each choice of each prompt is a stream of its own, so at most as many as the server holds at
    once, and as one client may have open."""
    n = _typed(body, "n", int, 1)
    if n < 1:
        raise InvalidInput(f"n must be 1 or more, got {n}")
    most = engine.config.max_batch + engine.config.max_waiting
    streams = f"{prompts} prompts × n={n}" if prompts > 1 else f"n={n}"
    if prompts * n > most:
        raise InvalidInput(f"{streams} choices: each choice is a stream, and this server holds {most} at once; "
                           "ask for fewer")
    per_client = engine.config.max_streams_per_client
    if per_client and prompts * n > per_client:
        raise InvalidInput(f"{streams} choices: each choice is a stream, and one client may have {per_client} open "
                           f"at once on this server (--max-streams-per-client): ask for at most {per_client}")
    return n


def _logit_bias(value) -> dict[int, float] | None:
    """OpenAI's `logit_bias`: an object of token ids (as JSON keys, strings of ASCII digits) to biases."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput('logit_bias must be an object of token ids to biases, such as {"50256": -100}')
    bias = {}
    for key, number in value.items():
        if not TOKEN_ID.fullmatch(key) or isinstance(number, bool) or not isinstance(number, (int, float)):
            raise InvalidInput(f"logit_bias: at {shown(key)}: each key must be a token id (digits) and each value "
                               'a number, such as {"50256": -100}')
        if int(key) in bias:
            raise InvalidInput(f"logit_bias: token id {int(key)} is given twice")
        bias[int(key)] = finite_float(f"logit_bias[{shown(key)}]", number)
    return bias


def _token_ids(body: dict, name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_id(t) for t in value):
        raise InvalidInput(f"{name} must be a list of token ids (integers), got {shown(json.dumps(value), 40)}")
    return value


def _wrap_int64(value: int) -> int:
    return (value - INT64_MIN) % 2**64 + INT64_MIN


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


def _prompts(value) -> list[tuple[str, list[int]]]:
    """A completion's prompt as (text, token ids) pairs, one of them set: a string, a list of token ids,
    or a batch, a list of either."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_id(t) for t in value)):
        value = [value]
    if value is None:
        raise InvalidInput("prompt is required: a string, or a list of token ids")
    if not isinstance(value, list) or not value or not all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p)) for p in value):
        raise InvalidInput("prompt must be a string, a list of token ids, or a batch: a list of strings or of "
                           "token-id lists")
    return [(p, []) if isinstance(p, str) else ("", p) for p in value]


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{name} must be a finite number, got {value!r}")
    return finite_float(name, value)


async def _answer(engine: GenerationEngine, ask: Ask, model_name: str, *, chat: bool) -> Response:
    reply = _Reply(ask, model_name, engine.codec, chat=chat)
    requests = ask.choices()
    if not ask.stream:
        return JSONResponse(reply.completion(await _all([engine.complete(r) for r in requests])))
    queued = [asyncio.Event() for _ in requests]
    streams = [engine.generate(r, on_queued=q.set) for r, q in zip(requests, queued, strict=True)]
    firsts = [asyncio.ensure_future(anext(events, None)) for events in streams]
    try:
        await _started(firsts, queued)  # what refuses a request before then is the HTTP status, never a 200
    except BaseException:
        await _close(firsts, streams)
        raise
    return _EventStream(_sse(reply, firsts, streams), closing=lambda: _close(firsts, streams))


class _EventStream(StreamingResponse):
    """The SSE reply, which closes its choices' streams however it ends. Its body closes them when it
    is read to the end or cut; but a client that hangs up while the headers are still being written
    (a slow or stalled connection) cancels the reply before its body is ever started, and the
    streams would go on generating to `max_tokens` for nobody, each holding its batch row."""

    def __init__(self, body: AsyncIterator[str], *, closing: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._closing = closing

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # In a task of its own: a second cancel (a hang-up, then the shutdown's grace running out)
            # stops this wait, not the closing.
            closing = asyncio.ensure_future(self._close_all())
            _CLOSING.add(closing)
            closing.add_done_callback(_CLOSING.discard)
            await asyncio.shield(closing)

    async def _close_all(self) -> None:
        try:
            await self.body_iterator.aclose()
        finally:
            await self._closing()


_CLOSING: set[asyncio.Task] = set()  # replies' closings under way (the loop keeps weak references only)


async def _started(firsts: list[asyncio.Future], queued: list[asyncio.Event]) -> None:
    """Wait until a stream may begin: one choice, once it has its first event (its first token), so that
    everything that fails it before then (validation, capacity, a retrieval outage, a drain) is the
    reply's status; several, once each is accepted and queued for a batch row, as one may wait for
    another's row (n above the free rows), and after that a failure is an error event in the stream.
    The first choice to fail before then raises its error."""
    waiters = [asyncio.ensure_future(q.wait()) for q in queued] if len(firsts) > 1 else []
    try:
        while True:
            failed = [f for f in firsts if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0].exception()
            if all(f.done() or (waiters and q.is_set()) for f, q in zip(firsts, queued, strict=True)):
                return
            await asyncio.wait([x for x in (*firsts, *waiters) if not x.done()], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _close(firsts: list[asyncio.Future], streams: list[AsyncIterator[GenerationEvent]]) -> None:
    """Cancel every choice: its stream closes, and frees its slot."""
    for first in firsts:
        first.cancel()
    await asyncio.gather(*firsts, return_exceptions=True)
    await asyncio.gather(*(events.aclose() for events in streams), return_exceptions=True)


async def _all(awaitables: list[Awaitable]) -> list:
    """Each awaitable's result, run together; the first to fail cancels the others, and its error is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_awaited(a)) for a in awaitables]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def _awaited(awaitable: Awaitable):
    return await awaitable


async def _sse(reply: _Reply, firsts: list[asyncio.Future],
               streams: list[AsyncIterator[GenerationEvent]]) -> AsyncIterator[str]:
    """Each choice's chunks as they come, then `data: [DONE]`; an error after the first chunk is sent
    as an error event first (the status line is gone), so that a client can tell a cut stream from a
    whole one. With `include_usage`, the last chunk before `[DONE]` has no choices and the usage of all
    the choices, as OpenAI's."""
    merged = _merge(firsts, streams)
    try:
        ends: dict[int, GenerationEvent] = {}
        async for index, event in merged:
            chunk = reply.chunk(index, event)
            if chunk is not None:
                yield _data(chunk)
            if event.finish_reason is not None:
                ends[index] = event
                if len(ends) == len(streams) and reply.ask.include_usage:
                    yield _data(reply.usage_chunk(ends))
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
        await merged.aclose()  # a client that hung up cancels its streams and frees their slots
    yield "data: [DONE]\n\n"


async def _merge(firsts: list[asyncio.Future],
                 streams: list[AsyncIterator[GenerationEvent]]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """(choice index, event) of every stream as its events come, each stream's first (`firsts`, a
    task) first; the first stream to fail ends them all with its error. Closing this closes every stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            event = await firsts[index]
            while event is not None:
                queue.put_nowait((index, event, None))
                event = await anext(streams[index], None)
            queue.put_nowait((index, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, None, exc))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        running = len(streams)
        while running:
            index, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                running -= 1
            else:
                yield index, event
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await _close(firsts, streams)


class _Reply:
    """One request's completion or stream chunks, in its route's shape, for each of its choices."""

    def __init__(self, ask: Ask, model_name: str, codec: TextCodec, *, chat: bool) -> None:
        self.ask, self.model_name, self.codec, self.chat = ask, model_name, codec, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{ask.request.request_id}"
        self.created = int(time.time())
        choices = len(ask.requests) * ask.n
        self.sent = [0] * choices  # chunks sent per choice: a chat stream's first names the role
        # A completion's logprob text offsets, per choice, run on across chunks: the characters its tokens'
        # bytes have completed so far.
        self.offsets = [0] * choices
        self.utf8 = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(choices)]

    def completion(self, events: list[GenerationEvent]) -> dict:
        """The whole reply: one event per choice, each the whole of that choice's generation. vLLM's
        `prompt_logprobs` are a completion choice's, and a chat reply's (its one prompt)."""
        n = self.ask.n  # a prompt's first choice scored it for all (`Ask.choices`)
        events = [e if i % n == 0 else dataclasses.replace(e, prompt_logprobs=events[i - i % n].prompt_logprobs)
                  for i, e in enumerate(events)]
        out = {**self._head(delta=False),
               "choices": [self._choice(i, e, delta=False) for i, e in enumerate(events)]}
        if self.chat and self.ask.prompt_logprobs is not None:
            out["prompt_logprobs"] = self._prompt_logprobs(events[0].prompt_logprobs)
        return {**out, **self._extras(list(enumerate(events))), "usage": self.usage(dict(enumerate(events)))}

    def chunk(self, index: int, event: GenerationEvent) -> dict | None:
        """A stream's chunk of choice `index`'s event; None for an event with nothing to show (a step
        whose token ends inside a character, without logprobs)."""
        if not (event.text or event.citations or event.warnings or event.logprobs or event.finish_reason is not None
                or ((self.chat or self.ask.echo is not None) and not self.sent[index])):
            return None
        out = {**self._head(delta=True), "choices": [self._choice(index, event, delta=True)],
               **self._extras([(index, event)])}
        self.sent[index] += 1
        if event.finish_reason is not None and not self.ask.include_usage:
            out["usage"] = self.usage({index: event})  # the choice's own; with include_usage, a last chunk has all
        return out

    def usage_chunk(self, ends: dict[int, GenerationEvent]) -> dict:
        return {**self._head(delta=True), "choices": [], "usage": self.usage(ends)}

    def usage(self, ends: dict[int, GenerationEvent]) -> dict:
        """The usage of choices (index: last event): each prompt once, every choice's tokens and retrievals."""
        prompt = sum({i // self.ask.n: e.usage.prompt_tokens for i, e in ends.items()}.values())
        completion = sum(e.usage.completion_tokens for e in ends.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "retrievals": sum(e.usage.retrievals for e in ends.values()),
                "memories_read": sum(e.usage.memories_read for e in ends.values())}

    def _head(self, *, delta: bool) -> dict:
        kind = ("chat.completion.chunk" if delta else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def _choice(self, index: int, event: GenerationEvent, *, delta: bool) -> dict:
        echoed: list[TokenLogprob] = []
        if not self.chat:
            text = event.text
            if self.ask.echo is not None and not self.sent[index]:  # a completion, or a stream's first chunk
                k = self.ask.request.logprobs or 0  # the prompt's were asked for with as many, or more
                text = self.ask.echo[index // self.ask.n] + text
                echoed = [dataclasses.replace(t, top=t.top[:k]) for t in event.prompt_logprobs]
            choice = {"index": index, "text": text}
            if self.ask.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(event.prompt_logprobs)
        elif delta:
            first = not self.sent[index]
            choice = {"index": index, "delta": {**({"role": "assistant"} if first else {}),
                                                **({"content": event.text} if event.text or first else {})}}
        else:
            choice = {"index": index, "message": {"role": "assistant", "content": event.text}}
        return {**choice, "logprobs": self._logprobs(index, event.logprobs, echoed),
                "finish_reason": event.finish_reason}

    def _logprobs(self, index: int, tokens: list[TokenLogprob], echoed: list[TokenLogprob] = ()) -> dict | None:
        """OpenAI's logprobs of `tokens`, after those of an `echoed` prompt: a chat's `content` list, or a
        completion's parallel lists, whose `top_logprobs` hold the sampled token too, as OpenAI's do. A
        token that is part of a character is named by its bytes (`TextCodec.token_label`)."""
        if self.ask.request.logprobs is None:
            return None
        label, data = self.codec.token_label, self.codec.token_bytes
        if self.chat:
            def entry(token: int, logprob: float) -> dict:
                return {"token": label(token), "logprob": _finite(logprob), "bytes": list(data(token))}
            return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                                for t in tokens], "refusal": None}
        offsets = []
        for t in echoed:
            offsets.append(self._advance(index, t.token_id))
        if echoed:  # the echoed prompt is decoded apart from what follows: a character it cuts ends there
            self.offsets[index] += len(self.utf8[index].decode(b"", final=True))
            self.utf8[index].reset()
        offsets += [self._advance(index, t.token_id) for t in tokens]
        tokens = [*echoed, *tokens]
        return {"tokens": [label(t.token_id) for t in tokens],
                "token_logprobs": [_finite(t.logprob) for t in tokens],
                "top_logprobs": [{label(i): _finite(v) for i, v in [*t.top, (t.token_id, t.logprob)]}
                                 for t in tokens],
                "text_offset": offsets}

    def _prompt_logprobs(self, tokens: list[TokenLogprob]) -> list[dict | None]:
        """vLLM's: None for the context's `<s>`, then per prompt token its id's entry and its `prompt_logprobs`
        most likely ids' ({id: {logprob, rank, decoded_token}}; the prompt's own first)."""
        k, label = self.ask.prompt_logprobs, self.codec.token_label

        def entry(logprob: float, rank: int | None, token: int) -> dict:
            return {"logprob": _finite(logprob), "rank": rank, "decoded_token": label(token)}

        return [None, *({str(t.token_id): entry(t.logprob, t.rank, t.token_id),
                         **{str(i): entry(v, r, i) for r, (i, v) in enumerate(t.top[:k], start=1)
                            if i != t.token_id}} for t in tokens)]

    def _advance(self, index: int, token_id: int) -> int:
        """Where a token starts in choice `index`'s text, which then runs on past it: after the
        characters decoded so far, and after the replacement character of a part of a character that
        this token breaks (as the text shows it); a token inside a character starts where that
        character does, and a control token, which the text leaves out, where the next one does."""
        start = self.offsets[index]
        if token_id in self.codec.control_ids:
            return start
        token = self.codec.token_bytes(token_id)
        pending = self.utf8[index].getstate()[0]
        if pending:
            probe = codecs.getincrementaldecoder("utf-8")(errors="replace")
            probe.setstate((pending, 0))
            start += 1 if probe.decode(token[:1]).startswith("\ufffd") else 0  # the broken part is one U+FFFD
        self.offsets[index] += len(self.utf8[index].decode(token))
        return start

    def _extras(self, events: list[tuple[int, GenerationEvent]]) -> dict:
        """Our extensions: the references each chunk read (with the choice it belongs to), and
        warnings."""
        citations = [{**citation_json(c), "index": i} for i, e in events for c in e.citations]
        warnings = list(dict.fromkeys(w for _, e in events for w in e.warnings))
        return {**({"citations": citations} if citations else {}), **({"warnings": warnings} if warnings else {})}


def _finite(logprob: float) -> float:
    """JSON has no -Infinity: a token the model rules out gets -9999, as vLLM writes it."""
    return max(logprob, -9999.0)


def citation_json(c: Citation) -> dict:
    """A citation as plain JSON: the chunk, whether it was generated text, and the references read."""
    return {"chunk_index": c.chunk_index, "generated": c.generated,
            "references": [{"id": r.id, "score": r.score, **({"text": r.text} if r.text else {})}
                           for r in c.references]}


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
