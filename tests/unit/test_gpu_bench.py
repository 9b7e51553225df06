"""bench/gpu.py runs its whole logic on the CPU at toy sizes (`--smoke`), and reports what it claims."""

import json

import pytest

from memory3.bench.gpu import TARGETS, main, render
from memory3.services.cli.main import build_parser


def test_cli_parses_bench_gpu():
    args = build_parser().parse_args(["bench", "gpu", "--json", "out.json", "--preset", "tiny", "--device", "cpu",
                                      "--smoke", "--dtype", "bfloat16"])
    assert (args.bench_kind, args.preset, args.device, args.smoke, args.rounds, args.dtype) == (
        "gpu", "tiny", "cpu", True, 9, "bfloat16")


@pytest.mark.parametrize(("dtype", "max_rel_err"), [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_smoke_run_on_cpu(tmp_path, dtype, max_rel_err):
    """bfloat16 takes the GPU run's dtype paths: bf16 weights, caches, pinned memories and masks."""
    assert main(["--preset", "tiny", "--device", "cpu", "--smoke", "--dtype", dtype, "--json", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-cpu-*.json")
    result = json.loads(path.read_text())
    for key in (*TARGETS, "b1_tok_s", "b2_memory_tok_s", "hbm_copy_gb_s", "b1_roofline_tok_s", "correct"):
        assert key.replace("b32", "b2") in result
    assert result["protocol"]["dtype"] == dtype
    assert result["correct"] and result["correctness"]["memory_vs_fp32"]["rel_err"] < max_rel_err
    assert set(result["batches"]["2"]["variants"]) == {"hf_eager", "hf_static", "no_memory", "memory", "rag"}
    assert result["protocol"]["retrievals_per_sequence"] == 3
    assert "| 2 | memory |" in render(result)
