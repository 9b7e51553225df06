"""Benchmarks run end to end at toy sizes and report what they claim to (no figures asserted)."""

import random
import statistics

import pytest

from memory3.bench.closed_loop import median_interval
from memory3.bench.report import render_table, write_json
from memory3.bench.storage import run_storage_bench
from memory3.model.codecs import RawCodec, VQCodec
from memory3.model.memory_format import paper_bytes_per_memory


def test_storage_bench_reports_sizes_and_errors(tmp_path):
    result = run_storage_bench(preset="tiny", n_references=64, rq_bits=4, pq_bits=4, niter=2)
    sizes = result["paper_config_bytes_per_memory"]
    assert set(sizes) == {"fp16", "bf16", "int8", "vq"}
    assert sizes["bf16"] == paper_bytes_per_memory(RawCodec("bf16"))
    assert sizes["vq"] == paper_bytes_per_memory(VQCodec(80, opq_m=20, rq_bits=4, pq_bits=4))
    assert result["best_codec"] == min(sizes, key=sizes.get)
    errors = result["reconstruction"]
    assert errors["fp16"]["rel_mse"] < errors["int8"]["rel_mse"] < errors["vq"]["rel_mse"] < 1.0
    assert result["setup"]["train_references"] == 51
    write_json(result, tmp_path / "storage.json")
    table = render_table(tmp_path)
    assert "best codec" in table and f"{sizes['vq']:,} B/memory" in table


def test_decode_bench_times_every_variant_in_every_round():
    from memory3.bench.decode import run_decode_bench

    result = run_decode_bench(preset="tiny", batch=2, prompt_tokens=70, new_tokens=66, repeats=3, threads=1)
    seconds = result["seconds"]
    assert set(seconds) == {"no_memory", "memory", "rag"}
    assert all(len(ts) == 3 and min(ts) > 0 for ts in seconds.values())
    # 2 prompt chunks + 1 swap at generated token 64.
    assert result["protocol"]["retrievals_per_sequence"] == 3
    for key, numerator, denominator in (("memory_over_no_memory", "no_memory", "memory"),
                                        ("memory_over_rag", "rag", "memory")):
        ratios = [n / m for n, m in zip(seconds[numerator], seconds[denominator], strict=True)]
        # "seconds" are rounded to 0.1 ms in the JSON, hence the tolerance.
        assert result["per_round_ratios"][key] == pytest.approx(ratios, rel=0.02)
        assert result[key] == pytest.approx(sorted(ratios)[1], rel=0.02)
        assert result[key] == sorted(result["per_round_ratios"][key])[1]


def test_quality_rows_render_with_and_without_a_zero_denominator(tmp_path):
    result = {"release": "r", "n_questions": 200, "acc_no_memory": 0.0, "acc_memory": 0.2, "acc_rag": 0.1,
              "memory_over_rag": 2.0, "memory_over_no_memory": None,
              "first_hit_only": {"acc_memory": 0.5, "acc_rag": 0.25},
              "tokens_per_head_ablation": {"acc_memory": {"4": 0.1, "8": 0.2, "all": 0.3}},
              "perplexity": {"no_memory": 12.5, "memory": 11.0}}
    write_json(result, tmp_path / "quality.json")
    table = render_table(tmp_path)
    assert "0.000 / 0.200 / 0.100" in table and "| 2.00 | >= 0.9 |" in table
    assert "n/a (zero denominator)" in table and "4, 8, all | 0.10 / 0.20 / 0.30" in table


def test_attention_on_the_right_memory_is_chance_for_equal_memories_and_one_when_alone(tiny_model, prefix):
    import dataclasses

    import torch

    from memory3.bench.quality import attention_on_the_right_memory
    from memory3.model.encoder import encode_references

    refs = [torch.randint(3, 250, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(5)]
    with torch.no_grad():
        memories = encode_references(tiny_model, refs, prefix)
    body = [1, *range(3, 30)]
    same = [memories[0]] * 5
    layers = len(tiny_model.config.memory_layers)
    assert attention_on_the_right_memory(tiny_model, prefix, [body], [same], [3]) == pytest.approx([0.2] * layers)
    # Only memory 2 has valid slots: all memory attention falls on it, none on the others.
    hidden = [dataclasses.replace(m, positions=torch.full_like(m.positions, -1)) for m in memories]
    alone = [*hidden[:2], memories[2], *hidden[3:]]
    assert attention_on_the_right_memory(tiny_model, prefix, [body, body], [alone, alone], [2, 4]) == \
        pytest.approx([0.5] * layers)  # the mean of 1 (right is 2) and 0 (right is 4)



def test_median_interval_holds_the_median_and_narrows_with_more_rounds():
    rng = random.Random(1)
    few = [rng.gauss(0.95, 0.08) for _ in range(9)]
    many = few + [rng.gauss(0.95, 0.08) for _ in range(72)]
    widths = []
    for xs in (few, many):
        low, high = median_interval(xs)
        assert low <= statistics.median(xs) <= high
        assert median_interval(xs) == [low, high]  # seeded: the same rounds give the same interval
        widths.append(high - low)
    assert widths[1] < widths[0]
    assert median_interval([0.9] * 5) == [0.9, 0.9]


def test_index_bench_scores_every_kind_on_the_same_questions(tmp_path):
    from memory3.bench.index import run_index_bench

    result = run_index_bench(references=600, questions=30, nprobes=(4, 8), nlist=8, shards=3, log=lambda _msg: None)
    kinds = result["kinds"]
    # Merged, exact shards find what the exact whole index finds.
    assert result["sharded"]["flat"]["hit_at_5"] == kinds["flat"]["hit_at_5"]
    assert set(result["sharded"]) == {"flat", "hnsw", "ivfpq"} and result["summary"]["shards"] == 3
    assert set(kinds) == {"flat", "hnsw", "ivfpq_nprobe4", "ivfpq_nprobe8"}
    assert kinds["flat"]["overlap_at_5"] == 1.0  # the exact index is the reference
    assert all(0.0 <= k["hit_at_1"] <= k["hit_at_5"] <= 1.0 for k in kinds.values())
    assert kinds["ivfpq_nprobe8"]["bytes_per_vector"] < kinds["flat"]["bytes_per_vector"]
    assert result["summary"]["ivfpq_nprobe"] == 8
    assert result["summary"]["ivfpq_hit_at_5_over_flat"] == kinds["ivfpq_nprobe8"]["hit_at_5"] / kinds["flat"][
        "hit_at_5"]
    write_json(result, tmp_path / "index.json")
    table = render_table(tmp_path)
    assert "IVF-PQ (8 lists, nprobe 8) / flat" in table
    assert "in 3 index shards, merged answers' found / whole index's: flat / HNSW / IVF-PQ | 1.000 / " in table


def test_prefill_bench_reports_every_arm_against_one_pass_and_renders(tmp_path):
    from memory3.bench.prefill import run_prefill_bench

    result = run_prefill_bench(preset="tiny", rows=2, long_tokens=640, arms=[128], rounds=2)
    arms = result["arms"]
    assert set(arms) == {"0", "128"}  # the one-pass baseline is always run
    assert arms["0"]["stall_over_one_pass"] == 1.0
    for arm in arms.values():
        assert arm["stall_ms"] > 0 and arm["ttft_ms"] > 0
        low, high = arm["stall_over_one_pass_ci90"]
        assert low <= arm["stall_over_one_pass"] <= high
    write_json(result, tmp_path / "prefill.json")
    table = render_table(tmp_path)
    assert "a 640-token prompt joins 1 decoding stream)" in table
    assert f"| {arms['128']['stall_over_one_pass']:.2f} |" in table


def test_sampling_bench_reports_every_option_against_plain_greedy_and_renders(tmp_path):
    from memory3.bench.sampling import run_sampling_bench

    result = run_sampling_bench(preset="tiny", rows=2, new_tokens=20, rounds=2, prompt_tokens=200)
    arms = result["arms"]
    assert set(arms) == {"plain", "penalties", "logprobs_5", "logprobs_20", "all"}
    assert arms["plain"]["step_over_plain"] == 1.0 and result["biased_ids"] == 256
    for arm in arms.values():
        low, high = arm["step_over_plain_ci90"]
        assert arm["step_ms"] > 0 and low <= arm["step_over_plain"] <= high
    write_json(result, tmp_path / "sampling.json")
    table = render_table(tmp_path)
    assert "| sampling options (`tiny`, 2 streams) |" in table
    assert f"| {arms['penalties']['step_over_plain']:.3f} / " in table
    low, high = result["scored_over_plain_read_ci90"]
    assert result["prompt_read_ms"] > 0 and low <= result["scored_over_plain_read"] <= high
    assert f"a 200-token prompt read alone: scored (every position's logprob) / read to its first token | " \
           f"{result['scored_over_plain_read']:.3f}" in table


def test_the_serving_benchs_step_costs_time_the_schedulers_own_passes(tiny_model, text_codec, prefix):
    import torch

    from memory3.bench.serving_engine import step_costs
    from memory3.model.encoder import encode_references

    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        bank = encode_references(tiny_model, [torch.randint(3, 250, (tiny_model.config.ref_len,), generator=gen)
                                              .tolist() for _ in range(6)], prefix)
    prompts = [[text_codec.bos_id, *torch.randint(3, 250, (69,), generator=gen).tolist()] for _ in range(4)]
    costs = step_costs(tiny_model, text_codec, bank, prompts, rows=2, max_seq_len=200, context_tokens=103,
                       new_tokens=66, iterations=4)
    assert min(costs["prefill_ms"].values()) > 0 and min(costs["decode_ms"].values()) > 0
    assert costs["predicted_on_over_off"] > 0


def test_tables_bench_compares_readers_that_agree(tmp_path, monkeypatch):
    """Every reader of the synthetic release gives the same answers (the bench checks it), and each
    figure is reported with its ratio from the same run."""
    from memory3.bench import tables
    from memory3.services.release import listed

    monkeypatch.setattr(tables, "LOOKUPS", 50)
    result = tables.run_tables_bench(references=3000)
    summary, gc = result["summary"], result["release_gc"]
    assert set(result["memory_service"]) == {"table_rows", "memory_ids"} and summary["references"] == 3000
    assert summary["gc_key_set_over_listed_bytes"] == (gc["key_set_from_table"]["bytes_held_per_reference"]
                                                       / gc["listed_from_memory_ids"]["bytes_held_per_reference"])
    assert result["memory_service"]["memory_ids"]["mapped_file_bytes_per_reference"] > 64  # 32-byte id + sha256
    write_json(result, tmp_path / "tables.json")
    assert "| release tables (3,000 references) | memory service, held per reference: " in render_table(tmp_path)
    # a reader that answers wrong is caught, not measured
    monkeypatch.setattr(listed.Listed, "unlisted", lambda self, keys: [])
    with pytest.raises(AssertionError, match="other unlisted keys"):
        tables.run_tables_bench(references=500)
