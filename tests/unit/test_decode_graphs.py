"""The serving engine's decode pass in fixed shapes (`model/decode_graphs.py`): what padding to a
batch bucket and attending over a context bucket must leave unchanged, and what a CUDA graph
capture needs of the pass."""

import contextlib

import pytest
import torch

from memory3.model import decode_graphs
from memory3.model import model as model_module
from memory3.model.decode_graphs import DecodePasses, batch_buckets, context_buckets
from memory3.model.memory import ExplicitMemory
from memory3.model.model import attend
from memory3.model.static_decode import capture_graph

from .host_reads import NoHostReads


def test_batch_buckets_double_up_to_the_cache_rows():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("max_seq_len", [100, 256, 300, 1024, 4096, 5000])
def test_context_buckets_grow_by_at_most_half_and_end_at_the_cache_length(max_seq_len):
    sizes = context_buckets(max_seq_len)
    assert sizes[-1] == max_seq_len and sizes == sorted(set(sizes))
    assert all(b <= 1.5 * a for a, b in zip(sizes, sizes[1:-1], strict=False))
    assert sizes[0] == min(256, max_seq_len)
    assert len(sizes) <= 2 * max(1, (max_seq_len // 256).bit_length()) + 1  # a few dozen shapes, not one per length


def test_passes_pick_the_smallest_bucket_that_holds_them(tiny_model):
    static = DecodePasses(tiny_model, 5, 1000, static=True, cuda_graph=False)
    assert [static.rows_for(n) for n in range(1, 6)] == [1, 2, 4, 4, 5]
    assert [static.context_for(n) for n in (1, 256, 257, 385, 999, 1000)] == [256, 256, 384, 512, 1000, 1000]
    dynamic = DecodePasses(tiny_model, 5, 1000, static=False, cuda_graph=False)
    assert [dynamic.rows_for(3), dynamic.context_for(300)] == [3, 300]
    with pytest.raises(ValueError, match="exceeds the cache's 1000"):
        static.context_for(1001)


def test_cuda_graphs_need_static_shapes_on_a_cuda_device(tiny_model):
    with pytest.raises(ValueError, match="static shapes and a model on a CUDA device"):
        DecodePasses(tiny_model, 2, 64, static=True, cuda_graph=True)  # the model is on the CPU


@contextlib.contextmanager
def _caches_cleared(model):
    """The session's model leaves without caches, whatever the test did."""
    try:
        yield
    finally:
        model.clear_caches()


def _rows_with_contexts(model, config, memories, rows, lengths, with_memories=(0, 2)):
    """Caches of `rows` rows whose contexts hold `lengths` random tokens; rows `with_memories` with resident
    memories (5 and 2)."""
    model.setup_caches(rows, 1000, memory=True)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, 250, (1, n))
        slots = torch.arange(n)[None]
        model(tokens, slots, cache_slots=slots, cache_rows=torch.tensor([row]))
    model.install_memories(with_memories[0], memories[:5])
    model.install_memories(with_memories[1], memories[2:4])


@pytest.fixture
def memories(tiny_config):
    gen = torch.Generator().manual_seed(3)
    shape = tiny_config.memory_shape
    out = []
    for _ in range(6):
        positions = torch.arange(shape[2]).expand(shape[0], shape[1], -1).clone()
        out.append(ExplicitMemory(keys=torch.randn(shape, generator=gen), values=torch.randn(shape, generator=gen),
                                  positions=positions))
    return out


def test_a_padded_pass_over_a_context_bucket_gives_each_row_the_logits_of_the_exact_pass(tiny_model, tiny_config,
                                                                                       memories):
    """Three rows (contexts 300, 40, 129; two with resident memories) decode one token: the pass padded
    to 4 rows over 384 context slots gives the logits that the pass of 3 rows over 301 slots gives."""
    tokens = torch.tensor([[5], [7], [9]])
    slots = torch.tensor([[300], [40], [129]])
    with torch.inference_mode(), _caches_cleared(tiny_model):
        _rows_with_contexts(tiny_model, tiny_config, memories, 4, [300, 40, 129])
        saved = [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone())
                 for layer in tiny_model.layers]
        exact = tiny_model(tokens, slots, cache_slots=slots)[:, -1]
        for layer, (k, v) in zip(tiny_model.layers, saved, strict=True):  # undo the exact pass's writes
            layer.attention.kv_cache.k.copy_(k)
            layer.attention.kv_cache.v.copy_(v)
        passes = DecodePasses(tiny_model, 4, 1000, static=True, cuda_graph=False)
        rows = passes.rows_for(3)
        padded = (torch.cat([tokens, torch.zeros(rows - 3, 1, dtype=torch.long)]),
                  torch.cat([slots, torch.zeros(rows - 3, 1, dtype=torch.long)]))
        seen = []
        original = type(tiny_model).forward
        try:
            type(tiny_model).forward = lambda self, *a, **kw: (seen.append((a[0].shape, kw["kv_len"])),
                                                               original(self, *a, **kw))[1]
            logits = passes(padded[0], padded[1], padded[1])
        finally:
            type(tiny_model).forward = original
    assert seen == [(torch.Size([4, 1]), 384)]
    assert logits.shape == (4, tiny_config.vocab_size)
    torch.testing.assert_close(logits[:3], exact, rtol=1e-5, atol=1e-5)


def test_the_pass_reads_no_device_value_and_keeps_what_it_reads_at_fixed_addresses(tiny_model, tiny_config,
                                                                                  memories, prefix):
    """A CUDA graph replays the addresses it captured: the resident memory mask, rewritten by
    every swap, prefix write and clear, must stay where it was; the pass may not read a device value."""
    with torch.inference_mode(), _caches_cleared(tiny_model):
        _rows_with_contexts(tiny_model, tiny_config, memories, 2, [30, 10], with_memories=(0, 1))
        passes = DecodePasses(tiny_model, 2, 1000, static=True, cuda_graph=False)
        mask = tiny_model._resident_mask
        reads = passes._reads()
        addresses = [t.data_ptr() for t in reads]
        tiny_model.install_memories(1, memories[1:3])
        tiny_model.write_prefix(torch.tensor(prefix), torch.tensor([0]))
        tiny_model.clear_resident_memory()
        tiny_model.install_memories(0, memories[:1])
        tokens = torch.randint(3, 250, (1, 70))
        slots = torch.arange(len(prefix), len(prefix) + 70)[None]
        tiny_model(tokens, slots, cache_slots=slots, cache_rows=torch.tensor([1]))  # a prefill
        passes(torch.tensor([[3], [4]]), torch.tensor([[30], [10]]), torch.tensor([[30], [10]]))  # and a pass
        assert all(now is then for now, then in zip(passes._reads(), reads, strict=True))
        assert [t.data_ptr() for t in passes._reads()] == addresses
        assert torch.equal(mask[0, :tiny_config.mem_tokens_per_head] == 0, memories[0].positions[0, 0] >= 0)
        assert bool((mask[1] == float("-inf")).all())  # cleared
        with NoHostReads():
            passes._run(2, 256)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_a_single_query_reads_grouped_kv_heads_as_repeated_ones_where_no_fused_kernel_takes_both(monkeypatch, n_kv):
    """On CUDA (no fused kernel for grouped KV heads with a mask) a decode step's query heads are
    folded onto their KV head instead of repeating K/V; the result is the repeated heads'."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=gen)
    k, v = torch.randn(3, n_kv, 50, 16, generator=gen), torch.randn(3, n_kv, 50, 16, generator=gen)
    mask = torch.where(torch.rand(3, 1, 1, 50, generator=gen) < 0.3, float("-inf"), 0.0)
    mask[..., 0] = 0.0
    expected = attend(q, k, v, mask)  # the CPU's fused kernel
    repeated = torch.nn.functional.scaled_dot_product_attention(
        q, model_module.repeat_kv(k, 8), model_module.repeat_kv(v, 8), attn_mask=mask)
    monkeypatch.setattr(model_module, "fused_masked_gqa", lambda device: False)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: (calls.append(k.shape[1]), sdpa(q, k, v, **kw))[1])
    folded = attend(q, k, v, mask)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded, repeated, rtol=1e-5, atol=1e-6)
    assert calls == [n_kv]  # K/V as they are, not repeated to 8 heads
    attend(torch.randn(3, 8, 2, 16), k, v, mask.expand(-1, -1, 2, -1).contiguous())  # two queries: repeated
    assert calls == [n_kv, 8]


class _Graph:
    """Stands in for a captured CUDA graph: a replay runs the pass into its output buffer."""

    def __init__(self, passes, rows, context):
        self.passes, self.rows, self.context, self.replays = passes, rows, context, 0
        self.out = passes._run(rows, context).clone()

    def replay(self):
        self.replays += 1
        self.out.copy_(self.passes._run(self.rows, self.context))


def test_a_replay_fails_once_the_caches_it_read_are_replaced(tiny_model, tiny_config, memories):
    """A graph keeps reading the addresses it captured: after `setup_caches` it would read freed memory."""
    with torch.inference_mode(), _caches_cleared(tiny_model):
        _rows_with_contexts(tiny_model, tiny_config, memories, 2, [30, 10], with_memories=(0, 1))
        passes = DecodePasses(tiny_model, 2, 1000, static=True, cuda_graph=False)
        graph = _Graph(passes, 2, 256)
        passes.graphs[2, 256], passes._bound = (graph, graph.out), passes._reads()
        tokens, slots = torch.tensor([[5], [6]]), torch.tensor([[30], [10]])
        assert passes(tokens, slots, slots) is graph.out and graph.replays == 1
        tiny_model.install_memories(1, memories[3:5])  # in place: still replayed
        assert passes(tokens, slots + 1, slots + 1) is graph.out and graph.replays == 2
        tiny_model.setup_caches(2, 1000, memory=True)
        with pytest.raises(RuntimeError, match="replaced since the decode passes were captured"):
            passes(tokens, slots, slots)
        assert graph.replays == 2
        passes.release()
        assert passes.graphs == {} and passes(tokens, slots, slots).shape == (2, tiny_config.vocab_size)


def test_a_refused_capture_leaves_passes_eager_and_unpadded(tiny_model, monkeypatch):
    passes = DecodePasses(tiny_model, 8, 1000, static=True, cuda_graph=False)
    passes.cuda_graph = True  # as on a CUDA device
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_graphs, "capture_graph", refuse)
    with pytest.warns(RuntimeWarning, match="decoding eagerly: operation not permitted"):
        passes.capture()
    assert passes.graphs == {} and "not permitted" in passes.error
    assert [passes.rows_for(3), passes.context_for(300)] == [3, 300]


def test_a_capture_runs_on_the_models_device_not_the_threads(monkeypatch):
    """A worker thread is on cuda:0: a model on cuda:1 captured from there ran its kernels on cuda:1's
    stream while cuda:0's was captured (an empty graph). The CUDA calls are recorded here, not made."""
    calls, device = [], [None]

    class Guard:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def __enter__(self):
            calls.append(("enter", self.name, self.value))
            if self.name == "device":
                device[0] = self.value

        def __exit__(self, *exc):
            calls.append(("exit", self.name, self.value))
            if self.name == "device":
                device[0] = None

    class Stream:
        def __init__(self, dev=None):
            self.device = dev

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "device", lambda d: Guard("device", d))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: Stream(d))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Guard("stream", s.device))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kw: Guard("graph", (kw["pool"], kw["stream"])))
    cuda1 = torch.device("cuda", 1)
    graph, out = capture_graph(lambda: calls.append(("run", device[0])) or "logits", cuda1, warmups=2,
                               pool="pool", stream="capture stream")
    assert (graph, out) == ("graph", "logits")
    assert [c for c in calls if c[0] == "run"] == [("run", cuda1)] * 3  # two warm-ups and the capture
    assert calls[0] == ("enter", "device", cuda1) and calls[-1] == ("exit", "device", cuda1)
    assert ("enter", "graph", ("pool", "capture stream")) in calls
