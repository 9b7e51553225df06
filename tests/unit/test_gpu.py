"""CUDA parity: the model computes the same logits on the GPU as on the CPU (skipped without CUDA)."""

import pytest
import torch

from memory3.model.generate import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_forward_matches_cpu(tiny_model, tiny_config):
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 100))
    positions = torch.arange(100)[None].expand(2, -1)
    with torch.no_grad():
        cpu = tiny_model(tokens, positions)
        gpu_model = tiny_model.to("cuda")
        try:
            gpu = gpu_model(tokens.cuda(), positions.cuda()).cpu()
            out = generate(gpu_model, [[1, 5, 6, 7]], max_new_tokens=8)
        finally:
            tiny_model.to("cpu")
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    assert len(out.tokens[0]) == 8


def test_seeded_and_greedy_streams_decode_together_on_cuda(tiny_config, text_codec):
    """A seeded request sampled CUDA logits with a CPU generator: the step raised, and every stream
    of the batch failed. Both now finish, and the seed repeats its tokens."""
    import asyncio

    from memory3.model.generate import SamplingParams
    from memory3.model.init import random_model
    from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest

    model = random_model(tiny_config, seed=1, std=0.2).to("cuda")
    body = [text_codec.bos_id, *range(10, 40)]
    seeded = GenerationRequest(body, 16, SamplingParams(temperature=0.9, seed=11), use_memory=False)
    greedy = GenerationRequest(body, 16, use_memory=False)

    async def tokens(request, engine):
        return [t async for event in engine.generate(request) for t in event.token_ids]

    async def main():
        engine = GenerationEngine(model, text_codec, None, EngineConfig(max_batch=4))
        await engine.start()
        try:
            return await asyncio.gather(tokens(seeded, engine), tokens(greedy, engine), tokens(seeded, engine))
        finally:
            await engine.close()

    first, plain, again = asyncio.run(main())
    assert len(first) == len(plain) == 16 and first == again


class _Bank:
    """Retrieval of a few host-memory memories, picked by the query's tokens (as a fetch would hand them over)."""

    def __init__(self, memories):
        self.memories = memories

    async def retrieve(self, queries, top_k, include_text):
        from memory3.services.decoder.retrieval import RetrievedReference

        return [[RetrievedReference(str((sum(q) + j) % len(self.memories)), 1.0) for j in range(min(top_k, 5))]
                for q in queries]

    async def fetch(self, ids):
        return [self.memories[int(i)] for i in ids]


def test_cuda_graphs_of_the_engines_decode_pass_give_the_tokens_of_eager_passes(tiny_config, text_codec):
    """The serving engine replays its decode passes from CUDA graphs (padded rows, context buckets,
    memories swapped in from pinned host memory): each stream's greedy tokens are the eager passes'."""
    import asyncio

    from memory3.model.init import random_model
    from memory3.model.memory import ExplicitMemory
    from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest

    model = random_model(tiny_config, seed=1, std=0.2).to("cuda")
    gen = torch.Generator().manual_seed(5)
    shape = tiny_config.memory_shape
    positions = torch.arange(shape[2]).expand(shape[0], shape[1], -1).clone()
    bank = _Bank([ExplicitMemory(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), positions)
                  for _ in range(12)])
    bodies = [[text_codec.bos_id, *torch.randint(3, 250, (n,), generator=gen).tolist()] for n in (30, 100, 290)]

    async def run(graphs):
        engine = GenerationEngine(model, text_codec, bank, EngineConfig(max_batch=4, cuda_graphs=graphs))
        await engine.start()
        try:
            passes = engine.scheduler.passes
            assert bool(passes.graphs) == graphs and passes.error is None
            return await asyncio.gather(*[
                asyncio.create_task(_tokens(engine, GenerationRequest(body, 150, ignore_eos=True)))
                for body in bodies])
        finally:
            await engine.close()

    eager, replayed = asyncio.run(run(False)), asyncio.run(run(True))
    assert [len(t) for t in replayed] == [150] * 3
    assert replayed == eager


async def _tokens(engine, request):
    return [t async for event in engine.generate(request) for t in event.token_ids]
