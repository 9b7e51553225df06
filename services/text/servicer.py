"""TextService: translates protos to engine calls and back, nothing more."""

from __future__ import annotations

from memory3.v1 import text_service_pb2 as pb
from memory3.v1 import text_service_pb2_grpc as pb_grpc

from ..rpc.errors import rpc_errors
from .engine import Query, Retrieved, TextEngine

SERVICE = pb.DESCRIPTOR.services_by_name["TextService"]


def query_from_proto(query: pb.RetrievalQuery) -> Query:
    """Proto3 cannot tell an unset string from an empty one: empty text and no ids mean "not set"."""
    return Query(text=query.text or None, token_ids=list(query.token_ids) or None)


def result_to_proto(found: list[Retrieved]) -> pb.RetrievalResult:
    return pb.RetrievalResult(references=[pb.RetrievedReference(id=r.id, score=r.score, text=r.text)
                                          for r in found])


class TextServicer(pb_grpc.TextServiceServicer):
    def __init__(self, engine: TextEngine) -> None:
        self.engine = engine

    @rpc_errors
    async def Tokenize(self, request, context):  # noqa: N802 - gRPC method name
        return pb.TokenizeResponse(token_ids=self.engine.tokenize(request.text, add_bos=request.add_bos))

    @rpc_errors
    async def Detokenize(self, request, context):  # noqa: N802
        return pb.DetokenizeResponse(text=self.engine.detokenize(list(request.token_ids)))

    @rpc_errors
    async def Retrieve(self, request, context):  # noqa: N802
        results = await self.engine.retrieve([query_from_proto(q) for q in request.queries], request.top_k,
                                             request.include_text)
        shard = self.engine.shard
        return pb.RetrieveResponse(results=[result_to_proto(r) for r in results], release=self.engine.release,
                                   shard_index=shard.index, shard_count=shard.count,
                                   top_k=request.top_k or self.engine.default_top_k)
