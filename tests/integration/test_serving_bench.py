"""`memory3 bench serving` end to end at toy size: every figure it claims is measured."""

import pytest

from memory3.bench.serving import run_serving_bench

pytestmark = pytest.mark.integration


def test_serving_bench_measures_every_arm(tmp_path):
    result = run_serving_bench(preset="tiny", concurrency=(1, 2), prompt_tokens=70, new_tokens=66, rounds=2,
                               samples=3, documents=40, round_s=1.5, log=lambda *_: None)
    assert result["fetch5"]["redis_hit"]["n"] == 3 and result["retrieval"]["n"] == 3
    assert set(result["latency_by_concurrency"]) == {"1", "2"}
    assert result["latency_by_concurrency"]["2"]["ttft"]["n"] == 2
    arms = result["on_off"]
    assert all(len(arms[key]) == 2 and min(arms[key]) > 0
               for key in ("on_tok_s", "off_tok_s", "off_loaded_tok_s", "retrievals_per_s",
                           "control_retrievals_answered_per_s"))
    # Every arm is summarised from the rounds it ran.
    on, off, loaded = arms["on_tok_s"], arms["off_tok_s"], arms["off_loaded_tok_s"]
    assert arms["per_round_ratios"] == pytest.approx([a / b for a, b in zip(on, off, strict=True)], rel=1e-3)
    assert arms["per_round_ratios_loaded"] == pytest.approx([a / b for a, b in zip(on, loaded, strict=True)],
                                                            rel=1e-3)
    ratios = sorted(arms["per_round_ratios"])
    assert result["retrieval_on_over_off"] == pytest.approx(sum(ratios) / 2, rel=1e-3)  # median of two
