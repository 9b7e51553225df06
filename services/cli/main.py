"""The `memory3` command. Arguments are parsed once here and passed down as plain values."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_HOME = Path.home() / ".cache" / "memory3"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memory3", description="Memory3: a language model with explicit memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="write a randomly initialised checkpoint (for demos and tests)")
    init.add_argument("--preset", default="small", help="model preset (tiny, small, paper-2.4b)")
    init.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    init.add_argument("--seed", type=int, default=0)

    gen = sub.add_parser("generate", help="generate text in-process from a checkpoint")
    gen.add_argument("prompt")
    gen.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (memory3 init, or a release)")
    gen.add_argument("--reference", action="append", default=[], metavar="TEXT",
                     help="a reference text to use as explicit memory (repeatable)")
    gen.add_argument("--reference-file", action="append", default=[], type=Path, metavar="FILE",
                     help="a UTF-8 file whose text becomes references (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")

    demo = sub.add_parser("demo", help="the README's first command: a small model answering with explicit memory")
    demo.add_argument("--home", type=Path, default=DEFAULT_HOME, help="where the demo checkpoint is cached")

    bench = sub.add_parser("bench", help="benchmarks (write JSON; optionally refresh the README table)")
    bench_sub = bench.add_subparsers(dest="bench_kind", required=True)
    dec = bench_sub.add_parser("decode", help="decode speed: no memory vs explicit memory vs RAG")
    dec.add_argument("--preset", default="small")
    dec.add_argument("--batch", type=int, default=8)
    dec.add_argument("--prompt-tokens", type=int, default=128)
    dec.add_argument("--new-tokens", type=int, default=128)
    dec.add_argument("--repeats", type=int, default=5, help="timed runs per variant, interleaved; median kept")
    dec.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    dec.add_argument("--json", type=Path, required=True)
    dec.add_argument("--readme", type=Path, default=None, help="README whose benchmark table to refresh")
    sto = bench_sub.add_parser("storage", help="bytes per memory and reconstruction error for each codec")
    sto.add_argument("--preset", default="small", help="model whose encoded K/V measure reconstruction error")
    sto.add_argument("--checkpoint", type=Path, default=None, help="use these weights instead of a random init")
    sto.add_argument("--references", type=int, default=2048, help="references encoded to train and test the codecs")
    sto.add_argument("--vq-rq-bits", type=int, default=14, help="bits per residual level (paper: 14)")
    sto.add_argument("--vq-pq-bits", type=int, default=10, help="bits per product-quantizer sub-space (paper: 10)")
    sto.add_argument("--vq-niter", type=int, default=10, help="k-means iterations when training the VQ codec")
    sto.add_argument("--json", type=Path, required=True)
    sto.add_argument("--readme", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            from .commands import cmd_init
            return cmd_init(args.preset, args.out, args.seed)
        if args.command == "generate":
            from .commands import cmd_generate
            references = list(args.reference)
            for file in args.reference_file:
                references.append(_read_text(file))
            return cmd_generate(args.checkpoint, args.prompt, references=references,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device)
        if args.command == "demo":
            from .commands import cmd_demo
            return cmd_demo(args.home)
        if args.command == "bench":
            return _bench(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"memory3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


def _bench(args: argparse.Namespace) -> int:
    if args.bench_kind == "decode":
        from memory3.bench.decode import run_decode_bench
        result = run_decode_bench(preset=args.preset, batch=args.batch, prompt_tokens=args.prompt_tokens,
                                  new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
    else:
        from memory3.bench.storage import run_storage_bench
        result = run_storage_bench(preset=args.preset, checkpoint=args.checkpoint, n_references=args.references,
                                   rq_bits=args.vq_rq_bits, pq_bits=args.vq_pq_bits, niter=args.vq_niter)
    from memory3.bench.report import update_readme, write_json
    write_json(result, args.json)
    print(json.dumps(result["summary"], indent=2))
    if args.readme is not None:
        update_readme(args.readme, args.json.parent)
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


if __name__ == "__main__":
    sys.exit(main())
