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
    parser.add_argument("--hf-compile", action="store_true", help="let HF compile its static-cache forward")
    if json_required:
        parser.add_argument("--json", type=Path, required=True)
    else:
        parser.add_argument("--json", type=Path, default=None,
                            help="output file, or a directory for gpu-<card>-<date>.json (default: bench/results/)")
