"""The options of `bench gpu`, shared by `memory3 bench gpu` and `python -m memory3.bench.gpu`.

Apart from `gpu.py` so that the CLI builds its parser without importing torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_gpu_bench_arguments(parser: argparse.ArgumentParser, *, json_required: bool) -> None:
    parser.add_argument("--preset", default="paper-2.4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes, a few rounds: checks the logic (on a CPU: --preset tiny --device cpu)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per batch size; the first is dropped")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="weights and caches (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile each block of our decode step with torch.compile (default: on CUDA)")
    parser.add_argument("--tune-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="Inductor's coordinate-descent tuning of the compiled kernels, which also turns "
                             "batch-1 matrix-vector products into fused Triton reductions (default: on)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall seconds for the whole run: each batch size's timed rounds stop early (after "
                             "at least 3, the first dropped) at their share of what is left (default: no limit)")
    parser.add_argument("--hf-compile", action="store_true", help="let HF compile its static-cache forward")
    if json_required:
        parser.add_argument("--json", type=Path, required=True)
    else:
        parser.add_argument("--json", type=Path, default=None,
                            help="output file, or a directory for gpu-<card>-<date>.json (default: bench/results/)")


def gpu_bench_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `run_gpu_bench` that the options above give."""
    if args.rounds < 2:
        raise ValueError(f"--rounds must be >= 2 (the first is dropped), got {args.rounds}")
    if args.budget_s is not None and args.budget_s <= 0:
        raise ValueError(f"--budget-s must be > 0, got {args.budget_s}")
    return {"preset": args.preset, "device": args.device, "smoke": args.smoke, "rounds": args.rounds,
            "hf_compile": args.hf_compile, "dtype": args.dtype, "compile": args.compile,
            "tune_kernels": args.tune_kernels, "budget_s": args.budget_s}
