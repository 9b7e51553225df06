"""GenerationService: translates protos to engine requests and engine events to protos."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from memory3.model.generate import SamplingParams
from memory3.v1 import generation_service_pb2 as pb
from memory3.v1 import text_service_pb2 as text_pb

from ..rpc.errors import InvalidInput, NotFound, rpc_errors
from .engine import Citation, GenerationEngine, GenerationEvent, GenerationRequest

log = logging.getLogger("memory3.decoder")
SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class GenerationServicer:
    def __init__(self, current: Callable[[], GenerationEngine]) -> None:
        """`current` returns the running engine or raises Unavailable (starting, draining)."""
        self.current = current

    def to_request(self, engine: GenerationEngine, message, context) -> GenerationRequest:
        if message.release and message.release != engine.release:
            raise NotFound(f"release {message.release!r} is not served here (this decoder serves "
                           f"{engine.release!r}); leave release empty or send it to the right deployment")
        if message.prompt and message.prompt_token_ids:
            raise InvalidInput("give the prompt as text or as token ids, not both")
        if len(message.prompt) > engine.config.max_prompt_chars:
            raise InvalidInput(f"the prompt has {len(message.prompt)} characters; the limit is "
                               f"{engine.config.max_prompt_chars}")
        if message.prompt:
            body = engine.codec.body(message.prompt)
        else:
            body = [engine.codec.bos_id, *message.prompt_token_ids]
        p = message.params
        if p.temperature < 0:
            raise InvalidInput(f"temperature must be >= 0 (0 is greedy), got {p.temperature}")
        if p.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0 disables it), got {p.top_k}")
        if not 0 <= p.top_p <= 1:
            raise InvalidInput(f"top_p must be in [0, 1] (0 or 1 disables it), got {p.top_p}")
        if p.max_tokens < 0:
            raise InvalidInput(f"max_tokens must be >= 1 (0 means the server's default), got {p.max_tokens}")
        if len(p.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in p.stop):
            raise InvalidInput(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most "
                               f"{MAX_STOP_CHARS} characters")
        sampling = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p or 1.0,
                                  seed=p.seed if p.HasField("seed") else None)
        remaining = context.time_remaining()
        return GenerationRequest(
            prompt_ids=body,
            max_tokens=p.max_tokens or engine.config.default_max_tokens,
            sampling=sampling,
            stop=tuple(p.stop),
            use_memory=p.retrieval != pb.RETRIEVAL_MODE_NONE,
            include_reference_text=p.include_reference_text,
            request_id=message.request_id or uuid.uuid4().hex,
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )

    @rpc_errors
    async def Generate(self, message: pb.GenerateRequest, context):
        engine = self.current()
        request = self.to_request(engine, message, context)
        started = time.monotonic()
        log.info("generate start", extra={"request_id": request.request_id})
        async for event in engine.generate(request):
            yield _response(event, request.request_id)
        log.info("generate done in %.3fs", time.monotonic() - started, extra={"request_id": request.request_id})

    @rpc_errors
    async def Complete(self, message: pb.CompleteRequest, context):
        engine = self.current()
        request = self.to_request(engine, message, context)
        out = pb.CompleteResponse(request_id=request.request_id)
        async for event in engine.generate(request):
            out.text += event.text
            out.token_ids.extend(event.token_ids)
            out.citations.extend(_citation(c) for c in event.citations)
            out.warnings.extend(event.warnings)
            if event.finish_reason is not None:
                out.finish_reason = FINISH[event.finish_reason]
                out.usage.CopyFrom(_usage(event))
        return out


def _citation(c: Citation) -> pb.Citation:
    return pb.Citation(chunk_index=c.chunk_index, generated=c.generated, references=[
        text_pb.RetrievedReference(id=r.id, score=r.score, text=r.text) for r in c.references])


def _usage(event: GenerationEvent) -> pb.Usage:
    u = event.usage
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    retrievals=u.retrievals, memories_read=u.memories_read)


def _response(event: GenerationEvent, request_id: str) -> pb.GenerateResponse:
    out = pb.GenerateResponse(token_ids=event.token_ids, text=event.text, request_id=request_id,
                              citations=[_citation(c) for c in event.citations], warnings=event.warnings)
    if event.finish_reason is not None:
        out.finish_reason = FINISH[event.finish_reason]
        out.usage.CopyFrom(_usage(event))
    return out
