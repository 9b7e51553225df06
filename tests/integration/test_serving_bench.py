"""`memory3 bench serving` end to end at toy size: every figure it claims is measured."""

import os

import pytest
import torch

from memory3.bench.serving import run_serving_bench

pytestmark = pytest.mark.integration


def test_serving_bench_measures_every_arm(tmp_path):
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    result = run_serving_bench(preset="tiny", concurrency=(1, 2), prompt_tokens=70, new_tokens=66, rounds=2,
                               samples=3, documents=40, round_s=1.5, ramp_s=0.5, log=lambda *_: None)
    assert result["fetch5"]["redis_hit"]["n"] == 3 and result["retrieval"]["n"] == 3
    assert set(result["latency_by_concurrency"]) == {"1", "2"}
    assert result["latency_by_concurrency"]["2"]["ttft"]["n"] == 2
    arms = result["on_off"]
    assert all(len(arms[key]) == 2 and min(arms[key]) > 0
               for key in ("on_tok_s", "off_tok_s", "off_loaded_tok_s", "retrievals_per_s",
                           "control_retrievals_answered_per_s"))
    # The warm-up round of each arm ran, and is not among the measured rounds.
    assert min(arms["warm_up"]["on_tok_s"], arms["warm_up"]["off_tok_s"]) > 0
    # Every arm is summarised from the rounds it ran.
    on, off, loaded = arms["on_tok_s"], arms["off_tok_s"], arms["off_loaded_tok_s"]
    assert arms["per_round_ratios"] == pytest.approx([a / b for a, b in zip(on, off, strict=True)], rel=1e-3)
    assert arms["per_round_ratios_loaded"] == pytest.approx([a / b for a, b in zip(on, loaded, strict=True)],
                                                            rel=1e-3)
    # The decoder's own counters cover the on and off rounds: tokens it generated, CPU it spent.
    for arm in ("on", "off"):
        assert len(arms["decoder_tok_s"][arm]) == 2 and min(arms["decoder_tok_s"][arm]) > 0
        assert len(arms["decoder_cpu_ms_per_token"][arm]) == 2 and min(arms["decoder_cpu_ms_per_token"][arm]) > 0
        # The scheduler thread's share is part of the process's CPU, and not all of it (gRPC runs beside it).
        scheduler = arms["decoder_scheduler_cpu_ms_per_token"][arm]
        assert all(0 < s < total for s, total in zip(scheduler, arms["decoder_cpu_ms_per_token"][arm], strict=True))
    cpu = arms["decoder_cpu_ms_per_token"]
    extra_total = [a - b for a, b in zip(cpu["on"], cpu["off"], strict=True)]
    split = result["decoder_extra_cpu_us_per_token"]  # medians of two rounds (their means), by thread, rounded
    assert split["scheduler"] + split["other_threads"] == pytest.approx(1000 * sum(extra_total) / 2, abs=0.5)
    decoder = arms["decoder_tok_s"]
    assert result["decoder_on_over_off"] == pytest.approx(
        sum(a / b for a, b in zip(decoder["on"], decoder["off"], strict=True)) / 2, rel=1e-3)
    ratios = sorted(arms["per_round_ratios"])
    assert result["retrieval_on_over_off"] == pytest.approx(sum(ratios) / 2, rel=1e-3)  # median of two
    low, high = result["retrieval_on_over_off_ci90"]  # bootstrap medians of two rounds lie between them
    assert ratios[0] - 1e-3 <= low <= result["retrieval_on_over_off"] <= high <= ratios[1] + 1e-3
    alone = result["engine_alone"]
    assert len(alone["on_tok_s"]) == len(alone["off_tok_s"]) == 2 and min(alone["on_tok_s"] + alone["off_tok_s"]) > 0
    # It replays the latencies measured through the services in the same run.
    assert alone["simulated_latency_ms"] == {"retrieve": result["retrieval"]["p50_ms"],
                                             "fetch": result["fetch5"]["redis_hit"]["p50_ms"]}
    assert result["summary"]["engine_on_over_off"] == alone["engine_on_over_off"]
    # The engine's passes, memory against plain, each timed in both layouts.
    costs = alone["step_costs"]
    for name in ("decode", "prefill"):
        assert min(costs[f"{name}_ms"].values()) > 0 and costs[f"{name}_memory_over_plain"] > 0
    per_request = {key: 66 * costs["decode_ms"][key] / 2 + costs["prefill_ms"][key] for key in ("memory", "plain")}
    assert costs["predicted_on_over_off"] == pytest.approx(per_request["plain"] / per_request["memory"], rel=1e-3)
    assert result["summary"]["engine_predicted_on_over_off"] == costs["predicted_on_over_off"]
    # The bench pins itself while it measures, and gives the test process its cores back.
    assert os.sched_getaffinity(0) == cores and torch.get_num_threads() == threads
