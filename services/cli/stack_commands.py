"""`memory3 up`, `down`, `generate` (the gRPC client) and `demo` (the README's main command)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from memory3.services.stack import (
    StackOptions,
    StackState,
    down_message,
    lock_holder,
    process_state,
    read_state,
    stack_is_up,
    start_stack,
    stop_stack,
)

DEFAULT_RELEASE = "small-v1"  # what `up` and `demo` serve, trained on demand when the bucket lacks it
QUICK_RELEASE = "quick-v1"  # the same with --quick: a tiny model trained in about a minute
DEMO_QUESTIONS = 10  # the demo scores this many knowledge-base-only questions, with memory and without


def ensure_release(s3, name: str, *, home: Path, quick: bool, train: bool, home_option: str = "") -> None:
    """Train and publish `name` unless the bucket has it (the trainer resumes an interrupted run).

    Only a default release is trained on demand (`train`): a release asked for by name that is not
    there is more likely a typo than a wish for a half-hour training run. `train` alone cannot
    make it: it needs the store, which `up` stops when it fails, so the hint starts a stack first.
    """
    from memory3.services.release.catalog import read_catalog
    from memory3.services.release.manifest import release_key
    from memory3.services.release.publish import MANIFEST_FILE
    from memory3.services.storage.object_store import ObjectStore

    store = ObjectStore(s3)
    if store.exists(release_key(name, MANIFEST_FILE)):
        print(f"release {name!r} found in the bucket", file=sys.stderr)
        return
    if not train:
        names = [m.name for m in read_catalog(store).published]
        quick_option = " --quick" if quick else ""
        raise ValueError(f"release {name!r} is not in bucket {s3.bucket!r} (releases there: "
                         f"{', '.join(sorted(names)) or 'none'}). Only the default release is trained on demand "
                         f"(leave out --release); to train this one, start the stack with the default release "
                         f"(`memory3 up{quick_option}{home_option}`), then `memory3 train --release {name}"
                         f"{quick_option}{home_option}` trains and publishes it into the stack's store")
    from .commands import cmd_train

    what = "a quick (tiny, one-minute)" if quick else "the small"
    print(f"release {name!r} not in the bucket: training {what} model and publishing it", file=sys.stderr)
    from memory3.services.trainer.pipeline import WorkDirTaken

    work_dir = home / "runs" / name
    try:
        cmd_train(s3, preset=None, quick=quick, release=name, work_dir=work_dir, seed=0, codec="bf16")
    except WorkDirTaken as e:  # `up` takes no --work-dir, which the trainer's message offers
        raise ValueError(f"{work_dir} holds a run of another configuration ({e.differences}), left by a "
                         f"`memory3 train --release {name}` of other settings: finish that run with its own "
                         f"command, or remove {work_dir} to train the stack's release from the start") from e


def cmd_up(home: Path, *, release: str | None, quick: bool, redis: bool, retrieval_policy: str, max_batch: int,
           decoder_port: int | None, text_shards: int = 1, home_option: str = "") -> StackState:
    """Starts the stack with `release`, or by default (None) `DEFAULT_RELEASE` (`QUICK_RELEASE` with
    `quick`), trained if missing. A SIGTERM while it starts stops what it started, as Ctrl-C does.
    `home_option`: the `--home` the user gave, repeated in the hints printed (empty for the default)."""
    name = release or (QUICK_RELEASE if quick else DEFAULT_RELEASE)
    options = StackOptions(home=home, release=name, redis=redis, retrieval_policy=retrieval_policy,
                           max_batch=max_batch, decoder_port=decoder_port, text_shards=text_shards,
                           home_option=home_option)
    with interrupt_on_sigterm():
        state = start_stack(options, log=lambda msg: print(msg, file=sys.stderr),
                            ensure_release=lambda s3, name: ensure_release(s3, name, home=home, quick=quick,
                                                                           train=release is None,
                                                                           home_option=home_option))
    print(f"stack up: decoder at {state.address('decoder')}, release {name!r}; "
          f"`memory3 generate \"...\"{home_option}` to ask, `memory3 down{home_option}` to stop", file=sys.stderr)
    return state


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a Job's pod stopped, `kill`) or a SIGHUP (the terminal closed), raised where the
    program is, so that it unwinds through the same clean-up as Ctrl-C's KeyboardInterrupt: every
    `except BaseException` or `finally` that undoes half-done work (a publication, a stack that was
    starting) runs."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within it, a SIGTERM or SIGHUP raises `Terminated` (`main` ends with one line and exit 128 +
    the signal); without it, the process would die where it is and leave what it had begun. A SIGHUP
    that is ignored (`nohup`) stays ignored. Signal handlers belong to the main thread: elsewhere
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, _frame) -> None:
        raise Terminated(signum)
    caught = [signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else [])
    previous = {signum: signal.signal(signum, terminated) for signum in caught}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def cmd_down(home: Path) -> int:
    stop_stack(home, log=lambda msg: print(msg, file=sys.stderr))
    return 0


def cmd_status(home: Path, home_option: str = "") -> int:
    """The local stack's processes and their state: 0 when every one runs and every service is
    SERVING, 1 otherwise (none running included), for scripts."""
    state = read_state(home)
    if state is None:
        print(f"no stack is running in {home} (`memory3 up{home_option}` starts one)")
        return 1
    s3 = state.s3_config
    print(f"stack in {home}: release {state.release!r}, object store {s3.endpoint} (bucket {s3.bucket!r})")
    print(f"{'NAME':<10} {'PID':>8}  {'ADDRESS':<17} {'STATE':<11} LOG")
    healthy = True
    for p in state.processes:
        now = process_state(p)
        healthy &= now in ("running", "SERVING")
        print(f"{p.name:<10} {p.pid:>8}  127.0.0.1:{p.port:<7} {now:<11} {p.log}")
    for name in state.not_started():
        healthy = False
        print(f"{name:<10} {'-':>8}  {'-':<17} {'not started':<11} -")
    if not healthy:
        print(_not_up_hint(state, home_option))
    return 0 if healthy else 1


def _not_up_hint(state: StackState, home_option: str) -> str:
    """What to do about a stack that is not all up: wait for the command starting it, if one runs."""
    holder = lock_holder(Path(state.home))
    if holder is not None:
        return f"the stack is being started or stopped (by {holder})"
    if state.not_started():
        return (f"the `memory3 up` that started it was stopped before it ended: `memory3 down{home_option}` then "
                f"`memory3 up{home_option}` starts the stack again")
    return (f"not every process is up: see its log; `memory3 down{home_option}` then `memory3 up{home_option}` "
            "starts the stack again")


def decoder_address(home: Path, address: str | None, home_option: str = "") -> str:
    """`address`, or the decoder of the stack `up` runs in `home`: an error that says whether no
    stack was started there or which of its processes stopped."""
    if address:
        return address
    state = read_state(home)
    if state is None:
        raise RuntimeError(f"no decoder address: no stack is running in {home}; start one with "
                           f"`memory3 up{home_option}` or pass --address HOST:PORT")
    if state.not_running():
        raise RuntimeError(f"no decoder address: {down_message(state, home_option)}; or pass --address HOST:PORT")
    return state.address("decoder")


def cmd_generate_remote(address: str, prompt: str, *, max_tokens: int, temperature: float, top_k: int,
                        top_p: float, seed: int | None, stop: list[str], memory: bool, show_references: bool,
                        timeout_s: float, auth_token: str | None = None, tls_ca: Path | None = None,
                        presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> int:
    """Stream an answer from the GenerationService; citations go to stderr, the text to stdout.
    A token without `tls_ca` is refused: it is never sent in plaintext, and dropping it unsaid left
    the decoder's UNAUTHENTICATED to explain."""
    if auth_token and tls_ca is None:
        raise ValueError("MEMORY3_AUTH_TOKEN is only sent over TLS: add --tls-ca (the PEM CA of the decoder's "
                         "certificate), or unset it")
    import grpc

    from memory3.v1 import generation_service_pb2 as pb
    from memory3.v1 import generation_service_pb2_grpc as pb_grpc

    params = pb.GenerationParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 stop=stop, include_reference_text=show_references, presence_penalty=presence_penalty,
                                 frequency_penalty=frequency_penalty,
                                 retrieval=pb.RETRIEVAL_MODE_MEMORY if memory else pb.RETRIEVAL_MODE_NONE)
    if seed is not None:
        params.seed = seed
    if tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(tls_ca.read_bytes())
        if auth_token:
            credentials = grpc.composite_channel_credentials(credentials,
                                                             grpc.access_token_call_credentials(auth_token))
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    cited: dict[str, str] = {}
    with channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            for response in stub.Generate(pb.GenerateRequest(prompt=prompt, params=params), timeout=timeout_s):
                for citation in response.citations:
                    for ref in citation.references:
                        cited.setdefault(ref.id, ref.text)
                for warning in response.warnings:
                    print(f"[warning: {warning}]", file=sys.stderr)
                sys.stdout.write(response.text)
                sys.stdout.flush()
                if response.finish_reason:
                    usage = response.usage
                    reason = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
                    sys.stdout.write("\n")
                    print(f"[finish: {reason}; {usage.prompt_tokens} prompt + {usage.completion_tokens} generated "
                          f"tokens; {usage.retrievals} retrievals, {usage.memories_read} memories read]",
                          file=sys.stderr)
        except grpc.RpcError as e:
            sys.stdout.write("\n")
            raise RuntimeError(f"{e.code().name}: {e.details()}") from e
    if cited:
        print("references used:", file=sys.stderr)
        for rid, text in cited.items():
            print(f"  {rid}" + (f": {text[:100]}" if text else ""), file=sys.stderr)
    return 0


def heldout_questions(s3, release: str, n: int) -> list[tuple[str, str]]:
    """(prompt, answer) of n questions whose facts exist only in the release's knowledge base, in the
    order the trainer evaluates them."""
    from memory3.services.release.reader import read_manifest
    from memory3.services.storage.object_store import ObjectStore
    from memory3.services.trainer.pipeline import heldout_questions as world_questions
    from memory3.services.trainer.world import World

    manifest = read_manifest(ObjectStore(s3), release)
    pipeline = manifest.provenance.get("pipeline") or {}
    if "world_train" not in pipeline:
        raise RuntimeError(f"release {release!r} has no synthetic world in its provenance: ask your own question "
                           "with `memory3 generate`")
    seed = pipeline.get("seed", 0)
    world = World(seed, n_train=pipeline["world_train"], n_heldout=pipeline["world_heldout"])
    return [(q.prompt, q.answer) for q in world_questions(world, n, seed=seed)]


def cmd_demo_stack(home: Path, *, release: str | None, quick: bool, home_option: str = "") -> int:
    """Streams the answer to one knowledge-base-only question, then scores that one and the next
    ones with and without memory: a single answer can be wrong, the score says how often."""
    state = stack_is_up(home)
    if state is None:  # interrupted in here, `up` stops what it had started (as `main` then says)
        state = cmd_up(home, release=release, quick=quick, redis=True, retrieval_policy="fail", max_batch=8,
                       decoder_port=None, home_option=home_option)
    elif release is not None and release != state.release:
        raise ValueError(f"the running stack serves {state.release!r}: `memory3 down{home_option}` first to serve "
                         f"{release!r}")
    with interrupted_says(f"the stack keeps running (`memory3 down{home_option}` stops it)"):
        return _ask_demo_questions(state)


@contextlib.contextmanager
def interrupted_says(left: str) -> Iterator[None]:
    """A Ctrl-C within it carries what the command leaves (`left`), for `main`'s last line: the
    command's usual words would be wrong there (the demo's stack keeps running once it is up)."""
    try:
        yield
    except KeyboardInterrupt as e:
        e.left = left
        raise


def _ask_demo_questions(state: StackState) -> int:
    """The demo's part once the stack is up: one answer streamed, then the scores."""
    asked = heldout_questions(state.s3_config, state.release, DEMO_QUESTIONS)
    prompt, answer = asked[0]
    print(f"\nQ (a fact that exists only in the knowledge base; expected answer: {answer}):\n{prompt}",
          file=sys.stderr)
    address = state.address("decoder")
    cmd_generate_remote(address, prompt, max_tokens=24, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                        stop=["\n"], memory=True, show_references=True, timeout_s=120)
    with_memory = complete_remote(address, [p for p, _ in asked], memory=True)
    without = complete_remote(address, [p for p, _ in asked], memory=False)
    print(demo_scores(asked, with_memory, without), file=sys.stderr)
    return 0


def complete_remote(address: str, prompts: list[str], *, memory: bool, timeout_s: float = 120) -> list[str]:
    """Greedy one-line answers from the decoder's unary Complete, one request at a time: alone in
    its batch, each answer is the same from run to run (batched rows can round differently)."""
    import grpc

    from memory3.v1 import generation_service_pb2 as pb
    from memory3.v1 import generation_service_pb2_grpc as pb_grpc

    params = pb.GenerationParams(max_tokens=24, temperature=0.0, stop=["\n"],
                                 retrieval=pb.RETRIEVAL_MODE_MEMORY if memory else pb.RETRIEVAL_MODE_NONE)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            return [stub.Complete(pb.CompleteRequest(prompt=p, params=params), timeout=timeout_s).text for p in prompts]
        except grpc.RpcError as e:
            raise RuntimeError(f"{e.code().name}: {e.details()}") from e


def demo_scores(asked: list[tuple[str, str]], with_memory: list[str], without: list[str]) -> str:
    """A table of the questions' expected answers beside those given with and without memory, and
    how many each got right (exact match on the line's text, as `bench quality` scores)."""
    def cut(text: str, width: int) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    def cell(text: str, expected: str) -> str:
        text = text.strip()
        return f"{'✓' if text == expected else '✗'} {cut(text, 24) or '(nothing)'}"

    rows = [("question", "expected", "with memory", "without memory")]
    rows += [(cut(p.splitlines()[0].removeprefix("Question: "), 48), a, cell(m, a), cell(n, a))
             for (p, a), m, n in zip(asked, with_memory, without, strict=True)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    right = [sum(t.strip() == a for t, (_, a) in zip(answers, asked, strict=True))
             for answers in (with_memory, without)]
    n = len(asked)
    return (f"\n{n} knowledge-base-only questions, greedy, the first one above:\n" + "\n".join(lines)
            + f"\nright with memory: {right[0]}/{n}; without memory: {right[1]}/{n} "
              "(`memory3 bench quality` scores 300)")
