"""GenerationService: translates protos to engine requests and engine events to protos."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from memory3.v1 import generation_service_pb2 as pb
from memory3.v1 import text_service_pb2 as text_pb

from ..rpc.errors import InvalidInput, rpc_errors
from .engine import Citation, GenerationEngine, GenerationEvent, GenerationRequest, TokenLogprob
from .validation import build_request

log = logging.getLogger("memory3.decoder")
SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
CLIENT_ID_HEADER = "x-client-id"
MAX_CLIENT_ID_CHARS = 128


def client_id(context) -> str:
    """Who is asking, for the per-client stream limit: the `x-client-id` metadata (set it at the
    ingress, which the decoder then sees as the peer), else the peer's address without its port."""
    given = dict(context.invocation_metadata() or ()).get(CLIENT_ID_HEADER)
    if isinstance(given, str) and given.strip():
        return given.strip()[:MAX_CLIENT_ID_CHARS]
    peer = context.peer() or ""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class GenerationServicer:
    def __init__(self, current: Callable[[], GenerationEngine]) -> None:
        """`current` returns the running engine or raises Unavailable (starting, draining)."""
        self.current = current

    async def to_request(self, engine: GenerationEngine, message, context) -> GenerationRequest:
        p = message.params
        if p.retrieval not in pb.RetrievalMode.values():
            names = ", ".join(pb.RetrievalMode.keys())
            raise InvalidInput(f"params.retrieval: {p.retrieval} is not a RetrievalMode; send one of {names}")
        remaining = context.time_remaining()
        return await build_request(
            engine, prompt=message.prompt, prompt_token_ids=list(message.prompt_token_ids), release=message.release,
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, max_tokens=p.max_tokens, stop=tuple(p.stop),
            seed=p.seed if p.HasField("seed") else None, use_memory=p.retrieval != pb.RETRIEVAL_MODE_NONE,
            include_reference_text=p.include_reference_text,
            ignore_eos=p.ignore_eos, request_id=message.request_id,
            deadline=time.monotonic() + remaining if remaining is not None else None, client_id=client_id(context),
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            logit_bias=dict(p.logit_bias), logprobs=p.logprobs if p.HasField("logprobs") else None,
            prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
            score_only=p.HasField("prompt_logprobs") and not p.max_tokens,
            stop_token_ids=list(p.stop_token_ids), min_tokens=p.min_tokens)

    @rpc_errors
    async def Generate(self, message: pb.GenerateRequest, context):
        engine = self.current()
        request = await self.to_request(engine, message, context)
        started = time.monotonic()
        log.info("generate start", extra={"request_id": request.request_id})
        async for event in engine.generate(request):
            yield _response(event, request.request_id, engine)
        log.info("generate done in %.3fs", time.monotonic() - started, extra={"request_id": request.request_id})

    @rpc_errors
    async def Complete(self, message: pb.CompleteRequest, context):
        engine = self.current()
        request = await self.to_request(engine, message, context)
        out = pb.CompleteResponse(request_id=request.request_id)
        async for event in engine.generate(request):
            out.text += event.text
            out.token_ids.extend(event.token_ids)
            out.logprobs.extend(_logprobs(event.logprobs, engine))
            out.prompt_logprobs.extend(_logprobs(event.prompt_logprobs, engine))
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


def _logprobs(items: list[TokenLogprob], engine: GenerationEngine) -> list[pb.TokenLogprob]:
    token = engine.codec.token_bytes
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, token=token(lp.token_id),
                            top=[pb.TopLogprob(token_id=i, logprob=v, token=token(i)) for i, v in lp.top])
            for lp in items]


def _response(event: GenerationEvent, request_id: str, engine: GenerationEngine) -> pb.GenerateResponse:
    out = pb.GenerateResponse(token_ids=event.token_ids, text=event.text, request_id=request_id,
                              citations=[_citation(c) for c in event.citations], warnings=event.warnings,
                              logprobs=_logprobs(event.logprobs, engine),
                              prompt_logprobs=_logprobs(event.prompt_logprobs, engine))
    if event.finish_reason is not None:
        out.finish_reason = FINISH[event.finish_reason]
        out.usage.CopyFrom(_usage(event))
    return out
