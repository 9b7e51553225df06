"""The OpenAI routes' choices (`n`), penalties, logit biases and logprobs, in-process against a running
engine over the tiny model (tests/integration/test_kserve.py drives them through the OpenAI SDK)."""

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI

from memory3.services.decoder.chat import load_chat_template
from memory3.services.decoder.engine import EngineConfig, GenerationEngine
from memory3.services.decoder.openai_routes import add_completion_routes
from memory3.services.rpc import metrics

PROMPT = "The harbour of Yelbury"


def serve(model, codec, calls, config=EngineConfig(max_batch=4)):
    """Run `calls(client, engine)` against the routes of a started engine, in one event loop."""
    async def main():
        engine = GenerationEngine(model, codec, None, config)
        await engine.start()
        app = FastAPI()
        add_completion_routes(app, lambda: engine, "memory3", load_chat_template("qa"))
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://decoder",
                                         timeout=120) as client:
                return await calls(client, engine)
        finally:
            await engine.close()
    return asyncio.run(main())


def events(reply: httpx.Response) -> list[dict]:
    lines = [line for line in reply.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def letters(codec) -> dict[str, float]:
    """A logit bias that makes every token a lowercase letter: text whose tokens can be read one by one."""
    return {str(codec.encode(c)[0]): 100.0 for c in "abcdefghijklmnopqrstuvwxyz"}


def test_n_choices_are_streams_drawn_with_seed_plus_their_index(tiny_model, text_codec):
    ask = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "use_memory": False}

    async def calls(client, engine):
        both = (await client.post("/v1/completions", json={**ask, "n": 3, "seed": 11})).json()
        alone = [(await client.post("/v1/completions", json={**ask, "seed": 11 + i})).json() for i in range(3)]
        return both, alone, engine.accepted

    both, alone, left = serve(tiny_model, text_codec, calls)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2]
    assert [c["text"] for c in both["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert len({c["text"] for c in both["choices"]}) > 1  # the choices differ
    assert both["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
    assert both["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert left == 0


def test_streamed_choices_carry_their_index_and_join_to_the_whole(tiny_model, text_codec):
    ask = {"prompt": PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": 3, "n": 2, "use_memory": False}

    async def calls(client, _engine):
        whole = (await client.post("/v1/completions", json=ask)).json()
        streamed = await client.post("/v1/completions",
                                     json={**ask, "stream": True, "stream_options": {"include_usage": True}})
        return whole, streamed

    whole, streamed = serve(tiny_model, text_codec, calls)
    *chunks, usage = events(streamed)
    assert all(len(c["choices"]) == 1 for c in chunks) and usage["choices"] == []
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert [c["finish_reason"] is None for c in mine].count(False) == 1
    assert usage["usage"] == whole["usage"]


def test_completion_logprobs_line_up_with_the_text_and_are_the_models_own(tiny_model, text_codec):
    """The bias makes every token a letter, yet the logprobs are the model's before it: the sampled
    token is often not the model's most likely."""
    ask = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "use_memory": False, "logprobs": 2,
           "logit_bias": letters(text_codec)}

    async def calls(client, _engine):
        return (await client.post("/v1/completions", json=ask)).json()

    choice = serve(tiny_model, text_codec, calls)["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"] and choice["text"].isalpha()
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))]
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                   strict=True):
        assert top[token] == logprob and len(top) <= 3  # the two most likely, and the sampled token
        assert logprob < 0
    assert any(logprob < max(top.values()) for logprob, top in zip(logprobs["token_logprobs"],
                                                                  logprobs["top_logprobs"], strict=True))


def test_chat_logprobs_are_openais_content_list_streamed_or_whole(tiny_model, text_codec):
    ask = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0, "use_memory": False,
           "logprobs": True, "top_logprobs": 2, "logit_bias": letters(text_codec)}

    async def calls(client, _engine):
        whole = (await client.post("/v1/chat/completions", json=ask)).json()
        streamed = await client.post("/v1/chat/completions", json={**ask, "stream": True})
        return whole, streamed

    whole, streamed = serve(tiny_model, text_codec, calls)
    choice = whole["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    assert bytes(b for e in content for b in e["bytes"]) == choice["message"]["content"].encode()
    for entry in content:
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(values) == 2 and values == sorted(values, reverse=True)
    pieces = [c["choices"][0]["logprobs"] for c in events(streamed)]
    assert [e for p in pieces if p for e in p["content"]] == content


@pytest.mark.parametrize(("path", "fields", "status", "says"), [
    ("/v1/chat/completions", {"top_logprobs": 2}, 400, 'top_logprobs needs "logprobs": true'),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, 400, "0..20"),
    ("/v1/completions", {"logprobs": 21}, 400, "0..20"),
    ("/v1/completions", {"n": 7}, 400, "n must be in 1..6"),
    ("/v1/completions", {"presence_penalty": 2.5}, 400, "presence_penalty must be in [-2.0, 2.0]"),
    ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias: at most 300 tokens"),
    ("/v1/completions", {"logit_bias": {"999": 1}}, 400, "logit_bias: token id 999 is outside"),
])
def test_bad_sampling_fields_say_what_to_fix(tiny_model, text_codec, path, fields, status, says):
    body = {"messages": [{"role": "user", "content": PROMPT}]} if "chat" in path else {"prompt": PROMPT}

    async def calls(client, _engine):
        return await client.post(path, json={**body, "max_tokens": 4, **fields})

    reply = serve(tiny_model, text_codec, calls, EngineConfig(max_batch=2, max_waiting=4))
    assert reply.status_code == status and says in reply.json()["error"]["message"], reply.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_choice_refused_at_capacity_ends_the_request_and_frees_every_slot(tiny_model, text_codec, stream):
    async def calls(client, engine):
        before = metrics.GENERATION_TOKENS._value.get()
        reply = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "n": 3,
                                                           "stream": stream, "use_memory": False, "ignore_eos": True})
        await asyncio.sleep(0.2)  # the scheduler frees the cancelled choices' rows
        return reply, metrics.GENERATION_TOKENS._value.get() - before, engine.accepted, engine.scheduler.running()

    reply, generated, accepted, running = serve(tiny_model, text_codec, calls,
                                                EngineConfig(max_batch=4, max_streams_per_client=2))
    assert reply.status_code == 429 and "already has 2 streams open" in reply.json()["error"]["message"]
    assert (accepted, running) == (0, 0)
    assert generated < 100  # the other choices were cancelled, not generated to their end
