"""The decoder's wait for its text and memory services at start: they must answer SERVING, and the text
services must answer a retrieval as the shards of the decoder's release. Fakes stand in for the services
(the point is the wait's logic; tests/integration/test_kserve.py runs it against gRPC servers)."""

import asyncio
import logging
from types import SimpleNamespace

from grpc_health.v1 import health_pb2

from memory3.services.decoder.server import BuiltEngine, wait_for_dependencies
from memory3.services.rpc.errors import Unavailable


class Serving:
    async def Check(self, request, timeout=None):  # noqa: N802 - gRPC method name
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class Shards:
    """Answers as shards that do not make one index until `fixed`."""

    def __init__(self) -> None:
        self.fixed = False
        self.asked = 0

    async def retrieve(self, queries, top_k, include_text):
        self.asked += 1
        if not self.fixed:
            raise Unavailable("text service: the 2 text services hold index shards 0/2, 0/2, where shards 0/2 to "
                              "1/2 were expected")
        return [[] for _ in queries]


def test_text_shards_that_do_not_make_one_index_keep_the_decoder_waiting(caplog):
    """It turned SERVING on the services' health alone, then failed every request with the shard mismatch."""
    shards = Shards()
    built = BuiltEngine(SimpleNamespace(retrieval=shards, codec=SimpleNamespace(bos_id=1)),
                        {"text": Serving(), "memory": Serving()}, [])

    async def main():
        waiting = asyncio.ensure_future(wait_for_dependencies(built))
        await asyncio.sleep(1.2)
        still_waiting = not waiting.done()
        shards.fixed = True
        return still_waiting, await asyncio.wait_for(waiting, 5)

    with caplog.at_level(logging.WARNING, logger="memory3.decoder"):
        still_waiting, ready = asyncio.run(main())
    assert still_waiting and ready and shards.asked >= 3
    said = [r.getMessage() for r in caplog.records if "hold index shards 0/2, 0/2" in r.getMessage()]
    assert len(said) == 1  # once, not at every retry
