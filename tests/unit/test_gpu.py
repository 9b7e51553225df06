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

    async def main():
        engine = GenerationEngine(model, text_codec, None, EngineConfig(max_batch=4))
        await engine.start()
        try:
            return await asyncio.gather(_tokens(engine, seeded), _tokens(engine, greedy), _tokens(engine, seeded))
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

    replays = []
    replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        replays.append(graph)
        replay(graph)

    async def run(graphs):
        engine = GenerationEngine(model, text_codec, bank, EngineConfig(max_batch=4, cuda_graphs=graphs))
        await engine.start()
        passes = engine.scheduler.passes
        try:
            assert bool(passes.graphs) == graphs and passes.error is None
            return await asyncio.gather(*[
                asyncio.create_task(_tokens(engine, GenerationRequest(body, 150, ignore_eos=True)))
                for body in bodies])
        finally:
            await engine.close()
            assert passes.graphs == {}  # released with the caches they read

    torch.cuda.CUDAGraph.replay = counted
    try:
        eager, replayed = asyncio.run(run(False)), asyncio.run(run(True))
    finally:
        torch.cuda.CUDAGraph.replay = replay
    assert [len(t) for t in replayed] == [150] * 3
    assert replayed == eager
    assert len(replays) >= 150  # every decode pass of the second run


def test_attention_of_one_query_folds_grouped_heads_on_cuda_as_repeated_heads_compute_it():
    from memory3.model.model import attend, repeat_kv

    q = torch.randn(3, 8, 1, 64, device="cuda")
    k, v = torch.randn(3, 2, 300, 64, device="cuda"), torch.randn(3, 2, 300, 64, device="cuda")
    mask = torch.where(torch.rand(3, 1, 1, 300, device="cuda") < 0.3, float("-inf"), 0.0)
    mask[..., 0] = 0.0
    expected = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 8), repeat_kv(v, 8), attn_mask=mask)
    torch.testing.assert_close(attend(q, k, v, mask), expected, rtol=1e-4, atol=1e-4)
    for dtype in (torch.bfloat16, torch.float16):
        got = attend(q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype))
        torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2)


def test_memories_from_host_memory_land_in_the_cache_of_a_cuda_model(tiny_config):
    """A swap's memories are joined in pinned memory and copied asynchronously: the cache holds them
    once the stream has run, and a later swap does not disturb an earlier row's."""
    from memory3.model.init import random_model
    from memory3.model.memory import ExplicitMemory

    model = random_model(tiny_config, seed=1).to("cuda")
    model.setup_caches(2, 64, memory=True)
    shape = tiny_config.memory_shape
    positions = torch.arange(shape[2]).expand(shape[0], shape[1], -1).clone()
    mems = [ExplicitMemory(torch.randn(shape), torch.randn(shape), positions) for _ in range(5)]
    model.install_memories(0, mems[:3])
    model.install_memories(1, mems[3:])
    torch.cuda.synchronize()
    n = shape[2]
    for i, layer in enumerate(layer for layer in model.layers if layer.is_memory_layer):
        cache = layer.attention.kv_cache
        for row, given in ((0, mems[:3]), (1, mems[3:])):
            held = slice(0, len(given) * n)
            torch.testing.assert_close(cache.k[row, :, held].cpu(), torch.cat([m.keys[i] for m in given], 1))
            torch.testing.assert_close(cache.v[row, :, held].cpu(), torch.cat([m.values[i] for m in given], 1))
    model.clear_caches()


async def _tokens(engine, request):
    return [t async for event in engine.generate(request) for t in event.token_ids]


def test_training_on_cuda_moves_the_weights_as_the_cpu_does_and_its_checkpoint_resumes_on_a_cpu(tmp_path):
    """`memory3 train --device cuda`: steps of all three stages run on the GPU (under bf16 autocast, as
    on a GPU from Ampere on) and move the weights from the same start as fp32 steps on the CPU move them:
    the same direction and length of update. The loss alone hardly moves in six steps, whether the
    optimizer steps or not. A checkpoint written there resumes on a CPU and trains on."""
    import dataclasses
    import math

    from memory3.model.config import Memory3Config
    from memory3.model.init import random_model
    from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
    from memory3.services.trainer.data import TrainingData
    from memory3.services.trainer.train import StageConfig, TrainConfig, Trainer
    from memory3.services.trainer.world import World

    codec = TextCodec(byte_level_tokenizer())
    config = Memory3Config.from_name("tiny")
    train = TrainConfig(seq_len=128, batch_size=2, eval_every=100, checkpoint_every=6, bf16=False,
                        stage1=StageConfig(steps=2, lr=1e-3, warmup_steps=1),
                        stage2=StageConfig(steps=2, lr=1e-3, warmup_steps=1),
                        stage3=StageConfig(steps=2, lr=3e-4, warmup_steps=0, decay_fraction=0.0))
    data = TrainingData(World(1, n_train=30, n_heldout=6), codec, config, seq_len=train.seq_len, seed=0)
    start = torch.cat([p.detach().reshape(-1) for p in random_model(config, seed=0).parameters()])

    def trained(device: str) -> Trainer:
        trainer = Trainer(random_model(config, seed=0).to(device), data,
                          dataclasses.replace(train, bf16=device == "cuda"), tmp_path / device,
                          prefix=codec.reference_prefix(config), progress=False)
        trainer.run()
        return trainer

    on_gpu, on_cpu = trained("cuda"), trained("cpu")
    assert on_gpu.autocast and next(on_gpu.model.parameters()).is_cuda
    losses = [[h["loss"] for h in t.history() if "loss" in h] for t in (on_gpu, on_cpu)]
    assert len(losses[0]) == 6 and all(math.isfinite(x) for x in losses[0])
    assert losses[0][0] == pytest.approx(losses[1][0], rel=5e-3)  # the same weights and tokens
    moved = [torch.cat([p.detach().cpu().reshape(-1) for p in t.model.parameters()]) - start
             for t in (on_gpu, on_cpu)]
    assert torch.nn.functional.cosine_similarity(moved[0], moved[1], dim=0) > 0.95
    assert float(moved[0].norm() / moved[1].norm()) == pytest.approx(1.0, abs=0.1)

    one_more = dataclasses.replace(train, stage3=dataclasses.replace(train.stage3, steps=3))
    resumed = Trainer(random_model(config, seed=1), data, one_more, tmp_path / "cuda",
                      prefix=codec.reference_prefix(config), progress=False)
    resumed.load(on_gpu.latest_checkpoint())
    for (name, gpu_weight), cpu_weight in zip(on_gpu.model.state_dict().items(),
                                              resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(cpu_weight, gpu_weight.cpu(), rtol=0, atol=0, msg=name)
    resumed.run()  # the GPU's fused AdamW state steps on the CPU
    assert resumed.state.step == 7 and not next(resumed.model.parameters()).is_cuda
    assert math.isfinite([h["loss"] for h in resumed.history() if "loss" in h][-1])


def test_the_quality_benchs_diagnostics_on_cuda_give_the_cpus_figures(tiny_model, prefix, text_codec):
    """`bench quality --device cuda`: the attention on the right memory, the real-text perplexity and
    the kept-tokens variant run on the GPU, where the model is, with memories fetched to the CPU."""
    import copy

    from memory3.bench.quality import _with_kept_tokens, attention_on_the_right_memory, real_text_perplexity
    from memory3.model.encoder import encode_references

    refs = [torch.randint(3, 250, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(5)]
    with torch.no_grad():
        memories = encode_references(tiny_model, refs, prefix)
    body = [1, *range(3, 30)]
    documents = ["The lighthouse of Dastra guides the fishing boats home at night. " * 6] * 2

    def figures(model):
        attention = attention_on_the_right_memory(model, prefix, [body, body], [memories, memories], [1, 3])
        perplexity = real_text_perplexity(model, text_codec, documents, lambda queries: [["r"] * 5 for _ in queries],
                                          lambda ids: memories[: len(ids)])
        return attention, perplexity

    cpu = figures(tiny_model)
    gpu_model = copy.deepcopy(tiny_model).to("cuda")  # the session's model stays on the CPU, whatever happens here
    gpu = figures(gpu_model)
    assert next(_with_kept_tokens(gpu_model, 4).parameters()).is_cuda
    assert gpu[0] == pytest.approx(cpu[0], abs=1e-3)
    assert gpu[1]["memory"] == pytest.approx(cpu[1]["memory"], rel=1e-3)
    assert gpu[1]["no_memory"] == pytest.approx(cpu[1]["no_memory"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_data_parallel_training_on_two_gpus_over_nccl(tmp_path):
    """`torchrun --nproc-per-node 2 memory3 train --device cuda`: each process on its LOCAL_RANK's GPU,
    NCCL between them, the same weights on both after every step's all-reduce."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parents[1] / "integration" / "ddp_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), str(tmp_path), "cuda"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0][1] == "40"


def test_a_random_model_made_on_cuda_has_the_cpus_weights(tiny_config):
    """Training draws its initial weights into the GPU's model, a parameter at a time (host memory never
    holds the whole model): the same weights as on the CPU, so a seed means one model anywhere."""
    from memory3.model.checkpoint import weights_digest
    from memory3.model.init import random_model

    made = random_model(tiny_config, seed=3, device="cuda")
    assert {p.device.type for p in made.parameters()} == {"cuda"}
    assert weights_digest(made) == weights_digest(random_model(tiny_config, seed=3))
