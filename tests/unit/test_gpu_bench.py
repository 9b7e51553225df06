"""bench/gpu.py runs its whole logic on the CPU at toy sizes (`--smoke`), and reports what it claims."""

import asyncio
import gc
import json
import sys
import time
import weakref

import pytest
import torch

from memory3.bench import gpu
from memory3.bench.gpu import MIN_ROUNDS, TARGETS, main, render, run_gpu_bench, summarize, summarize_run, time_rounds
from memory3.services.cli.main import build_parser


def test_cli_parses_bench_gpu():
    args = build_parser().parse_args(["bench", "gpu", "--json", "out.json", "--preset", "tiny", "--device", "cpu",
                                      "--smoke", "--dtype", "bfloat16"])
    assert (args.bench_kind, args.preset, args.device, args.smoke, args.rounds, args.dtype) == (
        "gpu", "tiny", "cpu", True, 9, "bfloat16")


class FakeClock:
    """Seconds that pass only when a variant runs: each run takes `per_run`."""

    def __init__(self, per_run: float) -> None:
        self.now, self.per_run = 0.0, per_run

    def __call__(self) -> float:
        return self.now

    def variant(self) -> list[list[int]]:
        self.now += self.per_run
        return [[0, 0]]


@pytest.mark.parametrize(("deadline", "rounds_run"), [(None, 9), (7.0, MIN_ROUNDS), (8.0, 4), (17.9, 8), (1.0, 3)])
def test_rounds_stop_before_one_would_end_past_the_deadline(deadline, rounds_run):
    """Two variants of 1 s: a round takes 2 s. A round starts only if, as long as the last one, it
    ends by the deadline; the first MIN_ROUNDS always run."""
    clock = FakeClock(per_run=1.0)
    seconds = time_rounds({"a": clock.variant, "b": clock.variant}, 9, 2, torch.device("cpu"),
                          deadline=deadline, clock=clock)
    assert seconds == {"a": [1.0] * (rounds_run - 1), "b": [1.0] * (rounds_run - 1)}


def test_cli_checks_rounds_and_budget(capsys):
    args = build_parser().parse_args(["bench", "gpu", "--json", "out.json", "--budget-s", "420"])
    assert args.budget_s == 420.0
    for bad, message in ((["--rounds", "1"], "--rounds must be >= 2"), (["--budget-s", "0"], "--budget-s must be > 0")):
        with pytest.raises(SystemExit) as exit_:
            main(["--preset", "tiny", "--device", "cpu", "--smoke", *bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("dtype", "compile", "max_rel_err"), [("float32", False, 1e-5), ("bfloat16", True, 3e-2)])
def test_smoke_run_on_cpu(tmp_path, request, dtype, compile, max_rel_err):
    """bfloat16 with --compile takes the GPU run's paths: bf16 weights, caches, pinned memories and
    masks, and compiled blocks timed against uncompiled ones."""
    if compile:
        request.getfixturevalue("cpu_compiler")
    flag = "--compile" if compile else "--no-compile"
    assert main(["--preset", "tiny", "--device", "cpu", "--smoke", "--dtype", dtype, flag, "--budget-s", "600",
                 "--json", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-cpu-*.json")  # and the partial one of the run is gone
    result = json.loads(path.read_text())
    for key in (*TARGETS, "b1_tok_s", "b2_memory_tok_s", "hbm_copy_gb_s", "b1_roofline_tok_s", "correct"):
        assert key.replace("b32", "b2") in result
    assert result["protocol"]["dtype"] == dtype
    assert result["compile"]["compiled"] is compile and result["compile"]["error"] is None
    assert ("compiled_over_uncompiled" in result["batches"]["2"]["ratios"]) is compile
    assert result["correct"] and result["correctness"]["memory_vs_fp32"]["rel_err"] < max_rel_err
    # batch 1's own compiled step and RAG's long prompts are checked too, not the largest batch alone
    for check in ("no_memory_vs_hf", "no_memory_b1_vs_hf", "rag_b1_vs_hf"):
        assert result["correctness"][check]["ok"] and result["correctness"][check]["rel_err"] < max_rel_err
    assert set(result["batches"]["2"]["variants"]) == {"hf_eager", "hf_static", "no_memory", "memory", "rag",
                                                       *(["no_memory_uncompiled"] if compile else [])}
    assert result["protocol"]["retrievals_per_sequence"] == 3 and result["protocol"]["budget_s"] == 600
    assert result["batches"]["2"]["rounds_run"] == 2  # --smoke's, which a budget does not cut
    for bsz in ("1", "2"):  # the serving engine, its padded passes eager on the CPU against exact ones
        arms = result["engine"][bsz]
        assert arms["graphs"]["tok_s"] > 0 and arms["eager"]["tok_s"] > 0 and arms["graphs"]["rounds_run"] == 2
        assert arms["graphs"]["graphs_captured"] == 0 and arms["graphs"]["capture_error"] is None
        assert result[f"b{bsz}_engine_graphs_over_eager"] == arms["graphs_over_eager"] > 0
    assert not any(result["batches"]["2"]["static_prefill"].values())  # no CUDA graphs on the CPU
    assert result["batches"]["2"]["static_prefill_errors"] == {}
    profile = result["batches"]["1"]["step_profile"]["no_memory"]
    assert profile["calls"] > 0 and profile["calls_ms"] > 0
    if not compile:  # eager on the CPU: 5 matrix products per block of tiny's 4, and the output head
        assert {r["name"]: r["count"] for r in profile["top"]}["aten::mm"] == 5 * 4 + 1
    assert "| 2 | memory |" in render(result)


def test_a_compiler_failure_leaves_a_measured_uncompiled_run(tmp_path, monkeypatch):
    """The second decoder fails to compile: the first is rebuilt, so that every variant of a batch
    size is uncompiled and the ratios compare like with like."""
    built = []

    def compile_that_fails_the_second_time(fn, **kwargs):
        assert kwargs["options"] == {"coordinate_descent_tuning": False}  # --no-tune-kernels
        def compiled(*args, **kw):
            if len(built) > 3:  # the first decoder's three compiled parts have been made
                raise RuntimeError("no C++ compiler here")
            return fn(*args, **kw)
        built.append(fn)
        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails_the_second_time)
    args = ["--preset", "tiny", "--device", "cpu", "--smoke", "--compile", "--no-tune-kernels", "--json",
            str(tmp_path / "r.json")]
    assert main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["compile"]["compiled"] is False and "no C++ compiler here" in result["compile"]["error"]
    assert result["compile"]["options"] == {"coordinate_descent_tuning": False}
    assert result["correct"] and "no_memory_uncompiled" not in result["batches"]["1"]["variants"]
    assert result["batches"]["1"]["compiled"] == {"no_memory": False, "memory": False, "rag": False}


def test_each_batch_size_is_checkpointed_as_it_is_measured():
    seen = []
    result = run_gpu_bench(preset="tiny", device="cpu", smoke=True, compile=False, log=lambda msg: None,
                           checkpoint=lambda so_far: seen.append(json.loads(json.dumps(so_far))))
    assert [sorted(c["batches"]) for c in seen] == [["1"], ["1", "2"], ["1", "2"]]  # and after the engine's arms
    assert all(c["partial"] for c in seen)
    assert "engine" not in seen[1] and seen[2]["engine"]["2"]["eager"]["tok_s"] > 0
    # issue #7's keys as far as measured: a run cut short still has its batch-1 numbers
    assert seen[0]["b1_tok_s"] > 0 and seen[0]["b1_over_roofline"] > 0 and seen[0]["b2_memory_tok_s"] is None
    assert seen[-1]["b2_memory_tok_s"] > 0 and seen[-1]["correct"] is None
    assert seen[-1]["batches"]["2"]["variants"]["memory"] == result["batches"]["2"]["variants"]["memory"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_without_cuda_it_says_how_to_check_on_the_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--json", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu --smoke" in err
    assert not list(tmp_path.iterdir())


def test_a_variant_that_fails_is_left_out_and_the_others_are_timed():
    clock = FakeClock(per_run=1.0)
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("static cache needs a newer transformers")

    errors = {}
    seconds = time_rounds({"a": clock.variant, "hf_static": broken, "b": clock.variant}, 4, 2,
                          torch.device("cpu"), clock=clock, errors=errors)
    assert seconds == {"a": [1.0] * 3, "hf_static": [], "b": [1.0] * 3}
    assert len(calls) == 1 and "newer transformers" in errors["hf_static"]
    short = {}
    time_rounds({"a": clock.variant, "short": lambda: [[0]]}, 2, 2, torch.device("cpu"), clock=clock, errors=short)
    assert "produced 1 tokens, expected 2" in short["short"]


def test_summaries_leave_out_what_failed_or_was_not_measured():
    seconds = {"no_memory": [1.0, 1.0], "memory": [1.0, 2.0], "hf_eager": [], "rag": [2.0, 2.0],
               "hf_static": [4.0, 4.0]}
    batch = summarize(seconds, {"no_memory": 0.01, "memory": 0.01}, 1, 10)
    assert "hf_eager" not in batch["variants"] and batch["ratios"]["memory_over_hf_eager"] is None
    assert batch["ratios"]["memory_over_no_memory"] == 0.75
    summary = summarize_run({1: batch}, (1, 32), 100.0, 1e12, None, False)
    assert summary["b1_tok_s"] == 10.0 and summary["b1_over_roofline"] == 0.1
    assert summary["b32_memory_tok_s"] is None and summary["memory_over_no_memory"] is None
    assert set(TARGETS) <= set(summary)


def test_a_correctness_check_that_fails_to_run_still_leaves_the_measured_json(tmp_path, monkeypatch):
    """and by then the timed decoders (caches, graphs) are gone, to make room for the check's."""
    alive = []
    made = []

    class Tracked(gpu.StaticDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    def check_that_breaks(*args, rows, **kwargs):
        assert rows == 2  # the largest batch: its compiled step is reused
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu, "StaticDecoder", Tracked)
    monkeypatch.setattr(gpu, "check_correctness", check_that_breaks)
    assert main(["--preset", "tiny", "--device", "cpu", "--smoke", "--no-compile", "--json", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("gpu-cpu-*.json")
    result = json.loads(path.read_text())
    assert made and alive == [0]
    assert result["correct"] is False and "out of memory" in result["correctness"]["error"]
    assert result["b1_tok_s"] > 0 and result["b2_memory_tok_s"] > 0


def test_a_serving_engine_that_cannot_be_imported_is_reported_and_the_run_goes_on(monkeypatch, tmp_path):
    """On the device the services' imports may be missing: the JSON says so, and the decoder's rounds keep
    the engine's share of the budget."""
    monkeypatch.setitem(sys.modules, "memory3.bench.gpu_engine", None)  # its import raises ImportError
    assert gpu._engine_arms()[0] is None and "gpu_engine halted" in gpu._engine_arms()[1]
    said = []
    result = run_gpu_bench(preset="tiny", device="cpu", smoke=True, log=said.append)
    assert "gpu_engine halted" in result["engine"]["error"] and result["correct"]
    assert any("the serving engine's arms cannot run here: ModuleNotFoundError" in line for line in said)


def test_an_engine_arm_that_fails_or_has_no_time_left_leaves_the_others(tiny_model, text_codec, monkeypatch):
    from memory3.bench import gpu_engine

    calls = []

    async def arm(model, codec, bank, prompts, new_tokens, graphs, rounds, min_rounds, deadline):
        calls.append((len(prompts), graphs))
        await asyncio.sleep(0.1)
        if len(prompts) == 2 and graphs:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"tok_s": 10.0 if graphs else 5.0, "rounds_run": 3, "start_s": 0.0, "graphs_captured": 0}

    monkeypatch.setattr(gpu_engine, "_rounds", arm)
    prompts = {1: [[1, 2]], 2: [[1, 2], [1, 3]]}
    out = gpu_engine.engine_throughput(tiny_model, text_codec, [], prompts, new_tokens=4, rounds=3, min_rounds=3,
                                       deadline=None, log=lambda _: None)
    assert out["1"]["graphs_over_eager"] == 2.0 and "out of memory" in out["2"]["graphs"]["error"]
    assert out["2"]["eager"]["tok_s"] == 5.0 and out["2"]["graphs_over_eager"] is None
    calls.clear()
    late = gpu_engine.engine_throughput(tiny_model, text_codec, [], prompts, new_tokens=4, rounds=3, min_rounds=3,
                                        deadline=time.perf_counter() + 0.2, log=lambda _: None)
    assert calls == [(1, True)]  # 0.1 s of its 0.05 s share: the arms after it would end past theirs
    assert late["1"]["eager"] == late["2"]["eager"] == {"skipped": "the time budget"}
    calls.clear()
    assert gpu_engine.engine_throughput(tiny_model, text_codec, [], prompts, new_tokens=4, rounds=3, min_rounds=3,
                                        deadline=time.perf_counter() - 1, log=lambda _: None)["1"]["graphs"] == {
        "skipped": "the time budget"} and calls == []


@pytest.mark.parametrize("correct", [True, False])
def test_memory3_bench_gpu_writes_into_a_directory_and_exits_1_when_incorrect(tmp_path, monkeypatch, correct):
    """`memory3 bench gpu --json DIR` wrote the result to the directory's own path (IsADirectoryError,
    the run lost) and exited 0 whatever its correctness check said."""
    from memory3.services.cli.main import main as memory3

    measured = {"benchmark": "gpu", "summary": {}, "correct": correct, "batches": {}}
    monkeypatch.setattr(gpu, "run_gpu_bench", lambda **kwargs: measured)
    monkeypatch.setattr(gpu, "render", lambda result: "table")
    assert memory3(["bench", "gpu", "--json", str(tmp_path), "--device", "cpu", "--smoke"]) == (0 if correct else 1)
    (path,) = tmp_path.glob("gpu-cpu-*.json")
    assert json.loads(path.read_text()) == measured


def test_a_step_that_fails_to_time_alone_is_named_and_the_others_are_kept(monkeypatch):
    """An exception while timing one decoder's step alone ended the run before its batch size's
    numbers were kept."""
    def step_seconds(decoder, start_slot, steps, repeats):
        if decoder == "broken":
            raise RuntimeError("graph replay failed")
        return 0.001

    monkeypatch.setattr(gpu, "step_seconds", step_seconds)
    errors, logged = {}, []
    steps = gpu.step_times({"no_memory": "fine", "memory": "broken", "rag": "fine"},
                           {"no_memory": 100, "memory": 120, "rag": 900}, errors, smoke=True, log=logged.append)
    assert steps == {"no_memory": 0.001, "rag": 0.001}
    assert errors == {"memory step": "RuntimeError: graph replay failed"} and "graph replay failed" in logged[0]
