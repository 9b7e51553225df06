"""Chat templates and the chat route's request rules (tests/integration/test_kserve.py runs the route
in a real `serve kserve`, through the OpenAI SDK)."""

import asyncio
import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from memory3.services.decoder.chat import chat_messages, load_chat_template
from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationEvent, Usage
from memory3.services.decoder.openai_routes import _Reply, add_completion_routes, parse_chat
from memory3.services.rpc.errors import InvalidInput

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Where is Yelbury?"},
                {"role": "assistant", "content": "Yelbury lies in Norland."},
                {"role": "developer", "content": "One word."},
                {"role": "user", "content": [{"type": "text", "text": "Who founded "},
                                             {"type": "text", "text": "it?"}]}]
HF_STYLE = """{{ bos_token }}{% for m in messages %}
{% if m.role == 'system' and not loop.first %}{{ raise_exception('the system message must come first') }}{% endif %}
<|{{ m.role }}|>{{ m.content }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def test_the_qa_template_writes_the_question_and_answer_lines_training_teaches():
    template = load_chat_template("qa")
    assert template.render(chat_messages(CONVERSATION)) == (
        "Answer briefly.\nQuestion: Where is Yelbury?\nAnswer: Yelbury lies in Norland.\nOne word.\n"
        "Question: Who founded it?\nAnswer:")
    assert template.stop == ("\n",)  # an answer is one line


def test_a_hugging_face_style_template_file_renders_and_can_refuse(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(HF_STYLE)
    template = load_chat_template(str(path))
    rendered = template.render(chat_messages([{"role": "user", "content": "hi"}]))
    assert rendered == "<|user|>hi</s>\n<|assistant|>"  # bos_token is empty: the decoder adds <s> itself
    with pytest.raises(InvalidInput, match="refuses these messages: the system message must come first"):
        template.render(chat_messages([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]))


def test_a_template_that_reaches_outside_the_sandbox_is_refused(tmp_path):
    path = tmp_path / "escape.jinja"
    path.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidInput, match="could not render"):
        load_chat_template(str(path)).render(chat_messages([{"role": "user", "content": "hi"}]))


@pytest.mark.parametrize(("spec", "says"), [
    ("no-such-template", "neither a built-in template (qa) nor a readable UTF-8 Jinja2 file"),
    ("BROKEN", "line 1: Unexpected end of template"),
])
def test_a_template_that_cannot_be_used_is_refused_at_start(tmp_path, spec, says):
    if spec == "BROKEN":
        spec = str(tmp_path / "broken.jinja")
        (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match=re.escape(says)):
        load_chat_template(spec)


@pytest.mark.parametrize(("messages", "says"), [
    (None, "messages is required"),
    ([], "messages is required"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"role": "tool", "content": "42"}], r"messages\[0\].role must be one of"),
    ([{"role": "user", "content": "hi", "tool_calls": []}], r"field\(s\) \['tool_calls'\] are not supported"),
    ([{"role": "user", "content": "hi", "name": {"x": 1}}], r"messages\[0\].name must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "user", "content": 7}], "must be a string or a list"),
    ([{"role": "user", "content": "x"}] * 257, "at most 256"),
])
def test_messages_the_server_cannot_read_say_what_to_fix(messages, says):
    with pytest.raises(InvalidInput, match=says):
        chat_messages(messages)


def test_a_chat_request_is_the_rendered_prompt_with_the_templates_stop_added(tiny_model, text_codec):
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig())
    template = load_chat_template("qa")

    def parse(**fields):
        return asyncio.run(parse_chat({"messages": CONVERSATION, **fields}, engine, "memory3", template))

    ask = parse(stop="END", max_completion_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True})
    request = ask.request
    assert request.prompt_ids == text_codec.bodies([template.render(chat_messages(CONVERSATION))])[0]
    assert request.stop == ("END", "\n") and request.max_tokens == 5 and ask.stream and ask.include_usage
    assert parse(max_tokens=7).request.max_tokens == 7
    for fields, says in [({"max_tokens": 3, "max_completion_tokens": 4}, "differ: give one of them"),
                         ({"tools": [{"type": "function"}]}, "tools is not supported"),
                         ({"response_format": {"type": "json_object"}}, "response_format is not supported"),
                         ({"prompt": "x"}, r"unknown field\(s\) \['prompt'\]")]:
        with pytest.raises(InvalidInput, match=says):
            parse(**fields)


def test_chat_replies_have_openais_chat_shapes(tiny_model, text_codec):
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig())
    ask = asyncio.run(parse_chat({"messages": CONVERSATION}, engine, "memory3", load_chat_template("qa")))
    end = GenerationEvent(text="Kim.", finish_reason="stop", usage=Usage(40, 3, 1, 5))
    whole = _Reply(ask, "memory3", text_codec, chat=True).completion([end])
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Kim."}, "logprobs": None,
                                 "finish_reason": "stop"}]
    assert whole["usage"]["total_tokens"] == 43
    stream = _Reply(ask, "memory3", text_codec, chat=True)
    first, later, last = (stream.chunk(0, e) for e in (GenerationEvent(text=""), GenerationEvent(text="Ki"), end))
    assert first["object"] == "chat.completion.chunk"
    assert [c["choices"][0]["delta"] for c in (first, later, last)] == [
        {"role": "assistant", "content": ""}, {"content": "Ki"}, {"content": "Kim."}]


def test_without_a_template_the_chat_route_says_how_to_get_one():
    app = FastAPI()
    add_completion_routes(app, lambda: None, "memory3")
    reply = TestClient(app).post("/openai/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert reply.status_code == 400
    assert "start it with --chat-template" in reply.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/openai/v1/chat/completions"])
def test_a_chat_is_watched_as_a_generation_and_cut_in_openais_error_shape(path):
    """A client that hangs up frees its stream's slot, and a chat cut at shutdown gets OpenAI's 503."""
    from memory3.services.decoder.kserve_model import cut_reply, generation_path

    assert generation_path(path)
    reply = cut_reply(path)
    assert reply.status_code == 503 and b'"type":"service_unavailable_error"' in reply.body


def test_tokenize_and_detokenize_give_the_ids_the_engine_reads_and_back(tiny_model, text_codec):
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_seq_len=512))
    app = FastAPI()
    add_completion_routes(app, lambda: engine, "memory3", load_chat_template("qa"))
    client = TestClient(app)
    reply = client.post("/tokenize", json={"prompt": "Where is Yelbury?"}).json()
    assert reply["tokens"] == text_codec.bodies(["Where is Yelbury?"])[0] and reply["tokens"][0] == text_codec.bos_id
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 512
    bare = client.post("/tokenize", json={"prompt": "Where is Yelbury?", "add_special_tokens": False}).json()
    assert bare["tokens"] == reply["tokens"][1:]  # what a completion's token-id prompt takes
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == text_codec.bodies(["Question: Hi\nAnswer:"])[0]
    assert client.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": "Where is Yelbury?"}
    for path, body, says in [("/tokenize", {}, "give either prompt"),
                             ("/tokenize", {"prompt": "x", "messages": []}, "give either prompt"),
                             ("/tokenize", {"prompt": 3}, "prompt must be a str"),
                             ("/tokenize", {"prompt": "x", "model": "gpt-4"}, "not served here"),
                             ("/detokenize", {"tokens": [1, 10**6]}, "token id 1000000 is outside"),
                             ("/detokenize", {"tokens": "abc"}, "tokens is required")]:
        reply = client.post(path, json=body)
        assert reply.status_code in (400, 404) and says in reply.json()["error"]["message"], (path, body, reply.json())


def test_a_qa_conversations_history_reads_as_the_model_read_and_wrote_it():
    """The prompt ends "Answer:" and the model's reply begins with a space; history wrote it back as
    "Answer: " + reply, two spaces, a format training never showed."""
    qa = load_chat_template("qa")
    first = [{"role": "user", "content": "Who founded Yelbury?"}]
    reply = " founder Kim"
    seen = qa.render(chat_messages(first)) + reply + "\n"
    later = qa.render(chat_messages([*first, {"role": "assistant", "content": reply},
                                     {"role": "user", "content": "When?"}]))
    assert later.startswith(seen)


HF_TEMPLATES = {
    "loopcontrols": "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                    "<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>",
    "tojson": "{% for m in messages %}{{ m.role }}: {{ m.content | tojson }}\n{% endfor %}assistant:",
    "name": "{% for m in messages %}{{ m.name ~ ': ' if m.name else '' }}{{ m.content }}\n{% endfor %}Answer:",
    "tools_none": "{% if tools is not none %}[TOOLS]{% endif %}{% for m in messages %}{{ m.content }}\n{% endfor %}",
}


@pytest.mark.parametrize("name", list(HF_TEMPLATES))
def test_a_template_file_renders_as_transformers_renders_it(tmp_path, name):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Is 1<2 & 'x'?", "name": "alice"}]
    path = tmp_path / f"{name}.jinja"
    path.write_text(HF_TEMPLATES[name])
    expected = render_jinja_template([messages], chat_template=HF_TEMPLATES[name], add_generation_prompt=True,
                                     bos_token="", eos_token="</s>")[0][0]
    assert load_chat_template(str(path)).render(chat_messages(messages)) == expected


def test_a_templates_stop_strings_do_not_count_against_the_clients(tiny_model, text_codec):
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig())
    stops = [f"S{i}" for i in range(8)]  # the most a client may send
    request = asyncio.run(parse_chat({"messages": [{"role": "user", "content": "x"}], "stop": stops}, engine,
                                     "memory3", load_chat_template("qa"))).request
    assert request.stop == (*stops, "\n")
    assert request.stop_always == ("\n",)  # the turn's end: it ends the answer before min_tokens too
    with pytest.raises(InvalidInput, match="stop: at most 8"):
        asyncio.run(parse_chat({"messages": [{"role": "user", "content": "x"}], "stop": [*stops, "S8"]}, engine,
                               "memory3", load_chat_template("qa")))


def test_stream_options_take_the_sdks_include_obfuscation(tiny_model, text_codec):
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig())
    options = {"include_usage": True, "include_obfuscation": False}
    ask = asyncio.run(parse_chat({"messages": [{"role": "user", "content": "x"}], "stream": True,
                                  "stream_options": options}, engine, "memory3", load_chat_template("qa")))
    assert ask.stream and ask.include_usage


def test_detokenize_refuses_more_ids_than_the_text_service_does(tiny_model, text_codec):
    from memory3.services.text.engine import MAX_TOKEN_IDS

    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig())
    app = FastAPI()
    add_completion_routes(app, lambda: engine, "memory3")
    reply = TestClient(app).post("/detokenize", json={"tokens": [65] * (MAX_TOKEN_IDS + 1)})
    assert reply.status_code == 400 and f"at most {MAX_TOKEN_IDS} ids" in reply.json()["error"]["message"]
    ids = text_codec.encode("AAA")
    assert TestClient(app).post("/detokenize", json={"tokens": ids}).json() == {"prompt": "AAA"}
