"""A typed client of the TextService, for the decoder (and tests, tools).

Errors are not translated: a failed call raises `grpc.aio.AioRpcError` with the server's status
code and message, so a caller can tell bad input (INVALID_ARGUMENT) from a service that is not
ready or overloaded (UNAVAILABLE, RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from memory3.v1 import text_service_pb2 as pb
from memory3.v1 import text_service_pb2_grpc as pb_grpc

# (reference id = memory id, cosine score, text or "" when not requested), best first.
Hit = tuple[str, float, str]


class TextClient:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float | None = 10.0) -> None:
        self.stub = pb_grpc.TextServiceStub(channel)
        self.timeout_s = timeout_s
        self.release: str | None = None  # the release that answered the last retrieval

    async def retrieve(self, token_id_queries: Sequence[Sequence[int]], top_k: int = 0,
                       include_text: bool = False) -> list[list[Hit]]:
        """One result per query (a chunk's token ids); top_k 0 means the release's memories per chunk."""
        request = pb.RetrieveRequest(queries=[pb.RetrievalQuery(token_ids=list(q)) for q in token_id_queries],
                                     top_k=top_k, include_text=include_text)
        return self._hits(await self.stub.Retrieve(request, timeout=self.timeout_s))

    async def retrieve_texts(self, queries: Sequence[str], top_k: int = 0,
                             include_text: bool = False) -> list[list[Hit]]:
        """The same, for queries given as text (a question, for RAG)."""
        request = pb.RetrieveRequest(queries=[pb.RetrievalQuery(text=q) for q in queries], top_k=top_k,
                                     include_text=include_text)
        return self._hits(await self.stub.Retrieve(request, timeout=self.timeout_s))

    async def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        response = await self.stub.Tokenize(pb.TokenizeRequest(text=text, add_bos=add_bos), timeout=self.timeout_s)
        return list(response.token_ids)

    async def detokenize(self, ids: Sequence[int]) -> str:
        response = await self.stub.Detokenize(pb.DetokenizeRequest(token_ids=list(ids)), timeout=self.timeout_s)
        return response.text

    def _hits(self, response: pb.RetrieveResponse) -> list[list[Hit]]:
        self.release = response.release
        return [[(r.id, r.score, r.text) for r in result.references] for result in response.results]
