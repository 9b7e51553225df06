"""The model's invariants: Llama parity, memory attention semantics, cached decoding."""

import math

import pytest
import torch

from memory3.model.encoder import encode_references
from memory3.model.generate import GenerationOutput, SamplingParams, generate, iter_generate
from memory3.model.hf_llama import llama_config_kwargs, to_llama_state_dict
from memory3.model.layout import chunk_groups, rope_positions
from memory3.model.memory import ExplicitMemory, prime_slot_valid, stack_memories
from memory3.model.model import RMSNorm, apply_rope


def random_memory(config, n_valid=None, scale=1.0) -> ExplicitMemory:
    shape = (config.n_memory_layers, config.n_kv_head, config.mem_tokens_per_head, config.head_dim)
    positions = torch.arange(config.mem_tokens_per_head).expand(shape[:3]).clone()
    keys, values = torch.randn(shape) * scale, torch.randn(shape) * scale
    if n_valid is not None:
        positions[..., n_valid:] = -1
        keys[..., n_valid:, :] = 0
        values[..., n_valid:, :] = 0
    return ExplicitMemory(keys, values, positions)


def context(prefix, body):
    tokens = torch.tensor([list(prefix) + list(body)])
    slots = torch.arange(tokens.shape[1])[None]
    return tokens, slots


def test_without_memory_equals_transformers_llama(tiny_model, tiny_config):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_kwargs(tiny_config)))
    hf.load_state_dict(to_llama_state_dict(tiny_model.state_dict(), tiny_config), strict=True)
    hf.eval()
    tokens = torch.randint(0, tiny_config.vocab_size, (3, 90))
    positions = torch.arange(90)[None].expand(3, -1)
    with torch.no_grad():
        ours = tiny_model(tokens, positions)
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_logits_at_one_token_per_sequence_are_those_of_the_full_pass(tiny_model, tiny_config):
    tokens = torch.randint(0, tiny_config.vocab_size, (3, 40))
    positions = torch.arange(40)[None].expand(3, -1)
    at = torch.tensor([39, 0, 17])
    with torch.no_grad():
        full = tiny_model(tokens, positions)
        one = tiny_model(tokens, positions, logits_at=at)
    assert one.shape == (3, 1, tiny_config.vocab_size)
    torch.testing.assert_close(one[:, 0], full[torch.arange(3), at], rtol=1e-5, atol=1e-5)


def test_a_prefill_over_a_given_context_span_equals_one_over_its_own(tiny_model, tiny_config):
    """kv_len past the prompt (the whole cache, as a captured prefill passes it): the slots after
    each token's are masked, whatever an earlier sequence left in them."""
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 30))
    slots = torch.arange(30)[None].expand(2, -1)
    last = torch.tensor([29, 11])
    out = []
    with torch.no_grad():
        for kv_len in (None, 64):
            tiny_model.setup_caches(2, 64, memory=False)
            for layer in tiny_model.layers:
                layer.attention.kv_cache.k.normal_()  # a previous sequence's keys and values
                layer.attention.kv_cache.v.normal_()
            out.append(tiny_model(tokens, slots, cache_slots=slots, logits_at=last, kv_len=kv_len))
            tiny_model.clear_caches()
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="kv_len .* with cache_slots"):
            tiny_model(tokens, slots, kv_len=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_llamas_bit_for_bit(dtype):
    LlamaRMSNorm = pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm
    ours, theirs = RMSNorm(320, 1e-5).to(dtype), LlamaRMSNorm(320, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
        x = (torch.randn(3, 7, 320) * 5).to(dtype)
        assert torch.equal(ours(x), theirs(x))


def naive_memory_attention(attn, x, cos, sin, mem_k, mem_v, mem_valid, token_group, slot_group):
    """Token by token: softmax over [own group's valid memory slots, causal context]."""
    q, k, v = attn.project(x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = attn.n_head // attn.n_kv_head
    _, n_head, seq_len, head_dim = q.shape
    out = torch.zeros_like(q)
    for t in range(seq_len):
        for h in range(n_head):
            kv = h // group
            use = (slot_group == token_group[0, t]) & mem_valid[0]
            keys = torch.cat([mem_k[0, kv][use], k[0, kv, : t + 1]])
            vals = torch.cat([mem_v[0, kv][use], v[0, kv, : t + 1]])
            w = torch.softmax(keys @ q[0, h, t] / math.sqrt(head_dim), dim=0)
            out[0, h, t] = w @ vals
    return attn.wo(out.transpose(1, 2).reshape(1, seq_len, -1))


def test_memory_attention_equals_naive_reference(tiny_model, tiny_config, prefix):
    layer = tiny_model.layers[tiny_config.memory_layers[0]]
    body_len = 150  # three chunks, the last one partial
    tokens, slots = context(prefix, torch.randint(3, 250, (body_len,)).tolist())
    positions = rope_positions(slots, len(prefix), tiny_config.ref_len)
    groups = [[[random_memory(tiny_config) for _ in range(5)],
               [random_memory(tiny_config, n_valid=3), random_memory(tiny_config)],
               []]]
    memory = stack_memories(groups, slots_per_group=tiny_config.mem_slots)
    token_group = chunk_groups(slots, len(prefix), tiny_config.chunk_len)
    x = torch.randn(1, tokens.shape[1], tiny_config.dim)
    cos, sin = tiny_model.rope(positions, x.dtype)
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()[None, None]
    mask = torch.cat([memory.visibility(token_group), causal], dim=-1)
    with torch.no_grad():
        fast = layer.attention(x, cos, sin, mask, (memory.k[0], memory.v[0]), None, tokens.shape[1])
        slow = naive_memory_attention(layer.attention, x, cos, sin, memory.k[0], memory.v[0], memory.valid,
                                      token_group, memory.slot_group)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_chunk_reads_only_its_own_memories(tiny_model, tiny_config, prefix):
    tokens, slots = context(prefix, torch.randint(3, 250, (128,)).tolist())
    positions = rope_positions(slots, len(prefix), tiny_config.ref_len)
    token_group = chunk_groups(slots, len(prefix), tiny_config.chunk_len)
    chunk0 = [random_memory(tiny_config) for _ in range(5)]
    before = stack_memories([[chunk0, [random_memory(tiny_config) for _ in range(5)]]],
                            slots_per_group=tiny_config.mem_slots)
    after = stack_memories([[chunk0, [random_memory(tiny_config) for _ in range(5)]]],
                           slots_per_group=tiny_config.mem_slots)
    none = stack_memories([[[], [random_memory(tiny_config)]]], slots_per_group=tiny_config.mem_slots)
    with torch.no_grad():
        a = tiny_model(tokens, positions, memory=before, token_group=token_group)
        b = tiny_model(tokens, positions, memory=after, token_group=token_group)
        c = tiny_model(tokens, positions, memory=none, token_group=token_group)
    first = len(prefix) + tiny_config.chunk_len  # slots before this are the prefix and chunk 0
    torch.testing.assert_close(a[:, :first], b[:, :first], rtol=0, atol=0)
    assert (a[:, first:] - b[:, first:]).abs().max() > 1e-2  # chunk 1's own memories changed
    assert (a[:, len(prefix):first] - c[:, len(prefix):first]).abs().max() > 1e-2  # chunk 0 lost its memories
    torch.testing.assert_close(a[:, : len(prefix)], c[:, : len(prefix)], rtol=0, atol=0)  # prefix sees none


def test_masked_out_memories_equal_no_memory(tiny_model, tiny_config, prefix):
    tokens, slots = context(prefix, torch.randint(3, 250, (80,)).tolist())
    positions = rope_positions(slots, len(prefix), tiny_config.ref_len)
    memory = stack_memories([[[random_memory(tiny_config)]]], slots_per_group=tiny_config.mem_slots)
    nobody = torch.full_like(slots, -1)
    with torch.no_grad():
        with_hidden_memory = tiny_model(tokens, positions, memory=memory, token_group=nobody)
        plain = tiny_model(tokens, positions)
    torch.testing.assert_close(with_hidden_memory, plain, rtol=1e-5, atol=1e-5)


def full_forward_logits(model, config, prefix, prompt, generated, groups):
    """Logits of one sequence in a single pass, assigning memory groups as generation does."""
    body = list(prompt) + list(generated[:-1])
    tokens, slots = context(prefix, body)
    n_prompt_chunks = math.ceil(len(prompt) / config.chunk_len)
    token_group = chunk_groups(slots, len(prefix), config.chunk_len)
    for i in range(len(prompt), len(body)):
        g = i - len(prompt)
        token_group[0, len(prefix) + i] = n_prompt_chunks - 1 + g // config.chunk_len
    memory = stack_memories([groups], slots_per_group=config.mem_slots)
    positions = rope_positions(slots, len(prefix), config.ref_len)
    with torch.no_grad():
        logits = model(tokens, positions, memory=memory, token_group=token_group)
    return logits[0, len(prefix) + len(prompt) - 1 :]


class RecordingProvider:
    def __init__(self, bank, per_query=5):
        self.bank, self.per_query, self.calls = bank, per_query, []

    def __call__(self, queries):
        out = []
        for q in queries:
            start = sum(q) % len(self.bank)
            mems = [self.bank[(start + j) % len(self.bank)] for j in range(self.per_query)]
            self.calls.append((list(q), mems))
            out.append(mems)
        return out


def capturing(provider):
    """A provider that also records every memory group it returned, in order."""
    captured = []

    def capture(queries):
        found = provider(queries)
        captured.extend(found)
        return found

    return capture, captured


@pytest.fixture(scope="module")
def memory_bank(tiny_model, tiny_config, prefix):
    refs = [torch.randint(3, 250, (n,)).tolist() for n in (128, 40, 5, 128, 90, 128, 64, 3, 128, 100)]
    with torch.no_grad():
        return encode_references(tiny_model, refs, prefix)


def test_cached_decoding_equals_full_forward_across_chunks_and_swaps(tiny_model, tiny_config, prefix, memory_bank):
    prompt = [1, *torch.randint(3, 250, (99,)).tolist()]  # two prompt chunks, the second partial
    capture, captured = capturing(RecordingProvider(memory_bank))
    steps = 140  # crosses two decode-time memory swaps (after 64 and 128 generated tokens)
    with torch.no_grad():
        out = generate(tiny_model, [prompt], prefix=prefix, max_new_tokens=steps, memory_provider=capture)
    assert len(out.retrievals[0]) == 2 + 2
    # The swap queries are the previous 64 generated tokens.
    assert out.retrievals[0][2] == out.tokens[0][:64] and out.retrievals[0][3] == out.tokens[0][64:128]
    logits = full_forward_logits(tiny_model, tiny_config, prefix, prompt, out.tokens[0], captured)
    assert logits.argmax(-1).tolist() == out.tokens[0]

    # Compare logits too, step by step, by teacher-forcing the generated tokens.
    incremental = decode_logits(tiny_model, tiny_config, prefix, prompt, out.tokens[0], captured)
    torch.testing.assert_close(incremental, logits, rtol=1e-4, atol=1e-4)


def test_query_lead_moves_the_swap_query_back_and_keeps_decoding_exact(tiny_model, tiny_config, prefix,
                                                                        memory_bank):
    prompt = [1, *torch.randint(3, 250, (30,)).tolist()]
    lead = 8
    capture, captured = capturing(RecordingProvider(memory_bank))
    with torch.no_grad():
        out = generate(tiny_model, [prompt], prefix=prefix, max_new_tokens=140, memory_provider=capture,
                       query_lead=lead)
    generated = out.tokens[0]
    # The first swap's window reaches back into the prompt (after its <s>); the second's does not.
    assert out.retrievals[0][1] == [*prompt[-lead:], *generated[: 64 - lead]]
    assert out.retrievals[0][2] == generated[64 - lead : 128 - lead]
    logits = full_forward_logits(tiny_model, tiny_config, prefix, prompt, generated, captured)
    assert logits.argmax(-1).tolist() == generated
    with pytest.raises(ValueError, match="query_lead"):
        generate(tiny_model, [prompt], prefix=prefix, max_new_tokens=4, memory_provider=capture,
                 query_lead=tiny_config.chunk_len)


def decode_logits(model, config, prefix, prompt, generated, groups):
    """Prefill + one decode step per generated token, swapping resident memories like generate()."""
    p = len(prefix)
    tokens, slots = context(prefix, prompt)
    positions = rope_positions(slots, p, config.ref_len)
    n_chunks = math.ceil(len(prompt) / config.chunk_len)
    memory = stack_memories([groups[:n_chunks]], slots_per_group=config.mem_slots)
    model.setup_caches(1, tokens.shape[1] + len(generated))
    try:
        with torch.no_grad():
            out = [model(tokens, positions, memory=memory, token_group=chunk_groups(slots, p, config.chunk_len),
                         cache_slots=slots)[0, -1]]
            model.set_resident_memory(stack_memories([[groups[n_chunks - 1]]], slots_per_group=config.mem_slots))
            for g, tok in enumerate(generated[:-1]):
                if g > 0 and g % config.chunk_len == 0:
                    swap = groups[n_chunks - 1 + g // config.chunk_len]
                    model.set_resident_memory(stack_memories([[swap]], slots_per_group=config.mem_slots))
                slot = torch.tensor([[p + len(prompt) + g]])
                out.append(model(torch.tensor([[tok]]), rope_positions(slot, p, config.ref_len),
                                 cache_slots=slot)[0, -1])
    finally:
        model.clear_caches()
    return torch.stack(out)


def test_cached_decoding_equals_full_forward_without_memory(tiny_model, tiny_config):
    prompt = [1, *torch.randint(3, 250, (70,)).tolist()]
    with torch.no_grad():
        out = generate(tiny_model, [prompt], max_new_tokens=30)
        tokens = torch.tensor([prompt + out.tokens[0][:-1]])
        logits = tiny_model(tokens, torch.arange(tokens.shape[1])[None])
    assert logits[0, len(prompt) - 1 :].argmax(-1).tolist() == out.tokens[0]


def test_batch_of_different_lengths_equals_one_by_one(tiny_model, tiny_config, prefix, memory_bank):
    prompts = [[1, *torch.randint(3, 250, (n,)).tolist()] for n in (20, 99, 64)]
    with torch.no_grad():
        batched = generate(tiny_model, prompts, prefix=prefix, max_new_tokens=70,
                           memory_provider=RecordingProvider(memory_bank))
        alone = [generate(tiny_model, [p], prefix=prefix, max_new_tokens=70,
                          memory_provider=RecordingProvider(memory_bank)) for p in prompts]
    assert batched.tokens == [a.tokens[0] for a in alone]
    assert batched.retrievals == [a.retrievals[0] for a in alone]


def test_memories_change_generation(tiny_model, tiny_config, prefix, memory_bank):
    prompt = [1, *torch.randint(3, 250, (30,)).tolist()]
    with torch.no_grad():
        a = generate(tiny_model, [prompt], prefix=prefix, max_new_tokens=20,
                     memory_provider=lambda qs: [memory_bank[:5] for _ in qs])
        b = generate(tiny_model, [prompt], prefix=prefix, max_new_tokens=20,
                     memory_provider=lambda qs: [memory_bank[5:] for _ in qs])
    assert a.tokens != b.tokens


def test_stop_tokens_end_a_sequence(tiny_model):
    prompt = [1, *torch.randint(3, 250, (10,)).tolist()]
    with torch.no_grad():
        free = generate(tiny_model, [prompt], max_new_tokens=12)
        stop_at = free.tokens[0][4]
        stopped = generate(tiny_model, [prompt], max_new_tokens=12, stop_tokens=[stop_at])
    first = free.tokens[0].index(stop_at)
    assert stopped.tokens[0] == free.tokens[0][: first + 1]
    assert stopped.finish_reasons == ["stop"] and isinstance(stopped, GenerationOutput)


def test_generation_validates_its_input(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny_model, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(tiny_model, [[1] * 10], max_new_tokens=tiny_config.max_seq_len)
    with pytest.raises(ValueError, match="reference prefix"):
        generate(tiny_model, [[1, 2]], max_new_tokens=4, memory_provider=lambda qs: [[] for _ in qs])
    vocab = tiny_config.vocab_size  # an IndexError on a CPU; on a GPU, an assert that breaks the process
    with pytest.raises(ValueError, match=f"prompt: token id {vocab} is outside the vocabulary"):
        generate(tiny_model, [[1, 2], [1, vocab]], max_new_tokens=4)
    with pytest.raises(ValueError, match="stop token: token id -1 is outside"):
        generate(tiny_model, [[1, 2]], max_new_tokens=4, stop_tokens=[-1], min_new_tokens=1)
    with pytest.raises(ValueError, match=f"reference: token id {vocab + 5} is outside"):
        encode_references(tiny_model, [[1, 2], [vocab + 5]], [1])
    assert not tiny_model.has_cache  # a failed call leaves no caches behind


@pytest.mark.parametrize("generated, lead, expected", [
    (list(range(100, 164)), 0, list(range(100, 164))),  # the previous chunk
    (list(range(100, 164)), 10, [*range(10, 20), *range(100, 154)]),  # ending 10 tokens before it
    ([], 30, []),  # fewer tokens known than the lead: none, not a slice from the end
    ([100, 101], 1, [*range(1, 20), 100]),
])
def test_query_window(generated, lead, expected):
    from memory3.model.generate import query_window

    assert query_window([0, *range(1, 20)], generated, 64, lead) == expected


def test_gather_memories_equals_stack_memories(tiny_config, memory_bank):
    from memory3.model.memory import gather_memories

    keys = torch.stack([m.keys for m in memory_bank])
    values = torch.stack([m.values for m in memory_bank])
    positions = torch.stack([m.positions for m in memory_bank])
    index = torch.tensor([[[0, 2, -1, -1, -1], [7, 1, 3, 4, 5]], [[9, -1, -1, -1, -1], [-1, -1, -1, -1, -1]]])
    gathered = gather_memories(keys, values, positions, index)
    groups = [[[memory_bank[i] for i in grp if i >= 0] for grp in seq] for seq in index.tolist()]
    stacked = stack_memories(groups, slots_per_group=tiny_config.mem_slots)
    # stack_memories packs a group's memories first; gather keeps their slots. Compare per slot set.
    assert gathered.k.shape == stacked.k.shape
    for b in range(2):
        for g in range(2):
            sl = slice(g * tiny_config.mem_slots, (g + 1) * tiny_config.mem_slots)
            assert gathered.valid[b, sl].sum() == stacked.valid[b, sl].sum()
            a = gathered.k[:, b, :, sl][..., gathered.valid[b, sl], :]
            s = stacked.k[:, b, :, sl][..., stacked.valid[b, sl], :]
            torch.testing.assert_close(a, s)


def resident(model, row):
    """Per memory layer, the row's valid resident K/V; and the row's additive resident mask."""
    caches = [layer.attention.kv_cache for layer in model.layers if layer.is_memory_layer]
    seen = caches[0].mem_valid[row]
    return [(c.k[row, :, : c.mem_slots][:, seen], c.v[row, :, : c.mem_slots][:, seen]) for c in caches], \
        model._resident_mask[row].clone()


def test_installing_memories_in_place_equals_setting_them_resident(tiny_model, tiny_config, memory_bank):
    """The engine's per-row install (plain slices, padding masked) leaves what set_resident_memory
    leaves, and a later install of fewer memories masks the slots the earlier ones filled."""
    tiny_model.setup_caches(3, 64)
    try:
        for memories in (memory_bank[0:5], memory_bank[5:7], memory_bank[2:3]):
            tiny_model.set_resident_memory(stack_memories([[memories]], slots_per_group=tiny_config.mem_slots),
                                           rows=torch.tensor([1]))
            expected = resident(tiny_model, 1)
            tiny_model.clear_resident_memory()
            tiny_model.install_memories(2, memory_bank[7:10])  # an earlier stream's, overwritten below
            tiny_model.install_memories(2, memories)
            got = resident(tiny_model, 2)
            for (gk, gv), (ek, ev) in zip(got[0], expected[0], strict=True):
                torch.testing.assert_close(gk, ek)
                torch.testing.assert_close(gv, ev)
            assert torch.equal(got[1], expected[1])
            assert torch.isinf(tiny_model._resident_mask[0]).all()  # other rows untouched
        tiny_model.install_memories(2, [])
        assert torch.isinf(tiny_model._resident_mask[2]).all()
        with pytest.raises(ValueError, match="do not fit the"):
            tiny_model.install_memories(0, memory_bank[:tiny_config.mems_per_chunk + 1])
        wrong = ExplicitMemory(*(t[:, :1] for t in (memory_bank[0].keys, memory_bank[0].values,
                                                    memory_bank[0].positions)))
        with pytest.raises(ValueError, match="do not fit this model"):
            tiny_model.install_memories(0, [wrong])
        with pytest.raises(ValueError, match="different shapes"):
            tiny_model.install_memories(0, [memory_bank[0], wrong])
    finally:
        tiny_model.clear_caches()


def test_keeping_a_prefill_group_resident_equals_installing_its_memories(tiny_model, tiny_config, memory_bank):
    """What a prefill leaves resident (one group, cut from all its groups) equals installing that
    group's memories on their own."""
    groups = [[memory_bank[0:3], memory_bank[3:5]], [memory_bank[5:6]], [memory_bank[6:8], [], memory_bank[8:10]]]
    stacked = stack_memories(groups, slots_per_group=tiny_config.mem_slots)
    tiny_model.setup_caches(4, 64)
    try:
        for sequence, group, row in ((2, 2, 3), (0, 1, 0), (1, 0, 1)):
            tiny_model.keep_resident(row, stacked, sequence, group)
            kept = resident(tiny_model, row)
            tiny_model.install_memories(row, groups[sequence][group])
            installed = resident(tiny_model, row)
            assert torch.equal(kept[1], installed[1]) and not torch.isinf(kept[1]).all()
            for (kk, kv), (ik, iv) in zip(kept[0], installed[0], strict=True):
                torch.testing.assert_close(kk, ik)
                torch.testing.assert_close(kv, iv)
    finally:
        tiny_model.clear_caches()


def test_a_prefill_attends_chunk_by_chunk_as_the_masked_pass_does(tiny_model, tiny_config, memory_bank):
    """A cached pass over whole chunks takes the chunk-major attention; its logits equal the
    uncached pass, which masks every group's slots (the last chunk partial: padded queries)."""
    torch.manual_seed(3)
    tokens = torch.randint(3, 250, (2, 150))  # three chunks of 64, the last one of 22 tokens
    slots = torch.arange(150)[None].expand(2, -1)
    groups = [[memory_bank[0:5], memory_bank[5:7], memory_bank[7:10]], [memory_bank[3:4], [], memory_bank[0:2]]]
    memory = stack_memories(groups, slots_per_group=tiny_config.mem_slots)
    token_group = chunk_groups(slots, 0, tiny_config.chunk_len)
    with torch.no_grad():
        masked = tiny_model(tokens, slots, memory=memory, token_group=token_group)
        tiny_model.setup_caches(2, 160)
        try:
            assert tiny_model._chunk_layout(memory, token_group) == 3
            chunked = tiny_model(tokens, slots, memory=memory, token_group=token_group, cache_slots=slots)
        finally:
            tiny_model.clear_caches()
    torch.testing.assert_close(chunked, masked, rtol=1e-5, atol=1e-5)
    # A layout that is not chunk-aligned (prefix tokens inside the pass) keeps the masked pass.
    assert tiny_model._chunk_layout(memory, chunk_groups(slots, 11, tiny_config.chunk_len)) == 0


def test_memory_layers_need_not_start_at_zero(tiny_config, prefix):
    import dataclasses

    from memory3.model.init import random_model

    config = dataclasses.replace(tiny_config, memory_layers=(1, 3))
    model = random_model(config, seed=2, std=0.2)
    refs = [torch.randint(3, 250, (n,)).tolist() for n in (128, 30, 77, 128, 6)]
    with torch.no_grad():
        bank = encode_references(model, refs, prefix)
    assert bank[0].keys.shape[0] == 2
    prompt = [1, *torch.randint(3, 250, (80,)).tolist()]
    capture, captured = capturing(RecordingProvider(bank))
    with torch.no_grad():
        out = generate(model, [prompt], prefix=prefix, max_new_tokens=70, memory_provider=capture)
    logits = full_forward_logits(model, config, prefix, prompt, out.tokens[0], captured)
    assert logits.argmax(-1).tolist() == out.tokens[0]


def test_prefix_kv_is_reused_until_the_weights_change(tiny_config, prefix):
    from memory3.model.init import random_model

    model = random_model(tiny_config, seed=3, std=0.2)
    prefix_t = torch.tensor(prefix)
    p = len(prefix)

    def written_prefix() -> list[torch.Tensor]:
        model.setup_caches(2, 16, memory=True)
        with torch.no_grad():
            model.write_prefix(prefix_t, torch.tensor([1]))
        out = [layer.attention.kv_cache.k[1, :, layer.attention.kv_cache.mem_slots:][:, :p].clone()
               for layer in model.layers]
        model.clear_caches()
        return out

    def fresh_prefix() -> list[torch.Tensor]:
        with torch.no_grad():
            tokens, slots = context(prefix, [])
            model.setup_caches(1, 16, memory=True)
            model(tokens, slots, cache_slots=slots)
            out = [layer.attention.kv_cache.k[0, :, layer.attention.kv_cache.mem_slots:][:, :p].clone()
                   for layer in model.layers]
        model.clear_caches()
        return out

    first = written_prefix()
    for a, b in zip(first, fresh_prefix(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(first, written_prefix(), strict=True):  # from the kept copy
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        model.layers[0].attention.wqkv.weight.mul_(1.5)
    changed = written_prefix()
    assert not torch.allclose(changed[0], first[0])
    for a, b in zip(changed, fresh_prefix(), strict=True):
        torch.testing.assert_close(a, b)


def test_stack_memories_lays_out_slots_in_order(tiny_config, memory_bank):
    """Group g's memory j fills slots g * mem_slots + j * k onwards; the rest of a group is masked."""
    k = tiny_config.mem_tokens_per_head
    groups = [[memory_bank[0:2], []], [memory_bank[2:3]]]
    stacked = stack_memories(groups, slots_per_group=tiny_config.mem_slots)
    assert stacked.k.shape[:2] == (tiny_config.n_memory_layers, 2)
    assert stacked.n_slots == 2 * tiny_config.mem_slots
    for b, seq in enumerate(groups):
        expected_valid = torch.zeros(stacked.n_slots, dtype=torch.bool)
        for g, grp in enumerate(seq):
            for j, mem in enumerate(grp):
                at = slice(g * tiny_config.mem_slots + j * k, g * tiny_config.mem_slots + (j + 1) * k)
                torch.testing.assert_close(stacked.k[:, b, :, at], mem.keys)
                torch.testing.assert_close(stacked.v[:, b, :, at], mem.values)
                expected_valid[at] = mem.slot_valid
        assert torch.equal(stacked.valid[b], expected_valid)
    assert stacked.slot_group.tolist() == [0] * tiny_config.mem_slots + [1] * tiny_config.mem_slots


def test_slot_valid_of_a_batch_of_memories_is_each_memorys_own_and_is_kept(memory_bank):
    """One pass over fresh memories of any shapes gives what each memory computes alone."""
    fresh = [ExplicitMemory(m.keys, m.values, m.positions) for m in memory_bank]
    longer = ExplicitMemory(torch.zeros(2, 2, 12, 4), torch.zeros(2, 2, 12, 4),
                            torch.tensor([*range(10), -1, -1]).expand(2, 2, 12))  # another k
    fresh.append(longer)
    cached = fresh[0].slot_valid  # computed before: kept as it is
    prime_slot_valid(fresh)
    assert fresh[0].slot_valid is cached
    for mem in fresh:
        assert torch.equal(mem.slot_valid, (mem.positions >= 0).all(dim=0).all(dim=0))
    assert longer.slot_valid.tolist() == [True] * 10 + [False] * 2
    assert any(not mem.slot_valid.all() for mem in fresh[:-1]), "the bank holds references shorter than k"


def test_a_last_prompt_chunk_without_memories_decodes_without(tiny_model, tiny_config, prefix, memory_bank):
    """The first generated chunk inherits the last prompt chunk's memories, which may be none while
    an earlier chunk had some (the overlap filter dropped them all): that raised in stack_memories."""
    from memory3.model.static_decode import StaticDecoder, generate_static

    prompts = [[1, *torch.randint(3, 250, (99,)).tolist()] for _ in range(2)]
    last_of_first = prompts[0][tiny_config.chunk_len:]

    def provider(queries):
        return [[] if q == last_of_first else memory_bank[:5] for q in queries]

    with torch.no_grad():
        eager = generate(tiny_model, prompts, prefix=prefix, max_new_tokens=8, memory_provider=provider)
        decoder = StaticDecoder(tiny_model, 2, len(prefix) + 100 + 8, memory=True, prefix_len=len(prefix))
        static = generate_static(decoder, prompts, prefix=prefix, max_new_tokens=8, memory_provider=provider)
        without = generate(tiny_model, prompts[:1], prefix=prefix, max_new_tokens=8,
                           memory_provider=lambda qs: [[] if q == last_of_first else memory_bank[5:] for q in qs])
    assert eager.tokens == static.tokens
    assert eager.retrievals[0][-1] == last_of_first
    assert eager.tokens[0] != without.tokens[0]  # its first chunk's memories still count in the prefill


def test_memories_of_another_model_are_refused_by_name(tiny_model, tiny_config, prefix, memory_bank):
    """Memories of 4 tokens a head stood in, two for one, for memories of 8 (another sparsity)."""
    half = [ExplicitMemory(*(t[:, :, :4] for t in (m.keys, m.values, m.positions))) for m in memory_bank[:10]]
    tiny_model.setup_caches(1, 64)
    try:
        with pytest.raises(ValueError, match=r"do not fit this model: need \(2, 2, 8, 16\)"):
            tiny_model.install_memories(0, half)
    finally:
        tiny_model.clear_caches()
    with pytest.raises(ValueError, match=r"a memory of shape \(2, 2, 4, 16\) does not fit this model"):
        generate(tiny_model, [[1, 5, 6]], prefix=prefix, max_new_tokens=2,
                 memory_provider=lambda qs: [half for _ in qs])


def test_sampling_params_refuse_what_sampling_cannot_use():
    with pytest.raises(ValueError, match="finite number"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be an integer"):
        SamplingParams(top_k=True)
    assert SamplingParams(temperature=1e-45).temperature == 0.0  # 1/t overflowed to inf: greedy


def test_explicit_memory_to_takes_a_dtype_as_tensor_to_does(memory_bank):
    memory = memory_bank[0].to(torch.bfloat16)
    assert memory.keys.dtype == memory.values.dtype == torch.bfloat16 and memory.positions.dtype == torch.long


def test_a_second_generation_on_a_model_in_use_is_refused(tiny_model):
    """Both shared the model's caches: the first stream went on with the second's, silently."""
    first = iter_generate(tiny_model, [[1, 5, 6, 7]], max_new_tokens=6)
    next(first)
    with pytest.raises(ValueError, match="caches are held by another generation"):
        generate(tiny_model, [[1, 9]], max_new_tokens=2)
    first.close()
    assert not tiny_model.has_cache
    assert generate(tiny_model, [[1, 9]], max_new_tokens=2).tokens
