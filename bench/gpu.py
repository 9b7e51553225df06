"""GPU decode benchmark: our static CUDA-graph decoder against HF transformers, in one call.

For `paper-2.4b` with random bf16 weights, created on the GPU (speed does not depend on the weights):
  hf_eager   `LlamaForCausalLM.generate`, dynamic cache (HF's default SDPA attention);
  hf_static  the same with `cache_implementation="static"` (not compiled unless --hf-compile:
             compiling a 44-layer model twice would not fit the device time);
  no_memory  our engine (`model.static_decode`) without memory slots, its prefill too replayed from
             a CUDA graph per prompt shape; `no_memory_uncompiled` beside it is the same CUDA graph
             of uncompiled blocks (ours are compiled with `torch.compile`, by default on CUDA;
             `--no-compile` for none);
  memory     with memory: 3 retrievals per sequence (2 prompt chunks, 1 while decoding), 5 memories
             each, never reused (the paper's worst case), handed over from pinned host memory as
             if just fetched; its prefill, with those memories, is eager;
  rag        no memory; 5 references (5 x 128 tokens) prefilled in front of each prompt.
at batch 1 and 32, 128 tokens in and 128 out (paper Table 21's protocol). Throughput is
batch * 128 / wall time, prefill included. Every round runs each variant once, in an order that
rotates; the first round warms up and is dropped; tok/s are medians (means beside them), and a
ratio is the median of the per-round ratios, which compare runs that saw the same machine state.

The serving engine too (`gpu_engine.py`): continuous batching with memory at each batch size, its
decode passes replayed from CUDA graphs against eager ones (`b<N>_engine_tok_s`,
`b<N>_engine_graphs_over_eager`; `engine` in the JSON).

Measured in the same run: the HBM copy bandwidth (a 2 GiB device-to-device copy, bytes read plus
written), the batch-1 roofline (bytes one decode step must read at batch 1: every weight but the
embedding table, plus the KV cache at the mean context, over that bandwidth), the decode step
alone (graph replays timed with events), and one step's kernels under torch.profiler (how many,
their summed time, the longest: `step_profile`). Correctness, also in the same run: greedy tokens and
teacher-forced logits of our engine against HF (no memory) and against an fp32 upcast of the same
weights (memory); a token that differs must be a near-tie of the reference (gap within twice
the measured logit error).

The device machine is bare and offline: no registry, so nothing can be pip-installed there, and
its image's python3 already holds CUDA torch and transformers (the project's CPU pins do not
apply there). The project is put on the path instead of installed; what the serving engine (its
arms here, and its `gpu`-marked test) imports beyond the image travels as wheels (`make gpu-wheels`
here writes them to .whl/, 6.4 MB; the call carries ".whl"). One call, from the repository root
(writes the JSON and a log to $OUT; copy the JSON to bench/results/ afterwards):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl;
    mkdir -p /tmp/m3/memory3 && for d in model bench services; do ln -sfn "$PWD/$d" /tmp/m3/memory3/$d;
    done && nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee $OUT/smi.txt;
    set -o pipefail; PYTHONPATH=/tmp/m3:/tmp/site PYTHONUNBUFFERED=1 python3 -m memory3.bench.gpu --budget-s 360
    --json "$OUT" 2>&1 | tee $OUT/log.txt; PYTHONPATH=/tmp/m3:/tmp/site timeout 120 python3 -m pytest -q
    -m gpu -p no:cacheprovider tests/unit/test_gpu.py tests/unit/test_static_decode.py 2>&1 | tail -15

(timeout_s=600; expected run time 5-8 minutes, of which compiling and tuning kernels 1-3, then the
`gpu`-marked tests, among them the serving engine's decode passes replayed from CUDA graphs against
eager ones). Checked on a CPU with the image's versions (torch 2.11.0, transformers 5.17.0):
`--smoke` runs, compiled and not, and the `gpu`-marked tests' modules import. `--budget-s 360` keeps
the bench inside 6 of those minutes, whatever compiling takes: each batch size's rounds stop early
at their share of the time left (at least 3, the first dropped; `rounds_run` in the JSON), so that
the checks and the tests after it still run. If compiling fails, the run says why, goes on
uncompiled and reports `compile.error`; a variant that fails is left out and named in its batch
size's `errors`, a correctness check that fails to run is reported as failed;
`gpu-<card>-<date>.partial.json` keeps each batch size's numbers (and the headline keys measured so
far) as they are measured.

Here: `memory3 bench gpu --json PATH`. On a CPU, `--preset tiny --device cpu --smoke` runs the
whole logic in well under a minute, and `--dtype bfloat16 --compile` beside it takes the GPU run's
paths (bf16 weights, caches and masks, compiled blocks; needs g++ and the Python headers).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch

from memory3.model.config import Memory3Config
from memory3.model.encoder import encode_references
from memory3.model.generate import generate
from memory3.model.hf_llama import llama_config_kwargs, to_llama_state_dict
from memory3.model.layout import chunk_groups, rope_positions
from memory3.model.memory import ExplicitMemory, stack_memories
from memory3.model.model import Transformer
from memory3.model.static_decode import COMPILE_OPTIONS, StaticDecoder, generate_static
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer

from .decode import UniqueMemoryBank
from .gpu_options import add_gpu_bench_arguments, gpu_bench_kwargs
from .machine import machine_info
from .report import write_json

# Logits of a 44-layer model in bf16 against a reference: METHOD.md puts bf16 operands at 1e-3..1e-2;
# errors compound over layers, so a little headroom.
REL_TOLERANCE = 3e-2

MIN_ROUNDS = 3  # a budget never cuts a batch size below the warm-up and two paired rounds
# Of the budget: the batch sizes' rounds until this fraction (0.9 when the serving engine cannot run here),
# then the serving engine's until 0.9, then the checks.
ENGINE_FROM = 0.75
TARGETS = {"b1_over_roofline": ">= 0.80", "b32_memory_over_hf_eager": ">= 5", "memory_over_no_memory": ">= 0.95"}


def run_gpu_bench(*, preset: str = "paper-2.4b", device: str = "cuda", smoke: bool = False,
                  batches: tuple[int, ...] = (1, 32), prompt_tokens: int = 128, new_tokens: int = 128,
                  rounds: int = 9, hf_compile: bool = False, seed: int = 0, dtype: str | None = None,
                  compile: bool | None = None, tune_kernels: bool = True, budget_s: float | None = None,
                  log: Callable[[str], None] = print, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Runs every variant and check; `checkpoint` gets what is measured so far after each batch
    size, so that a run cut short by the device's time limit still leaves its numbers.

    budget_s: wall seconds for the whole run, so that one device call of fixed length brings back
    every batch size and the checks. Each batch size's rounds stop early (after at least
    `MIN_ROUNDS`) when the next would end past its share: what is left of the budget until
    `ENGINE_FROM` of it (the serving engine's arms have until 0.9, the checks the last tenth), split
    evenly over the batch sizes still to run (a fast one leaves its unused share to the next)."""
    overrides = {}
    if smoke:  # the whole logic at toy sizes, with short chunks: 2 prompt chunks and a decode-time swap
        batches, prompt_tokens, new_tokens, rounds = (1, 2), 32, 24, 2
        overrides = {"chunk_len": 16, "ref_len": 32}
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"bench gpu: no CUDA device here for --device {device} (torch {torch.__version__}); "
                         "on a CPU, --preset tiny --device cpu --smoke runs the whole logic at toy sizes")
    builder = _DecoderBuilder(cuda if compile is None else compile, log,
                              {**COMPILE_OPTIONS, "coordinate_descent_tuning": tune_kernels})
    dtype = getattr(torch, dtype) if dtype else torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    clock = _Clock(log, started)
    config = Memory3Config.from_name(preset, **overrides)
    if new_tokens <= config.chunk_len + 1:
        raise ValueError(f"new_tokens must exceed {config.chunk_len + 1} to include a decode-time memory swap")

    model = device_model(config, dev, dtype, seed)
    hf = hf_model(model, config)
    clock("models")
    bandwidth = copy_bandwidth(dev, 2 << 30 if cuda else 64 << 20)
    clock(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    roofline = roofline_bytes(model, config, context=prompt_tokens + new_tokens // 2)
    roofline_tok_s = bandwidth / roofline["bytes_per_step"]

    codec = TextCodec(byte_level_tokenizer())
    prefix = codec.reference_prefix(config)
    p = len(prefix)
    gen = torch.Generator().manual_seed(seed)

    def random_tokens(n: int) -> list[int]:
        return torch.randint(3, config.vocab_size, (n,), generator=gen).tolist()

    retrievals = math.ceil(prompt_tokens / config.chunk_len) + (new_tokens - 1) // config.chunk_len
    n_refs = max(batches) * retrievals * config.mems_per_chunk
    references = [random_tokens(config.ref_len) for _ in range(n_refs)]
    bank = encode_bank(model, references, prefix, dtype, pin=cuda)
    clock(f"{len(bank)} memories encoded")

    results: dict[int, dict] = {}

    def so_far(**extra) -> dict:
        """What is measured so far, as `checkpoint` gets it."""
        return {"benchmark": "gpu", "partial": True,
                **summarize_run(results, batches, roofline_tok_s, bandwidth, None, builder.compile),
                "batches": {str(b): r for b, r in results.items()}, **extra,
                "hbm_copy_gb_s": round(bandwidth / 1e9, 1), "compile": builder.report(),
                "seconds_so_far": round(time.perf_counter() - started, 1)}

    engine_arms, engine_error = _engine_arms()
    rounds_until = ENGINE_FROM if engine_arms is not None else 0.9
    rag_context = [t for ref in references[: config.mems_per_chunk] for t in ref]  # 5 references' tokens
    for i, bsz in enumerate(batches):
        built_from = time.perf_counter()
        prompts = [[codec.bos_id, *random_tokens(prompt_tokens - 1)] for _ in range(bsz)]
        rag_prompts = [[codec.bos_id, *rag_context, *x[1:]] for x in prompts]
        def build(bsz=bsz, rag_prompts=rag_prompts) -> dict[str, StaticDecoder]:
            return {
                "no_memory": builder(model, bsz, prompt_tokens + new_tokens, memory=False),
                "memory": builder(model, bsz, p + prompt_tokens + new_tokens, memory=True, prefix_len=p),
                "rag": builder(model, bsz, len(rag_prompts[0]) + new_tokens, memory=False),
            }

        decoders = build()
        if not builder.compile and any(d.compiled for d in decoders.values()):
            decoders = build()  # compiling failed part way: all of this batch size uncompiled, comparable
        if builder.compile:  # what the compiled blocks buy, in the same rounds
            decoders["no_memory_uncompiled"] = StaticDecoder(model, bsz, prompt_tokens + new_tokens, memory=False)
        clock(f"batch {bsz}: decoders set up (graphs: {decoders['memory'].graph is not None}, "
              f"compiled: {builder.compile})")
        variants: dict[str, Callable[[], list[list[int]]]] = {
            "hf_eager": lambda prompts=prompts: hf_generate(hf, prompts, new_tokens, static=False,
                                                            compile=hf_compile),
            "hf_static": lambda prompts=prompts: hf_generate(hf, prompts, new_tokens, static=True,
                                                             compile=hf_compile),
            "no_memory": lambda d=decoders["no_memory"], prompts=prompts: generate_static(
                d, prompts, max_new_tokens=new_tokens).tokens,
            "memory": lambda d=decoders["memory"], prompts=prompts: generate_static(
                d, prompts, prefix=prefix, max_new_tokens=new_tokens,
                memory_provider=UniqueMemoryBank(bank, config.mems_per_chunk)).tokens,
            "rag": lambda d=decoders["rag"], rag_prompts=rag_prompts: generate_static(
                d, rag_prompts, max_new_tokens=new_tokens).tokens,
        }
        if "no_memory_uncompiled" in decoders:
            variants["no_memory_uncompiled"] = lambda d=decoders["no_memory_uncompiled"], prompts=prompts: (
                generate_static(d, prompts, max_new_tokens=new_tokens).tokens)
        deadline = None
        if budget_s is not None:
            # The batch sizes after this one will take as long again to build (compile, tune, capture)
            # before their rounds: that time is kept for them, not spent on this one's rounds.
            later = len(batches) - i - 1
            left = started + rounds_until * budget_s - time.perf_counter() - later * (time.perf_counter() - built_from)
            deadline = time.perf_counter() + max(0.0, left) / (later + 1)
        errors: dict[str, str] = {}
        seconds = time_rounds(variants, rounds, bsz * new_tokens, dev, deadline=deadline, errors=errors)
        rounds_run = max(map(len, seconds.values()), default=0) + 1
        if rounds_run < rounds:
            log(f"batch {bsz}: {rounds_run} of {rounds} rounds, within the budget")
        if errors:
            log(f"batch {bsz}: variants that failed, left out: {errors}")
        mid = prompt_tokens + new_tokens // 2
        starts = {"no_memory": mid, "no_memory_uncompiled": mid, "memory": p + mid,
                  "rag": len(rag_prompts[0]) + new_tokens // 2}
        steps = step_times(decoders, starts, errors, smoke=smoke, log=log)
        profiles = {name: profile_step(decoders[name], starts[name]) for name in ("no_memory", "memory")
                    if name not in errors}
        for name, prof in profiles.items():
            log(f"batch {bsz} {name} step: {prof.get('calls')} calls, {prof.get('calls_ms')} ms in all "
                f"(replayed step: {steps.get(name, math.nan) * 1e3:.3f} ms); longest: {prof.get('top', [{}])[:1]}")
        prefill_errors = {name: d.static_prefill_error for name, d in decoders.items() if d.static_prefill_error}
        if prefill_errors:
            log(f"batch {bsz}: prefill graphs failed, eager instead: {prefill_errors}")
        results[bsz] = {**summarize(seconds, steps, bsz, new_tokens),
                        "rounds_run": rounds_run, "compiled": {name: d.compiled for name, d in decoders.items()},
                        "static_prefill": {name: d.static_prefill for name, d in decoders.items()},
                        "static_prefill_errors": prefill_errors, "step_profile": profiles, "errors": errors}
        clock(f"batch {bsz}: " + ", ".join(f"{k} {v['tok_s']:.0f}" for k, v in results[bsz]["variants"].items()))
        if checkpoint is not None:
            checkpoint(so_far())
        del decoders, variants  # the variants hold the decoders too: their caches and graphs go now
        _empty_cache(dev)

    if engine_arms is None:
        engine = {"error": engine_error}
        log(f"the serving engine's arms cannot run here: {engine_error}")
    else:
        engine_gen = torch.Generator().manual_seed(seed + 1)  # the checks' inputs stay those of the seed
        spelled = min(config.vocab_size, codec.vocab_size)  # the engine takes ids its tokenizer can spell
        engine = engine_arms(model, codec, bank, {b: [[codec.bos_id, *torch.randint(
            3, spelled, (prompt_tokens - 1,), generator=engine_gen).tolist()] for _ in range(b)] for b in batches},
            new_tokens=new_tokens, rounds=rounds, min_rounds=MIN_ROUNDS,
            deadline=None if budget_s is None else started + 0.9 * budget_s, log=log,
            after_arm=lambda: _empty_cache(dev))
        clock("serving engine")
        if checkpoint is not None:
            checkpoint(so_far(engine=engine))

    try:
        correctness = check_correctness(model, hf, config, prefix, bank, codec.bos_id, random_tokens, builder,
                                        rows=max(batches), prompt_tokens=prompt_tokens,
                                        new_tokens=new_tokens, log=log,
                                        rag_context=rag_context)
    except Exception as exc:  # noqa: BLE001 - a check that fails to run is a failed check, not a lost run
        correctness = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"the correctness check failed to run: {correctness['error']}")
    clock(f"correctness: {'ok' if correctness['ok'] else 'FAILED'}")

    summary = summarize_run(results, batches, roofline_tok_s, bandwidth, correctness["ok"], builder.compile)
    for bsz in batches:
        arms = engine.get(str(bsz), {})
        summary[f"b{bsz}_engine_tok_s"] = arms.get("graphs", {}).get("tok_s")
        summary[f"b{bsz}_engine_graphs_over_eager"] = arms.get("graphs_over_eager")
    return {
        "benchmark": "gpu",
        "summary": summary,
        **summary,
        "targets": TARGETS,
        "batches": {str(b): r for b, r in results.items()},
        "roofline": {**roofline, "bandwidth_bytes_s": bandwidth, "tok_s": roofline_tok_s},
        "correctness": correctness,
        "engine": engine,
        "protocol": {
            "preset": preset, "dtype": str(dtype).removeprefix("torch."), "batches": list(batches),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds, "budget_s": budget_s,
            "retrievals_per_sequence": retrievals, "memories_per_retrieval": config.mems_per_chunk,
            "rag_prefill_tokens": len(references[0]) * config.mems_per_chunk, "hf_compile": hf_compile,
            "statistic": "first round dropped; tok/s median per variant; ratios median of per-round ratios",
            "engine_statistic": "first round dropped; tok/s median per arm; graphs_over_eager a ratio of the arms' "
                                "medians (the arms run one after the other)",
            "weights": "random init on the device (speed does not depend on the weights)",
            "smoke": smoke, "config_overrides": overrides,
        },
        "compile": builder.report(),
        "seconds_total": round(time.perf_counter() - started, 1),
        "machine": machine_info(),
    }


def _engine_arms() -> tuple[Callable[..., dict] | None, str | None]:
    """`gpu_engine.engine_throughput`, or why it cannot run here: the services' imports are missing
    where only the model and the bench were put on the path. The rest of the run does not need it."""
    try:
        from .gpu_engine import engine_throughput
    except Exception as exc:  # noqa: BLE001 - ImportError, or a dependency of another version that fails to load
        return None, f"{type(exc).__name__}: {exc}"[:2000]
    return engine_throughput, None


# ---- models ---------------------------------------------------------------------------------
def device_model(config: Memory3Config, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """Random weights made on the device, as `model.init` scales them (a CPU init of 2.8B is slow)."""
    with torch.device(device), _default_dtype(dtype):
        model = Transformer(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * config.n_layer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, out_std if name.endswith(("wo.weight", "w2.weight")) else 0.02,
                              generator=generator)
    return model.eval()


def hf_model(model: Transformer, config: Memory3Config):
    """`LlamaForCausalLM` sharing our weights (assigned views, no copy)."""
    import transformers

    device, dtype = model.output.weight.device, model.output.weight.dtype
    with torch.device(device), _default_dtype(dtype):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_kwargs(config)))
    hf.load_state_dict(to_llama_state_dict(model.state_dict(), config), strict=True, assign=True)
    return hf.eval()


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, *, static: bool, compile: bool) -> list[list[int]]:
    import transformers

    device = hf.lm_head.weight.device
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    kwargs = {"cache_implementation": "static"} if static else {}
    if hasattr(transformers.GenerationConfig(), "disable_compile"):  # older versions lack the flag
        kwargs["disable_compile"] = not compile
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:].tolist()


def encode_bank(model: Transformer, references: list[list[int]], prefix: list[int], dtype: torch.dtype,
                *, pin: bool) -> list[ExplicitMemory]:
    """Memories as a memory service hands them over: in host memory, pinned for async copies."""
    encoded = []
    with torch.inference_mode():
        for i in range(0, len(references), 64):
            encoded += encode_references(model, references[i : i + 64], prefix)
    shape = (len(encoded), *encoded[0].shape)
    keys = torch.empty(shape, dtype=dtype, pin_memory=pin)  # one pinned block each for K and V
    values = torch.empty(shape, dtype=dtype, pin_memory=pin)
    for i, m in enumerate(encoded):
        keys[i].copy_(m.keys)
        values[i].copy_(m.values)
    # Positions in host memory too, as a memory service hands them over: on the device, staging a
    # swap would read them back, waiting for the step in flight instead of overlapping it.
    return [ExplicitMemory(keys[i], values[i], m.positions.cpu()) for i, m in enumerate(encoded)]


class _DecoderBuilder:
    """Makes the StaticDecoders, compiled when asked; if compiling or capturing a compiled step
    fails, says why and builds the rest uncompiled, so that one run on a lent device still
    measures everything."""

    def __init__(self, compile: bool, log: Callable[[str], None], options: dict) -> None:
        self.compile, self.log, self.options = compile, log, options
        self.error: str | None = None
        self.seconds = 0.0  # spent building compiled decoders (compiling, warming up, capturing)

    def __call__(self, model: Transformer, *args, **kwargs) -> StaticDecoder:
        if self.compile:
            started = time.perf_counter()
            try:
                return StaticDecoder(model, *args, compile=True, compile_options=self.options, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure; reported in the JSON
                self.compile, self.error = False, f"{type(exc).__name__}: {exc}"[:2000]
                self.log(f"compiling the decode step failed, going on uncompiled: {self.error}")
            finally:
                self.seconds += time.perf_counter() - started
        return StaticDecoder(model, *args, **kwargs)

    def report(self) -> dict:
        from torch._dynamo.utils import counters

        return {"compiled": self.compile, "options": self.options, "error": self.error,
                "build_seconds": round(self.seconds, 1),
                "graphs": counters["stats"]["unique_graphs"]}


# ---- timing ---------------------------------------------------------------------------------
def time_rounds(variants: dict[str, Callable[[], list[list[int]]]], rounds: int, expected: int,
                device: torch.device, *, deadline: float | None = None,
                clock: Callable[[], float] = time.perf_counter,
                errors: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Wall seconds per variant and round; round 0 (warm-up) is dropped. With a deadline (a `clock`
    time), no round starts after `MIN_ROUNDS` that would end past it, as long as the last one took.

    A variant that raises (or produces the wrong number of tokens) is left out from then on, with
    its seconds, and `errors` gets why: one failing variant must not cost the others' numbers."""
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    errors = {} if errors is None else errors
    last_round = 0.0
    for r in range(rounds):
        round_started = clock()
        if r >= MIN_ROUNDS and deadline is not None and round_started + last_round > deadline:
            break
        live = [name for name in names if name not in errors]
        if not live:
            break
        shift = r % len(live)
        for name in live[shift:] + live[:shift]:
            gc.collect()  # not inside the next run: HF's generate leaves garbage another variant would pay for
            try:
                elapsed = _timed(variants[name], expected, device, clock)
            except Exception as exc:  # noqa: BLE001 - reported in the JSON
                errors[name], seconds[name] = f"{type(exc).__name__}: {exc}"[:2000], []
                continue
            if r > 0:
                seconds[name].append(elapsed)
        last_round = clock() - round_started
    return seconds


def _timed(variant: Callable[[], list[list[int]]], expected: int, device: torch.device,
           clock: Callable[[], float]) -> float:
    """Wall seconds of one run of a variant, which must produce `expected` tokens."""
    _sync(device)
    start = clock()
    tokens = variant()
    _sync(device)
    elapsed = clock() - start
    produced = sum(len(t) for t in tokens)
    if produced != expected:
        raise RuntimeError(f"produced {produced} tokens, expected {expected}")
    return elapsed


def step_times(decoders: dict[str, StaticDecoder], starts: dict[str, int], errors: dict[str, str], *, smoke: bool,
               log: Callable[[str], None]) -> dict[str, float]:
    """Each decoder's step alone (`step_seconds`) near its context's middle; one that fails is named in
    `errors` and left out, so that its batch size's numbers are still kept."""
    steps = {}
    for name, decoder in decoders.items():
        if name in errors:
            continue
        try:
            steps[name] = step_seconds(decoder, starts[name] - 8, steps=4 if smoke else 16, repeats=2 if smoke else 5)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            errors[f"{name} step"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"timing {name}'s step alone failed: {errors[f'{name} step']}")
    return steps


def step_seconds(decoder: StaticDecoder, start_slot: int, steps: int = 16, repeats: int = 5) -> float:
    """Median seconds of one decode step alone (graph replays), at context ~start_slot."""
    tokens = torch.ones(decoder.batch_size, dtype=torch.long, device=decoder.device)
    times = []
    for _ in range(repeats + 1):
        decoder.slots.fill_(start_slot)
        _sync(decoder.device)
        if decoder.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                decoder.step(tokens)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3 / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                decoder.step(tokens)
            times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times[1:])


def profile_step(decoder: StaticDecoder, start_slot: int, top: int = 15) -> dict:
    """What one decode step runs: its calls (kernels on a GPU, operators on the CPU), run once
    outside its graph under torch.profiler, with their summed time and the longest ones. On a GPU,
    the summed kernel time beside the replayed step's time says how much of a step is gaps between
    kernels, and the list says which kernels to fuse or tune next."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = decoder.device.type == "cuda"
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    try:
        decoder.slots.fill_(start_slot)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            decoder._forward()
            _sync(decoder.device)
        rows = []
        for event in prof.key_averages():
            names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
            self_us = next((getattr(event, n) for n in names if hasattr(event, n)), 0)  # older torch: cuda
            if event.device_type == kind and self_us > 0:
                rows.append({"name": event.key[:120], "count": event.count, "us": round(self_us, 1)})
    except Exception as exc:  # noqa: BLE001 - a profiler that fails costs the profile, not the run
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    rows.sort(key=lambda r: -r["us"])
    return {"calls": sum(r["count"] for r in rows), "calls_ms": round(sum(r["us"] for r in rows) / 1e3, 4),
            "device": decoder.device.type, "top": rows[:top]}


def summarize(seconds: dict[str, list[float]], steps: dict[str, float], bsz: int, new_tokens: int) -> dict:
    work = bsz * new_tokens
    variants = {
        name: {"tok_s": work / statistics.median(ts), "mean_tok_s": work / statistics.mean(ts),
               "seconds": [round(t, 4) for t in ts]}
        for name, ts in seconds.items() if ts
    }
    for name, step in steps.items():
        if name in variants:
            variants[name]["step_ms"] = round(step * 1e3, 4)
            variants[name]["decode_tok_s"] = bsz / step

    def paired(num: str, den: str) -> float | None:  # throughput num/den = time den/num, same round
        if num not in variants or den not in variants:
            return None  # a variant that failed
        return round(statistics.median(d / n for n, d in zip(seconds[num], seconds[den], strict=True)), 4)

    ratios = {
        "memory_over_no_memory": paired("memory", "no_memory"),
        **({"compiled_over_uncompiled": paired("no_memory", "no_memory_uncompiled")}
           if "no_memory_uncompiled" in seconds else {}),
        "memory_over_rag": paired("memory", "rag"),
        "memory_over_hf_eager": paired("memory", "hf_eager"),
        "no_memory_over_hf_eager": paired("no_memory", "hf_eager"),
        "no_memory_over_hf_static": paired("no_memory", "hf_static"),
    }
    return {"variants": variants, "ratios": ratios}


def summarize_run(results: dict[int, dict], batches: tuple[int, ...], roofline_tok_s: float, bandwidth: float,
                  correct: bool | None, compiled: bool) -> dict:
    """The headline numbers (issue #7's keys) of the batch sizes measured so far; None where a batch
    size or a variant is missing (a run cut short, a variant that failed)."""
    b1, big = results.get(min(batches), {}), results.get(max(batches), {})

    def tok_s(res: dict, name: str, key: str = "tok_s") -> float | None:
        value = res.get("variants", {}).get(name, {}).get(key)
        return None if value is None else round(value, 1)

    def over(value: float | None, ref: float) -> float | None:
        return None if value is None else round(value / ref, 4)

    b1_tok_s, b1_decode = tok_s(b1, "no_memory"), tok_s(b1, "no_memory", "decode_tok_s")
    n = max(batches)
    return {
        "b1_tok_s": b1_tok_s,
        "b1_roofline_tok_s": round(roofline_tok_s, 1),
        "b1_over_roofline": over(b1_tok_s, roofline_tok_s),
        "b1_decode_tok_s": b1_decode,
        "b1_decode_over_roofline": over(b1_decode, roofline_tok_s),
        f"b{n}_memory_tok_s": tok_s(big, "memory"),
        f"b{n}_hf_eager_tok_s": tok_s(big, "hf_eager"),
        f"b{n}_memory_over_hf_eager": big.get("ratios", {}).get("memory_over_hf_eager"),
        "memory_over_no_memory": big.get("ratios", {}).get("memory_over_no_memory"),
        "b1_memory_over_no_memory": b1.get("ratios", {}).get("memory_over_no_memory"),
        "memory_over_rag": big.get("ratios", {}).get("memory_over_rag"),
        "hbm_copy_gb_s": round(bandwidth / 1e9, 1),
        "correct": correct,
        "compiled": compiled,
    }


def copy_bandwidth(device: torch.device, n_bytes: int, repeats: int = 10) -> float:
    """Bytes read plus written per second by a large device-to-device copy (random data)."""
    src = torch.randn(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 3):
        _sync(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            elapsed = begin.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - t0
        if i >= 3:
            times.append(elapsed)
    if not torch.equal(dst, src):
        raise RuntimeError("the copy for the bandwidth measurement is wrong")
    return 2 * n_bytes / statistics.median(times)


def roofline_bytes(model: Transformer, config: Memory3Config, *, context: int) -> dict:
    """Bytes one batch-1 decode step must read: all weights but the embedding table, and the KV cache."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "tok_embeddings.weight")
    itemsize = model.output.weight.element_size()
    kv = config.n_layer * 2 * config.n_kv_head * config.head_dim * context * itemsize
    return {"weight_bytes": weights, "kv_bytes": kv, "context": context, "bytes_per_step": weights + kv}


# ---- correctness ----------------------------------------------------------------------------
class RecordingBank:
    """Retrieval over the bank that remembers, per call, what it returned (for the reference)."""

    def __init__(self, bank: list[ExplicitMemory], per_query: int) -> None:
        self.bank, self.per_query, self.calls = bank, per_query, []

    def __call__(self, queries):
        out = [[self.bank[(sum(q) + j) % len(self.bank)] for j in range(self.per_query)] for q in queries]
        self.calls.append(out)
        return out


def check_correctness(model, hf, config, prefix, bank, bos, random_tokens, builder, *, rows, prompt_tokens,
                      new_tokens, log, rag_context: list[int] = ()) -> dict:
    """Our greedy tokens and logits against HF (no memory, at batch 1 and `rows`; RAG's long prompts at
    batch 1) and an fp32 upcast (memory, at `rows`). Batch 1 has its own compiled step (Dynamo
    specialises a size of 1, and tuning gives it other kernels): the headline `b1_tok_s` is checked
    too. A batch size already timed reuses its compiled graph; only its CUDA graph is captured again."""
    p = len(prefix)
    prompts = [[bos, *random_tokens(prompt_tokens - 1)] for _ in range(rows)]
    out = {"no_memory_vs_hf": _check_against_hf(model, hf, builder, prompts, new_tokens)}
    if rows > 1:
        out["no_memory_b1_vs_hf"] = _check_against_hf(model, hf, builder, prompts[:1], new_tokens)
    if rag_context:
        out["rag_b1_vs_hf"] = _check_against_hf(model, hf, builder, [[bos, *rag_context, *prompts[0][1:]]],
                                                new_tokens)

    # Memory: against one uncached pass of an fp32 copy of the weights, with the groups we read.
    retrieval = RecordingBank(bank, config.mems_per_chunk)
    logits = []
    decoder = builder(model, rows, p + prompt_tokens + new_tokens, memory=True, prefix_len=p)
    ours = generate_static(decoder, prompts, prefix=prefix, max_new_tokens=new_tokens, memory_provider=retrieval,
                           on_logits=lambda s, x: logits.append(x.clone()))
    with torch.inference_mode():
        eager = generate(model, prompts, prefix=prefix, max_new_tokens=new_tokens,
                         memory_provider=RecordingBank(bank, config.mems_per_chunk))
        reference = copy.deepcopy(model).float()
        n_chunks = math.ceil(prompt_tokens / config.chunk_len)
        ref = torch.stack([
            full_forward(reference, config, prefix, prompts[b], ours.tokens[b],
                         retrieval.calls[0][b * n_chunks : (b + 1) * n_chunks] + [c[b] for c in retrieval.calls[1:]])
            for b in range(rows)
        ])
        del reference
    out["memory_vs_fp32"] = compare(torch.stack(logits, 1), ref, ours.tokens, eager.tokens)
    out["ok"] = all(c["ok"] for c in out.values())
    for name, c in out.items():
        if isinstance(c, dict):
            log(f"  {name}: rel err {c['rel_err']:.2e}, tokens agree {c['tokens_agree']:.3f} with the "
                f"reference's argmax ({c['unexplained']} not near-ties), same greedy run: {c['same_run']}")
    return out


def _check_against_hf(model, hf, builder, prompts: list[list[int]], new_tokens: int) -> dict:
    """Our greedy tokens without memory against HF's, and our logits against HF's teacher-forced on our
    tokens (prompts of one length)."""
    logits: list[torch.Tensor] = []
    n = len(prompts[0])
    ours = generate_static(builder(model, len(prompts), n + new_tokens, memory=False), prompts,
                           max_new_tokens=new_tokens, on_logits=lambda s, x: logits.append(x.clone()))
    hf_tokens = hf_generate(hf, prompts, new_tokens, static=False, compile=False)
    with torch.inference_mode():
        ids = torch.tensor([x + t[:-1] for x, t in zip(prompts, ours.tokens, strict=True)],
                           device=model.output.weight.device)
        ref = hf(ids).logits[:, n - 1 :]  # (B, N, V)
    return compare(torch.stack(logits, 1), ref, ours.tokens, hf_tokens)


def full_forward(model, config, prefix, prompt, generated, groups) -> torch.Tensor:
    """(N, V) logits of one row in one uncached pass, each token reading the memories it read."""
    p, device = len(prefix), model.output.weight.device
    body = list(prompt) + list(generated[:-1])
    tokens = torch.tensor([list(prefix) + body], device=device)
    slots = torch.arange(tokens.shape[1], device=device)[None]
    token_group = chunk_groups(slots, p, config.chunk_len)
    n_prompt_chunks = math.ceil(len(prompt) / config.chunk_len)
    for i in range(len(prompt), len(body)):
        token_group[0, p + i] = n_prompt_chunks - 1 + (i - len(prompt)) // config.chunk_len
    memory = stack_memories([groups], slots_per_group=config.mem_slots, device=device, dtype=torch.float32)
    logits = model(tokens, rope_positions(slots, p, config.ref_len), memory=memory, token_group=token_group)
    return logits[0, p + len(prompt) - 1 :]


def compare(ours: torch.Tensor, ref: torch.Tensor, tokens: list[list[int]], other_run: list[list[int]]) -> dict:
    """ours, ref: (B, N, V). A token may differ from the reference's argmax only at a near-tie."""
    ours, ref = ours.float(), ref.float()
    rel = float((ours - ref).norm() / ref.norm())
    chosen = torch.tensor(tokens, device=ref.device)  # (B, N)
    best = ref.max(dim=-1).values  # (B, N)
    gap = best - ref.gather(-1, chosen[..., None])[..., 0]  # 0 where we took the reference's argmax
    err = (ours - ref).abs().amax(dim=-1)  # (B, N)
    agree = float((gap == 0).float().mean())
    unexplained = int(((gap > 0) & (gap > 2 * err)).sum())
    ok = bool(math.isfinite(rel) and rel < REL_TOLERANCE and unexplained == 0)
    return {"rel_err": rel, "tokens_agree": agree, "unexplained": unexplained, "same_run": tokens == other_run,
            "ok": ok}


# ---- helpers --------------------------------------------------------------------------------
class _Clock:
    def __init__(self, log: Callable[[str], None], started: float) -> None:
        self.log, self.started = log, started

    def __call__(self, what: str) -> None:
        self.log(f"[{time.perf_counter() - self.started:6.1f} s] {what}")


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def card_name(device: str) -> str:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return "cpu"


def default_json_path(device: str, directory: Path = Path("bench/results")) -> Path:
    return directory / f"gpu-{card_name(device)}-{datetime.now(UTC).date().isoformat()}.json"


def render(result: dict) -> str:
    rows = ["| batch | variant | tok/s (median) | tok/s (mean) | step ms |", "|---|---|---|---|---|"]
    for bsz, r in result["batches"].items():
        for name, v in r["variants"].items():
            step = f"{v['step_ms']:.3f}" if "step_ms" in v else ""
            rows.append(f"| {bsz} | {name} | {v['tok_s']:.1f} | {v['mean_tok_s']:.1f} | {step} |")
    rows.append("")
    rows += [f"{k}: {v}" + (f"  (target {TARGETS[k]})" if k in TARGETS else "") for k, v in result["summary"].items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memory3.bench.gpu", description=__doc__.split("\n")[0])
    add_gpu_bench_arguments(parser, json_required=False)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def run_from_args(args: argparse.Namespace) -> int:
    path = args.json
    if path is None:
        path = default_json_path(args.device)
    elif path.is_dir():
        path = default_json_path(args.device, path)
    partial = path.with_suffix(".partial.json")
    result = run_gpu_bench(**gpu_bench_kwargs(args), log=lambda msg: print(msg, file=sys.stderr, flush=True),
                           checkpoint=lambda so_far: write_json(so_far, partial))
    write_json(result, path)
    partial.unlink(missing_ok=True)
    print(render(result))
    print(f"wrote {path}")
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
