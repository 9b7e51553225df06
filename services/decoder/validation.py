"""One set of request rules for every door into the decoder: gRPC, KServe v2 and OpenAI-style HTTP.

Each front end maps its wire fields onto `build_request`; the rules and their messages live here,
so a bad request gets the same answer, in the same words, whichever protocol it came through.
What only the engine can judge (prompt length in tokens, context room) stays in
`GenerationEngine.validate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from memory3.model.generate import SamplingParams

from ..rpc.errors import InvalidInput, NotFound, shown
from ..text.engine import MAX_TOKEN_IDS
from .engine import GenerationEngine, GenerationRequest, new_request_id

# Prompts are tokenized here, apart from the default executor's threads, which decode fetched
# memories: a burst of long prompts would hold those up, and the streams waiting for them.
_TOKENIZING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="memory3-tokenize")
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_LOGIT_BIAS_TOKENS = 300  # as OpenAI's
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NUMBER = re.compile(r"\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*")  # a decimal number, ASCII digits


async def build_request(engine: GenerationEngine, *, prompt: str = "", prompt_token_ids: Sequence[int] = (),
                  release: str = "", temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0,
                  max_tokens: int = 0, stop: Sequence[str] = (), seed: int | None = None, use_memory: bool = True,
                  include_reference_text: bool = False, ignore_eos: bool = False, request_id: str = "",
                  deadline: float | None = None, client_id: str = "",
                  server_stop: Sequence[str] = (), presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                  logit_bias: Mapping[int, float] | None = None, logprobs: int | None = None,
                  prompt_logprobs: int | None = None, score_only: bool = False,
                  stop_token_ids: Sequence[int] = (), min_tokens: int = 0) -> GenerationRequest:
    """A validated engine request. `max_tokens` 0 means the server's default; `top_p` 0 or 1 disables it.
    `server_stop`: stop strings the server adds (a chat template's), not counted against the client's,
    and honoured before `min_tokens` too.
    `logprobs`, `prompt_logprobs`: report each generated (prompt) token's logprob and this many
    alternatives' (None: none). `score_only`: read and score the prompt, generate nothing.
    `stop_token_ids`, `min_tokens`: vLLM's (GenerationRequest); the engine judges them against its vocabulary.

    The prompt is tokenized in a worker thread, without the GIL: tens of milliseconds for a long one,
    during which the event loop goes on streaming the other requests' tokens. The request's arrival
    is now, before that: time to first token counts tokenizing, as vLLM's does."""
    arrival = time.monotonic()
    if release and release != engine.release:
        raise NotFound(f"release {shown(release)} is not served here (this decoder serves "
                       f"{engine.release!r}); leave release empty or send it to the right deployment")
    if prompt and prompt_token_ids:
        raise InvalidInput("give the prompt as text or as token ids, not both")
    for name, text in (("stop", s) for s in stop):
        _check_unicode(name, text)
    body = await tokenize(engine, prompt) if prompt else [engine.codec.bos_id, *prompt_token_ids]
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidInput(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise InvalidInput(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 <= top_p <= 1:  # NaN fails this too
        raise InvalidInput(f"top_p must be in [0, 1] (0 or 1 disables it), got {top_p}")
    if max_tokens < 0:
        raise InvalidInput(f"max_tokens must be >= 1 (0 means the server's default), got {max_tokens}")
    if seed is not None and not INT64_MIN <= seed <= INT64_MAX:
        raise InvalidInput(f"seed must be a 64-bit signed integer ({INT64_MIN} to {INT64_MAX}), got {seed}")
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidInput(f"request_id: at most {MAX_REQUEST_ID_CHARS} printable characters "
                           "(it is written to logs), or empty for a generated one")
    if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidInput(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most "
                           f"{MAX_STOP_CHARS} characters")
    if logit_bias and len(logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidInput(f"logit_bias: at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(logit_bias)}")
    try:  # the penalties' and biases' ranges are the model's rules
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p or 1.0, seed=seed,
                                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                  logit_bias=tuple(sorted((logit_bias or {}).items())))
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    return GenerationRequest(
        prompt_ids=body,
        # The default never asks for more than the prompt leaves room for: a long prompt with the
        # default is not the client's mistake (`GenerationEngine.validate` judges a room below 1).
        max_tokens=0 if score_only else
        max_tokens or max(1, min(engine.config.default_max_tokens, engine.room(body, use_memory))),
        sampling=sampling,
        stop=tuple(dict.fromkeys([*stop, *server_stop])),
        stop_always=tuple(dict.fromkeys(server_stop)),
        use_memory=use_memory,
        include_reference_text=include_reference_text,
        ignore_eos=ignore_eos,
        request_id=request_id or new_request_id(),
        deadline=deadline,
        client_id=client_id,
        arrival=arrival,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        stop_token_ids=tuple(dict.fromkeys(stop_token_ids)),
        min_tokens=min_tokens,
    )


async def tokenize(engine: GenerationEngine, prompt: str) -> list[int]:
    """A text prompt's token ids as the engine reads them, `<s>` first; in a worker thread (above)."""
    if len(prompt) > engine.config.max_prompt_chars:
        raise InvalidInput(f"the prompt has {len(prompt)} characters; the limit is {engine.config.max_prompt_chars}")
    _check_unicode("prompt", prompt)
    (body,) = await asyncio.get_running_loop().run_in_executor(_TOKENIZING, engine.codec.bodies, [prompt])
    return body


async def detokenize(engine: GenerationEngine, ids: Sequence[int]) -> str:
    """The text of token ids, in a worker thread (above): at most MAX_TOKEN_IDS of them, as the text service's."""
    if len(ids) > MAX_TOKEN_IDS:
        raise InvalidInput(f"tokens: at most {MAX_TOKEN_IDS} ids per request, got {len(ids)}")
    bad = [t for t in ids if not 0 <= t < engine.codec.vocab_size]
    if bad:
        raise InvalidInput(f"token id {bad[0]} is outside the tokenizer's vocabulary "
                           f"(0..{engine.codec.vocab_size - 1})")
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZING, engine.codec.decode, list(ids))


def finite_float(name: str, value: str | int | float) -> float:
    """A client's number as a finite float: JSON's integers have no bound (10**400 is one), and a
    protocol without a float field sends a string, of ASCII digits (`float` takes "1_000" and other
    scripts' digits)."""
    number = math.nan
    if (isinstance(value, (int, float)) and not isinstance(value, bool)) or \
            (isinstance(value, str) and NUMBER.fullmatch(value)):
        with contextlib.suppress(OverflowError):  # an integer past float's range
            number = float(value)
    if not math.isfinite(number):
        raise InvalidInput(f"{name} must be a finite number, got {shown(str(value), 40)}")
    return number


def _check_unicode(name: str, text: str) -> None:
    """JSON can spell a lone UTF-16 surrogate ("\\ud800"), which is no character: refused here
    rather than failing in the tokenizer (gRPC's strings are valid UTF-8 already)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"{name}: not valid Unicode (a lone surrogate at character {e.start}): "
                           "send text as UTF-8") from None
