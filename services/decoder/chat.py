"""Chat templates: an OpenAI chat conversation as the one prompt a model trained on plain text reads.

A release's model is trained on text, with no chat format of its own, so the server is told one
(`serve kserve --chat-template`): a built-in name, or a Jinja2 file in the form Hugging Face
tokenizers use (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`,
`strftime_now`; `tools` and `documents` are None), rendered in Jinja2's sandbox with the extensions
and filters `transformers` gives it. Without one, the chat route refuses,
as vLLM does for a tokenizer without a template, rather than guess a format the model never saw.

The built-in `qa` is the format `memory3 train` teaches: a user turn is "Question: ...", an
assistant turn "Answer: ...", one per line, and an answer ends at its line's end (its stop string).
A past answer is written as the model wrote it after "Answer:" (its reply begins with a space), so
that a conversation's history reads as the model read and wrote it.
`bos_token` renders empty: the decoder puts the context's `<s>` before every prompt itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..rpc.errors import InvalidInput

QA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{{ message.content + '\\n' }}"
    "{% elif message.role == 'user' %}{{ 'Question: ' + message.content + '\\n' }}"
    "{% else %}{{ 'Answer:' + ('' if message.content[:1].isspace() else ' ') + message.content + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)
MAX_MESSAGES = 256
ROLES = ("system", "developer", "user", "assistant")  # `developer` is OpenAI's newer name for `system`


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # a built-in's name, or the file it was read from
    source: str
    stop: tuple[str, ...] = ()  # stop strings every chat request gets, besides its own
    eos_token: str = "</s>"
    template: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The environment `transformers` renders chat templates in (`apply_chat_template`).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            object.__setattr__(self, "template", env.from_string(self.source))
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template {self.name}: line {e.lineno}: {e.message}") from e

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        bos_token="", eos_token=self.eos_token)
        except _TemplateRefused as e:
            raise InvalidInput(f"the chat template refuses these messages: {e}") from None
        except jinja2.TemplateError as e:
            raise InvalidInput(f"the chat template could not render these messages ({e}); check their roles "
                               "and order against the template") from None


BUILTIN = {"qa": lambda: ChatTemplate("qa", QA_TEMPLATE, stop=("\n",))}


def load_chat_template(spec: str) -> ChatTemplate:
    """A built-in template's name, or the path of a Jinja2 file."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path = Path(spec)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template {spec!r}: neither a built-in template ({', '.join(BUILTIN)}) nor a "
                         f"readable UTF-8 Jinja2 file ({e})") from e
    return ChatTemplate(str(path), source)


def chat_messages(value) -> list[dict]:
    """OpenAI chat messages as the template reads them: each a role and its text. Content given as
    parts must be text parts, which are joined; tool calls, images and audio are not supported."""
    if not isinstance(value, list) or not value:
        raise InvalidInput("messages is required: a non-empty list of {\"role\": ..., \"content\": ...} objects")
    if len(value) > MAX_MESSAGES:
        raise InvalidInput(f"messages: at most {MAX_MESSAGES} per request, got {len(value)}")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidInput(f"{where} must be an object with a role and a content")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise InvalidInput(f"{where}: field(s) {unknown} are not supported (tool calls are not): give role, "
                               "content and optionally name")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidInput(f"{where}.role must be one of {list(ROLES)}, got {role!r}")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidInput(f"{where}.name must be a string")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), where), **({"name": name} if name else {})})
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = sorted({str(p.get("type")) for p in content} - {"text"})
        if kinds:
            raise InvalidInput(f"{where}.content: only text parts are supported, got {kinds}")
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise InvalidInput(f"{where}.content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts")


class _TemplateRefused(Exception):
    pass


def _raise_exception(message: str):
    raise _TemplateRefused(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """`transformers`' `tojson`: plain JSON, where Jinja's own escapes <, > and & for HTML."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
