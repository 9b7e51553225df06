"""The OpenAI routes' choices (`n`), penalties, logit biases and logprobs, in-process against a running
engine over the tiny model (tests/integration/test_kserve.py drives them through the OpenAI SDK)."""

import asyncio
import json

import httpx
import pytest
import torch
from fastapi import FastAPI

from memory3.services.decoder import engine as engine_module
from memory3.services.decoder.chat import load_chat_template
from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest
from memory3.services.decoder.openai_routes import _answer, add_completion_routes, parse_completion
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
    """The bias makes every token a letter, yet the logprobs are the engine's, the model's before it:
    the sampled token is often not the most likely."""
    ask = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "use_memory": False, "logprobs": 2,
           "logit_bias": letters(text_codec)}

    async def calls(client, engine):
        reply = (await client.post("/v1/completions", json=ask)).json()
        return reply, await engine.complete((await parse_completion(ask, engine, "memory3")).request)

    reply, direct = serve(tiny_model, text_codec, calls)
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"] and choice["text"].isalpha()
    assert logprobs["text_offset"] == list(range(len(choice["text"])))  # one letter per token
    assert logprobs["tokens"] == [text_codec.token_label(t.token_id) for t in direct.logprobs]
    assert logprobs["token_logprobs"] == pytest.approx([t.logprob for t in direct.logprobs])
    for top, own in zip(logprobs["top_logprobs"], direct.logprobs, strict=True):
        expected = {text_codec.token_label(i): v for i, v in [*own.top, (own.token_id, own.logprob)]}
        assert top == pytest.approx(expected) and len(own.top) == 2
    assert any(t.logprob < t.top[0][1] for t in direct.logprobs)


def scripted_choice(model, codec, monkeypatch, script: list[int]) -> dict:
    """The completion's choice, with logprobs, when the engine samples the tokens of `script` in turn."""
    monkeypatch.setattr(engine_module.Scheduler, "_pick",
                        staticmethod(lambda streams, logits: [script[len(s.tokens)] for s in streams]))

    async def calls(client, _engine):
        return (await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": len(script),
                                                           "use_memory": False, "logprobs": 0})).json()

    return serve(model, codec, calls)["choices"][0]


def test_a_token_inside_a_character_is_named_by_its_bytes_and_offsets_index_the_text(tiny_model, text_codec,
                                                                                     monkeypatch):
    """"aé日b" in byte tokens: each offset is where its token's character starts in the text."""
    choice = scripted_choice(tiny_model, text_codec, monkeypatch, text_codec.encode("aé日b"))
    assert choice["text"] == "aé日b"
    assert choice["logprobs"]["tokens"] == ["a", "bytes:\\xc3", "bytes:\\xa9", "bytes:\\xe6", "bytes:\\x97",
                                            "bytes:\\xa5", "b"]
    assert choice["logprobs"]["text_offset"] == [0, 1, 1, 2, 2, 2, 3]


def test_a_token_after_a_broken_character_starts_after_its_replacement(tiny_model, text_codec, monkeypatch):
    """Bytes that begin a character the next token does not go on with show as U+FFFD in the text."""
    byte = {b: text_codec.encode(chr(b))[0] for b in b"abc"}
    byte.update({0xC3: text_codec.encode("é")[0], 0xE6: text_codec.encode("日")[0], 0x97: text_codec.encode("日")[1]})
    choice = scripted_choice(tiny_model, text_codec, monkeypatch, [byte[b] for b in b"a\xc3b\xe6\x97c"])
    assert choice["text"] == "a\ufffdb\ufffdc"
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3, 3, 4]


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
    ("/v1/completions", {"n": 7}, 400, "n=7 choices: each choice is a stream, and this server holds 6 at once"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"], "n": 2}, 400, "4 prompts × n=2 choices"),
    ("/v1/completions", {"prompt": ["a", 5]}, 400, "or a batch: a list of strings or of token-id lists"),
    ("/v1/completions", {"prompt": []}, 400, "or a batch: a list of strings or of token-id lists"),
    ("/v1/completions", {"presence_penalty": 2.5}, 400, "presence_penalty must be in [-2.0, 2.0]"),
    ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias: at most 300 tokens"),
    ("/v1/completions", {"logit_bias": {"999": 1}}, 400, "logit_bias: token id 999 is outside"),
    ("/v1/completions", {"logit_bias": {"²": 1}}, 400, "'²': each key must be a token id"),
    ("/v1/completions", {"logit_bias": {"٣": 1}}, 400, "'٣': each key must be a token id"),
    ("/v1/completions", {"logit_bias": {"7" * 5000: 1}}, 400, "characters): each key must be a token id"),
    ("/v1/completions", {"logit_bias": {"5": 1, "05": 2}}, 400, "token id 5 is given twice"),
    ("/v1/completions", {"logit_bias": {"5": 10**400}}, 400, "logit_bias['5'] must be a finite number"),
    ("/v1/completions", {"presence_penalty": 10**400}, 400, "presence_penalty must be a finite number"),
    ("/v1/completions", {"stop_token_ids": 5}, 400, "stop_token_ids must be a list of token ids"),
    ("/v1/chat/completions", {"stop_token_ids": [5, True]}, 400, "stop_token_ids must be a list of token ids"),
    ("/v1/completions", {"stop_token_ids": [5, 300]}, 400, "stop_token_ids: token id 300 is outside"),
    ("/v1/completions", {"min_tokens": "3"}, 400, "min_tokens must be an integer"),
    ("/v1/completions", {"prompt_logprobs": 2, "stream": True}, 400, "prompt_logprobs are not available with"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs are not available"),
    ("/v1/completions", {"prompt_logprobs": -1}, 400, "prompt_logprobs: the alternatives to report per token are 0."),
    ("/v1/chat/completions", {"prompt_logprobs": 10**6}, 400, "prompt_logprobs: the alternatives to report per token"),
    ("/v1/chat/completions", {"min_tokens": 5}, 400, "min_tokens must be in 0..max_tokens (4), got 5"),
])
def test_bad_sampling_fields_say_what_to_fix(tiny_model, text_codec, path, fields, status, says):
    body = {"messages": [{"role": "user", "content": PROMPT}]} if "chat" in path else {"prompt": PROMPT}

    async def calls(client, _engine):
        return await client.post(path, json={**body, "max_tokens": 4, **fields})

    reply = serve(tiny_model, text_codec, calls, EngineConfig(max_batch=2, max_waiting=4))
    assert reply.status_code == status and says in reply.json()["error"]["message"], reply.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_vllms_stop_token_ids_and_min_tokens_end_a_choice(tiny_model, text_codec, path):
    """A stop token id ends the choice, counted but not in its text (vLLM's default); before min_tokens it
    is not drawn."""
    body = {"messages": [{"role": "user", "content": PROMPT}]} if "chat" in path else {"prompt": PROMPT}
    x = text_codec.encode("x")[0]
    ask = {**body, "max_tokens": 30, "temperature": 0, "use_memory": False, "logit_bias": {str(x): 100},
           "stop_token_ids": [x]}

    async def calls(client, _engine):
        return [(await client.post(path, json={**ask, **extra})).json()
                for extra in ({}, {"min_tokens": 5}, {"min_tokens": 5, "max_tokens": 5})]

    def text(reply):
        choice = reply["choices"][0]
        return choice["message"]["content"] if "chat" in path else choice["text"]

    at_once, later, first_five = serve(tiny_model, text_codec, calls)
    for reply, tokens, reason in ((at_once, 1, "stop"), (later, 6, "stop"), (first_five, 5, "length")):
        assert reply["choices"][0]["finish_reason"] == reason and reply["usage"]["completion_tokens"] == tokens
    assert text(at_once) == "" and text(later) == text(first_five)  # the same five tokens, then x


@pytest.mark.parametrize("stream", [False, True])
def test_a_choice_refused_at_capacity_ends_the_request_and_frees_every_slot(tiny_model, text_codec, stream):
    """One row, held by another request; of three choices two queue for it and the third is refused:
    the reply is the refusal at once, not after the two have had the row."""
    async def calls(client, engine):
        other = asyncio.ensure_future(engine.complete(GenerationRequest(
            text_codec.body(PROMPT), 400, use_memory=False, ignore_eos=True)))
        while not engine.scheduler.running():
            await asyncio.sleep(0.001)
        reply = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "n": 3,
                                                           "stream": stream, "use_memory": False})
        state = other.done(), engine.accepted
        await other
        return reply, state

    reply, (other_done, accepted) = serve(tiny_model, text_codec, calls, EngineConfig(max_batch=1, max_waiting=2))
    assert reply.status_code == 429 and "at capacity" in reply.json()["error"]["message"]
    assert (other_done, accepted) == (False, 1)  # the two queued choices were cancelled, not served


def test_more_choices_than_a_client_may_open_is_a_request_to_fix_not_to_retry(tiny_model, text_codec):
    async def calls(client, _engine):
        return await client.post("/v1/completions", json={"prompt": PROMPT, "n": 3})

    reply = serve(tiny_model, text_codec, calls, EngineConfig(max_batch=4, max_streams_per_client=2))
    assert reply.status_code == 400 and "ask for at most 2" in reply.json()["error"]["message"]


def test_a_stream_of_more_choices_than_rows_starts_before_the_first_choices_finish(tiny_model, text_codec):
    """Three choices, two rows: the third waits for a row the first two hold; the stream starts once
    all three are queued, and its chunks then join to each choice's text."""
    body = {"prompt": PROMPT, "max_tokens": 200, "n": 3, "stream": True, "use_memory": False, "ignore_eos": True,
            "temperature": 1.0, "seed": 9}

    async def calls(_client, engine):
        before = metrics.GENERATION_TOKENS._value.get()
        response = await _answer(engine, await parse_completion(body, engine, "memory3"), "memory3", chat=False)
        decoded_then = metrics.GENERATION_TOKENS._value.get() - before
        chunks = [json.loads(line.removeprefix("data: ")) async for line in response.body_iterator
                  if line.startswith("data: {")]
        return decoded_then, chunks

    decoded_then, chunks = serve(tiny_model, text_codec, calls, EngineConfig(max_batch=2, max_waiting=4))
    assert decoded_then < 200  # no choice had finished when the reply began
    ends = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(e["index"] for e in ends) == [0, 1, 2] and {e["finish_reason"] for e in ends} == {"length"}


def test_echo_with_no_new_tokens_scores_the_prompt_as_lm_evaluation_harness_asks(tiny_model, text_codec):
    """`echo` with `max_tokens` 0 and `logprobs`: the prompt's text and each of its tokens' logprobs, the
    engine's prompt scores; with new tokens, theirs follow, and a stream's first chunk holds the prompt."""
    ask = {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0, "use_memory": False}

    async def calls(client, engine):
        scored = (await client.post("/v1/completions", json=ask)).json()
        direct = await engine.complete((await parse_completion(ask, engine, "memory3")).request)
        more = (await client.post("/v1/completions", json={**ask, "max_tokens": 3})).json()
        by_ids = (await client.post("/v1/completions", json={**ask, "prompt": text_codec.encode(PROMPT)})).json()
        streamed = await client.post("/v1/completions", json={**ask, "max_tokens": 3, "stream": True})
        return scored, direct, more, by_ids, streamed

    scored, direct, more, by_ids, streamed = serve(tiny_model, text_codec, calls)
    choice, prompt_ids = scored["choices"][0], text_codec.encode(PROMPT)
    assert choice["text"] == PROMPT and scored["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["tokens"] == [text_codec.token_label(t) for t in prompt_ids]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([t.logprob for t in direct.prompt_logprobs])
    assert [t.token_id for t in direct.prompt_logprobs] == prompt_ids
    assert choice["logprobs"]["text_offset"] == list(range(len(PROMPT)))  # an ASCII byte per token
    grown = more["choices"][0]
    assert grown["text"].startswith(PROMPT) and len(grown["logprobs"]["tokens"]) == len(prompt_ids) + 3
    assert grown["logprobs"]["token_logprobs"][:len(prompt_ids)] == choice["logprobs"]["token_logprobs"]
    assert by_ids["choices"][0]["text"] == PROMPT
    chunks = events(streamed)
    assert "".join(c["choices"][0]["text"] for c in chunks) == grown["text"]
    assert chunks[0]["choices"][0]["text"].startswith(PROMPT)


def test_vllms_prompt_logprobs_rank_each_prompt_token_among_its_most_likely_alternatives(tiny_model, text_codec):
    """vLLM's extension: per prompt token after `<s>` (None for it), {id: {logprob, rank, decoded_token}}
    for the token and its `prompt_logprobs` most likely ids; a completion choice's (each choice of the
    prompt's), a chat reply's; beside an echo's logprobs of another width, each keeps its own."""
    ask = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "use_memory": False, "prompt_logprobs": 3}
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "temperature": 0,
            "use_memory": False, "prompt_logprobs": 2}

    async def calls(client, engine):
        reply = (await client.post("/v1/completions", json={**ask, "n": 2})).json()
        scored = await engine.complete(
            (await parse_completion({**ask, "echo": True, "max_tokens": 0, "logprobs": 5}, engine, "memory3")).request)
        with_echo = (await client.post("/v1/completions", json={**ask, "echo": True, "logprobs": 1})).json()
        talk = (await client.post("/v1/chat/completions", json=chat)).json()
        plain = (await client.post("/v1/completions", json={**ask, "prompt_logprobs": None})).json()
        return reply, scored, with_echo, talk, plain

    reply, scored, with_echo, talk, plain = serve(tiny_model, text_codec, calls)
    prompt_ids = text_codec.encode(PROMPT)
    with torch.inference_mode():  # every prompt token's rank in the vocabulary, from one plain pass
        sequence = torch.tensor([[text_codec.bos_id, *prompt_ids]])
        full = tiny_model(sequence, torch.arange(sequence.shape[1])[None])[0, :-1, :text_codec.vocab_size]
        full = full.float().log_softmax(-1)
        ranks = (full >= full.gather(1, torch.tensor(prompt_ids)[:, None])).sum(1)
    listed = reply["choices"][0]["prompt_logprobs"]
    assert listed[0] is None and len(listed) == len(prompt_ids) + 1  # the context's <s>, then every prompt token
    assert reply["choices"][1]["prompt_logprobs"] == listed
    assert any(rank > 3 for rank in ranks.tolist())  # some prompt tokens are not among the alternatives
    for token, rank, truth, entries in zip(prompt_ids, ranks.tolist(), scored.prompt_logprobs, listed[1:],
                                           strict=True):
        assert truth.token_id == token
        assert entries[str(token)]["logprob"] == pytest.approx(truth.logprob)
        assert entries[str(token)]["rank"] == rank
        assert entries[str(token)]["decoded_token"] == text_codec.token_label(token)
        others = {i: v for i, v in truth.top[:3] if i != token}
        assert {k: e["logprob"] for k, e in entries.items() if k != str(token)} == pytest.approx(
            {str(i): v for i, v in others.items()})
        assert sorted(e["rank"] for k, e in entries.items() if k != str(token)) == [
            r for r, (i, _) in enumerate(truth.top[:3], start=1) if i != token]
    echoed = with_echo["choices"][0]
    assert echoed["prompt_logprobs"] == listed  # three alternatives here ...
    assert {len(top) for top in echoed["logprobs"]["top_logprobs"]} == {1, 2}  # ... one there, and the token
    chat_listed = talk["prompt_logprobs"]
    assert chat_listed[0] is None and all(len(e) <= 3 for e in chat_listed[1:]) and len(chat_listed) > len(listed)
    assert "prompt_logprobs" not in talk["choices"][0] and "prompt_logprobs" not in plain["choices"][0]
    assert "prompt_logprobs" not in plain


def test_a_whole_replys_prompt_is_scored_once_for_all_its_choices(tiny_model, text_codec):
    """n choices of one prompt share its scores: the first choice scores it, the others only generate,
    and each choice still lists the prompt's logprobs (vLLM's extension, and an echo's)."""
    ask = {"prompt": [PROMPT, "Another harbour"], "max_tokens": 3, "temperature": 0, "use_memory": False,
           "prompt_logprobs": 2, "echo": True, "logprobs": 1, "n": 3}

    async def calls(client, engine):
        scoring = []
        complete = engine.complete

        async def counted(request):
            scoring.append(request.prompt_logprobs is not None)
            return await complete(request)

        engine.complete = counted
        return (await client.post("/v1/completions", json=ask)).json(), scoring

    reply, scoring = serve(tiny_model, text_codec, calls, EngineConfig(max_batch=6))
    assert scoring == [True, False, False] * 2  # each prompt's first choice
    for first in (0, 3):
        choices = reply["choices"][first : first + 3]
        assert choices[0]["prompt_logprobs"][0] is None and len(choices[0]["prompt_logprobs"]) > 1
        assert all(c["prompt_logprobs"] == choices[0]["prompt_logprobs"] for c in choices)
        echoed = len(choices[0]["prompt_logprobs"]) - 1  # the echo's tokens lead each choice's logprobs
        assert all(c["logprobs"]["token_logprobs"][:echoed] == choices[0]["logprobs"]["token_logprobs"][:echoed]
                   for c in choices)
    assert reply["choices"][0]["prompt_logprobs"] != reply["choices"][3]["prompt_logprobs"]


def test_a_tied_token_takes_the_worst_rank_of_its_tie_as_vllm_ranks_it():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    found = engine_module._token_logprobs(logits, [2, 0], [2, 0], None, ranked=True)
    assert [t.rank for t in found] == [3, 4]
    assert [t.rank for t in engine_module._token_logprobs(logits, [2, 0], [2, 0], None)] == [None, None]


def test_a_batch_of_prompts_gets_choices_numbered_prompt_by_prompt(tiny_model, text_codec):
    """Prompt p's choice j is choice p * n + j, drawn as that prompt alone would draw it; the usage counts
    each prompt once."""
    other = "A ferry leaves"
    ask = {"prompt": [PROMPT, other], "n": 2, "seed": 5, "temperature": 1.0, "max_tokens": 8, "echo": True,
           "use_memory": False}

    async def calls(client, _engine):
        batch = (await client.post("/v1/completions", json=ask)).json()
        alone = (await client.post("/v1/completions", json={**ask, "prompt": other})).json()
        by_ids = (await client.post("/v1/completions", json={**ask, "prompt": [text_codec.encode(PROMPT),
                                                                                 text_codec.encode(other)]})).json()
        streamed = await client.post("/v1/completions", json={**ask, "stream": True,
                                                               "stream_options": {"include_usage": True}})
        return batch, alone, by_ids, streamed

    batch, alone, by_ids, streamed = serve(tiny_model, text_codec, calls)
    texts = [c["text"] for c in batch["choices"]]
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert texts[0].startswith(PROMPT) and texts[1].startswith(PROMPT) and texts[2].startswith(other)
    assert texts[2:] == [c["text"] for c in alone["choices"]]
    assert batch["usage"]["prompt_tokens"] == len(text_codec.encode(PROMPT)) + len(text_codec.encode(other)) + 2
    assert [c["text"] for c in by_ids["choices"]] == texts
    *chunks, last = events(streamed)
    for i, text in enumerate(texts):
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) == text
    assert last["usage"] == batch["usage"]


def test_the_end_of_sequence_token_that_ends_a_choice_is_scored_as_lm_evaluation_harness_expects(tiny_model,
                                                                                                  text_codec):
    """lm-evaluation-harness asks with max_tokens 1 and drops the last logprob: when the model's next token
    ends the sequence, that token must be there to drop, or the continuation's last score would go."""
    ask = {"prompt": [text_codec.encode(PROMPT)], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
           "use_memory": False, "logit_bias": {str(text_codec.eos_id): 100}}

    async def calls(client, _engine):
        return (await client.post("/v1/completions", json=ask)).json()

    reply = serve(tiny_model, text_codec, calls)
    choice, prompt_ids = reply["choices"][0], text_codec.encode(PROMPT)
    assert choice["finish_reason"] == "stop" and choice["text"] == PROMPT  # the token has no text
    assert len(choice["logprobs"]["token_logprobs"]) == len(prompt_ids) + 1
    assert choice["logprobs"]["tokens"][-1] == "</s>" and reply["usage"]["completion_tokens"] == 1
    assert choice["logprobs"]["text_offset"][-1] == len(PROMPT)


def test_an_echoed_token_id_prompt_that_cuts_a_character_ends_it_there(tiny_model, text_codec, monkeypatch):
    """The echoed prompt's text and the generated text are decoded apart: offsets follow the text."""
    cut = text_codec.encode("a日b")[:3]  # "a" and two of the three bytes of "日"
    script = [text_codec.encode("日")[2], text_codec.encode("b")[0]]
    monkeypatch.setattr(engine_module.Scheduler, "_pick",
                        staticmethod(lambda streams, logits: [script[len(s.tokens)] for s in streams]))

    async def calls(client, _engine):
        return (await client.post("/v1/completions", json={"prompt": cut, "max_tokens": 2, "echo": True,
                                                           "logprobs": 0, "use_memory": False})).json()

    choice = serve(tiny_model, text_codec, calls)["choices"][0]
    assert choice["text"] == "a\ufffd\ufffdb"
    assert choice["logprobs"]["text_offset"] == [0, 1, 1, 2, 3]


def test_a_batch_with_a_bad_prompt_is_refused_before_any_prompt_starts(tiny_model, text_codec):
    async def calls(client, engine):
        aborted = metrics.REQUEST_SUCCESS.labels(finished_reason="abort")._value.get()
        reply = await client.post("/v1/completions", json={"prompt": [PROMPT, "x" * 5000], "use_memory": False})
        return reply, metrics.REQUEST_SUCCESS.labels(finished_reason="abort")._value.get() - aborted, engine.accepted

    reply, aborted, accepted = serve(tiny_model, text_codec, calls)
    assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("prompt[1]: the prompt has")
    assert (aborted, accepted) == (0, 0)


def test_bodies_python_cannot_hold_and_a_max_tokens_of_0_are_the_clients_errors(tiny_model, text_codec, caplog):
    """An integer of over 4300 digits, or arrays nested a thousand deep, parse as JSON but not in Python:
    a 500, logged as the server's fault. A max_tokens of 0 meant the server's default (128 tokens),
    where OpenAI and vLLM refuse it; it still scores a prompt alone with echo."""
    import logging

    async def calls(client, engine):
        got = []
        for raw in ('{"prompt": ' + "9" * 5000 + "}", "[" * 5000 + "]" * 5000):
            got.append(await client.post("/v1/completions", content=raw))
        for path, body in (("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_completion_tokens": 0})):
            got.append(await client.post(path, json={**body, "use_memory": False}))
        scored = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True,
                                                            "use_memory": False})
        return got, scored

    with caplog.at_level(logging.ERROR):
        got, scored = serve(tiny_model, text_codec, calls)
    assert [r.status_code for r in got] == [400] * 5 and not caplog.records
    assert all(r.json()["error"]["type"] == "invalid_request_error" for r in got)
    assert "the body is not valid JSON (Exceeds the limit (4300 digits)" in got[0].json()["error"]["message"]
    assert [r.json()["error"]["message"].split(";")[0] for r in got[2:]] == [
        "max_tokens must be at least 1 (0 scores the prompt alone, with \"echo\" or \"prompt_logprobs\")",
        "max_tokens must be at least 1", "max_completion_tokens must be at least 1"]
    assert scored.status_code == 200 and scored.json()["choices"][0]["text"] == PROMPT


def test_a_client_gone_while_sending_its_body_is_no_server_error(tiny_model, text_codec, caplog):
    """Starlette's ClientDisconnect became a 500 "completion failed", with a traceback at ERROR."""
    import logging

    sent = []

    async def main():
        app = FastAPI()
        add_completion_routes(app, lambda: None, "memory3")
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b"",
                 "client": ("10.0.0.7", 5000), "server": ("decoder", 80), "scheme": "http", "root_path": "",
                 "http_version": "1.1"}

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert not caplog.records and sent[0]["status"] == 499
