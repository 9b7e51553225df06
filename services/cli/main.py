"""The `memory3` command. Arguments are parsed once here and passed down as plain values."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from memory3.bench.gpu_options import add_gpu_bench_arguments
from memory3.services.retrieval.index import INDEX_CHOICES

DEFAULT_HOME = Path.home() / ".cache" / "memory3"
SERVE_PORTS = {"decoder": 50051, "text": 50052, "memory": 50053, "trainer": 50055}
EXIST_OK_HELP = ("if a release of that name is already published from the same inputs, do nothing and exit 0 (a Job "
                 "run again); from other inputs it is still an error")
INDEX_KIND_HELP = ("the retrieval index: auto follows the number of references (exact below 200,000, HNSW below "
                   "5 million, IVF-PQ from there); flat, hnsw or ivfpq keep that kind whatever the size, in this "
                   "release and those derived from it")
TRAIN_DEVICE_HELP = ("where the model runs: auto (the default) is CUDA where this machine has it, else the CPU; "
                     "under torchrun, cuda and auto give each process the GPU of its LOCAL_RANK")


def finite_float(text: str) -> float:
    """The type of a number option: NaN passes every `x < 0` check, and inf is no number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def positive_int(text: str) -> int:
    """The type of a count that must be 1 or more: 0 tokens was sent as "unset" and got the server's default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def bounded_int(low: int, high: int, unit: str = "") -> Callable[[str], int]:
    """The type of a whole number sent in a field of `high`'s width: 3e9 max tokens failed the
    request with "Value out of range", which named no option."""
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: give {low} or more{unit}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value}: give {high} at most")
        return value
    return number


INT32_MAX = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)
GENERATE_TIMEOUT_S = 120.0  # `generate --timeout`: None there, so that --checkpoint can refuse one given
MAX_TEXT_SHARDS = 64  # the text services `up` starts at most (`StackOptions`)
SHARDS_NOTE = " (a text service without --index-shard reads the whole index as it is published)"


def utf8_text(text: str) -> str:
    """The type of a text argument: bytes that are not UTF-8 reach Python as lone surrogates, which
    failed later with "'utf-8' codec can't encode characters", naming no argument."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text[e.start:e.start + 1].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"not UTF-8 text (byte {byte!r} at character {e.start}): convert it to "
                                         "UTF-8 (iconv -t UTF-8)") from None
    return text


def preset(text: str) -> str:
    """The type of a model preset, checked before `train` builds its corpus and tokenizer. Read
    here, not at import: the model package imports torch, which every command would then wait for."""
    from memory3.model.config import PRESETS

    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}: choose one of {', '.join(sorted(PRESETS))}")
    return text


def model_device(text: str) -> str:
    """The type of a --device that runs a model here and now: cpu, cuda or cuda:N. auto, which
    training resolves, reached torch as a device name and failed with its list of device types."""
    name = device_name(text)
    if name == "auto":
        raise argparse.ArgumentTypeError("auto is for training: give cpu or cuda[:N]")
    return name


def device_name(text: str) -> str:
    """The type of a training --device: auto, cpu, cuda or cuda:N (what this machine has is checked
    where the device is chosen, beside torchrun's environment)."""
    from memory3.services.trainer.placement import PlacementError, check_device_name

    try:
        return check_device_name(text)
    except PlacementError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def counts(text: str) -> tuple[int, ...]:
    """The type of a comma-separated list of counts, each 1 or more."""
    return tuple(positive_int(c.strip()) for c in text.split(","))


def shard_counts(text: str) -> tuple[int, ...]:
    """The type of `release gc --shard-counts`: counts of 2 or more, or `none` (no text service is sharded)."""
    if text.strip() == "none":
        return ()
    try:
        found = tuple(int(c) for c in text.split(","))
    except ValueError:
        found = ()
    if not found or min(found) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give counts of 2 or more, comma-separated, or none (a text "
                                          "service of one shard serves the whole index, which is never cut)")
    return found


def non_negative_float(text: str) -> float:
    """The type of a number of seconds that may be 0 (none): a negative grace ended the drain at once."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 or more seconds")
    return value


def positive_float(text: str) -> float:
    """The type of a number of seconds that must be above 0: a timeout of 0 fails every request."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
    return value


def home_option(home: Path) -> str:
    """The `--home` a printed hint repeats, so that followed as written it acts on the same stack;
    empty for the default home."""
    return "" if home == DEFAULT_HOME else f" --home {shlex.quote(str(home))}"


def port_number(*, free: bool = False) -> Callable[[str], int]:
    """The type of a TCP port option, checked here: a server given 70000 binds another port (70000
    modulo 65536) and reports the one asked for. With `free`, 0 asks for any free port."""
    low = 0 if free else 1

    def port(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
        if not low <= value <= 65535:
            raise argparse.ArgumentTypeError(f"{value} is not a port: give {low}-65535"
                                             + (" (0: any free port)" if free else ""))
        return value
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memory3", description="Memory3: a language model with explicit memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="write a randomly initialised checkpoint (for demos and tests)")
    init.add_argument("--preset", type=preset, default="small", help="model preset (tiny, small, paper-2.4b)")
    init.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    init.add_argument("--seed", type=int, default=0)

    gen = sub.add_parser("generate", help="stream an answer from the decoder (gRPC), or in-process with --checkpoint")
    gen.add_argument("prompt", type=utf8_text)
    gen.add_argument("--address", default=None, help="decoder host:port (default: the stack `memory3 up` started)")
    gen.add_argument("--home", type=Path, default=None,
                     help="where `memory3 up` keeps its state, to find its decoder (default ~/.cache/memory3)")
    gen.add_argument("--checkpoint", type=Path, default=None,
                     help="generate in-process from this checkpoint directory instead (no servers)")
    gen.add_argument("--reference", action="append", default=[], metavar="TEXT", type=utf8_text,
                     help="with --checkpoint: a reference text to use as explicit memory (repeatable)")
    gen.add_argument("--reference-file", action="append", default=[], type=Path, metavar="FILE",
                     help="with --checkpoint: a UTF-8 file whose text becomes references (repeatable)")
    gen.add_argument("--max-new-tokens", "--max-tokens", type=bounded_int(1, INT32_MAX), default=64,
                     help="tokens to generate at most (--max-tokens, as OpenAI names it, is the same)")
    gen.add_argument("--temperature", type=finite_float, default=0.0,
                     help="sampling temperature (default 0: greedy, always the likeliest token)")
    gen.add_argument("--top-k", type=bounded_int(0, INT32_MAX, " (0 disables it)"), default=0,
                     help="sample among the K likeliest tokens only (default 0: all)")
    gen.add_argument("--top-p", type=finite_float, default=1.0,
                     help="sample among the likeliest tokens whose probabilities add up to P (default 1: all)")
    gen.add_argument("--seed", type=bounded_int(*INT64), default=None,
                     help="seed of the sampling, for an answer that repeats (default: a fresh one each time)")
    gen.add_argument("--presence-penalty", type=finite_float, default=0.0,
                     help="-2..2: a token's logit loses this once it has been generated (OpenAI's)")
    gen.add_argument("--frequency-penalty", type=finite_float, default=0.0,
                     help="-2..2: a token's logit loses this for every time it has been generated (OpenAI's)")
    gen.add_argument("--stop", action="append", default=[], type=utf8_text,
                     help="from the decoder: stop at this string (repeatable)")
    gen.add_argument("--no-memory", action="store_true", help="from the decoder: generate without retrieval")
    gen.add_argument("--timeout", type=positive_float, default=None,
                     help=f"from the decoder: seconds before the request is abandoned (default {GENERATE_TIMEOUT_S:g})")
    gen.add_argument("--tls-ca", type=Path, default=None,
                     help="from the decoder: PEM CA of its certificate (TLS; a token, from MEMORY3_AUTH_TOKEN, is "
                          "only sent over TLS)")
    gen.add_argument("--device", type=model_device, default="cpu",
                     help="with --checkpoint: cpu or cuda[:N] (default cpu)")

    demo = sub.add_parser("demo", help="the README's first command: the whole local stack answers from memory")
    demo.add_argument("--home", type=Path, default=DEFAULT_HOME, help="state, logs, releases and the local bucket")
    demo.add_argument("--release", default=None,
                      help="a release in the bucket to serve (default: small-v1, trained if missing)")
    demo.add_argument("--quick", action="store_true", help="train a one-minute tiny release if it is missing")

    up = sub.add_parser("up", help="start the local stack: S3 server, Redis, text, memory and decoder services")
    up.add_argument("--home", type=Path, default=DEFAULT_HOME, help="state, logs, releases and the local bucket")
    up.add_argument("--release", default=None,
                    help="a release in the bucket to serve (default: small-v1, trained if missing)")
    up.add_argument("--quick", action="store_true", help="train a one-minute tiny release if it is missing")
    up.add_argument("--no-redis", action="store_true", help="no Redis tier (memories from S3 and RAM)")
    up.add_argument("--retrieval-policy", choices=["fail", "continue"], default="fail",
                    help="text/memory service down: the decoder fails the request (fail, the default), or "
                         "generates without memory and says so (continue)")
    up.add_argument("--max-batch", type=int, default=8, help="streams the decoder decodes together (default 8)")
    up.add_argument("--decoder-port", type=port_number(free=True), default=None,
                    help="default (or 0): a free port")
    up.add_argument("--text-shards", type=bounded_int(1, MAX_TEXT_SHARDS), default=1, metavar="N",
                    help=f"N text services, each serving one shard of the release's index (1-{MAX_TEXT_SHARDS}; "
                         "default: 1)")

    down = sub.add_parser("down", help="stop exactly what `memory3 up` started (by PID)")
    down.add_argument("--home", type=Path, default=DEFAULT_HOME,
                      help="the home the stack was started in (`memory3 up --home`; default: ~/.cache/memory3)")
    status = sub.add_parser("status", help="the local stack's processes, addresses and health (exit 1 unless all "
                                           "are up)")
    status.add_argument("--home", type=Path, default=DEFAULT_HOME,
                        help="the home the stack was started in (`memory3 up --home`; default: ~/.cache/memory3)")

    train = sub.add_parser("train", help="train a model (three stages) and publish it as a release")
    train.add_argument("--preset", type=preset, default=None,
                       help="model preset (default: small, or tiny with --quick)")
    train.add_argument("--quick", action="store_true",
                       help="a short run of the whole pipeline: one minute with the tiny model, trained unless "
                            "--preset names another")
    train.add_argument("--release", required=True, help="name of the release to publish (immutable)")
    train.add_argument("--work-dir", type=Path, default=None,
                       help="checkpoints and logs; a killed run resumes from here (default: runs/NAME under --home)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--codec", default="bf16", choices=["fp16", "bf16", "int8", "vq"],
                       help="how memories are compressed in the bank")
    train.add_argument("--stage3-steps", type=int, default=None,
                       help="steps of stage 3, where chunks read same-kind neighbours beside their own "
                            "reference (default 1200, a few with --quick; see README, Training)")
    train.add_argument("--attention-weight", type=finite_float, default=None,
                       help="weight of a loss on the answer tokens' memory attention, which rewards attending "
                            "to the slots of the answer's own memory that hold the token being predicted "
                            "(default 3; 0 turns it off; see README, Training)")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="train under bfloat16 autocast; default: on where the device computes bf16 natively: "
                            "a CPU with AVX-512 BF16 or AMX (a step takes about 0.7x as long), a GPU from Ampere on")
    train.add_argument("--device", type=device_name, default="auto", help=TRAIN_DEVICE_HELP)
    train.add_argument("--index-kind", default="auto", choices=INDEX_CHOICES, help=INDEX_KIND_HELP + " (default: auto)")
    train.add_argument("--exist-ok", action="store_true", help=EXIST_OK_HELP)
    train.add_argument("--events", action="store_true",
                       help="print progress as JSON lines on stdout (for programs; the TrainerService uses it)")
    add_s3_arguments(train, local_stack=True)

    serve = sub.add_parser("serve", help="run a gRPC service")
    serve.add_argument("service", choices=["decoder", "text", "memory", "trainer", "kserve"],
                       help="kserve: the decoder as a KServe model (v2 REST/gRPC and OpenAI-style /v1/completions)")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=port_number(free=True), default=None,
                       help=f"default per service: {SERVE_PORTS}; 0: any free port")
    serve.add_argument("--grace", type=non_negative_float, default=10.0,
                       help="seconds in-flight requests get on SIGTERM, once not ready; the servers stop within "
                            "the same seconds (a second SIGTERM/SIGINT stops them at once)")
    serve.add_argument("--work-dir", type=Path, default=DEFAULT_HOME / "runs", help="training work directories")
    serve.add_argument("--release", default=None, help="the release to serve (every service but the trainer)")
    serve.add_argument("--wait-for-release", type=non_negative_float, default=0.0, metavar="SECONDS",
                       help="a release not published yet is waited for this long before the service starts "
                            "(beside the Job that publishes it); default 0: it is an error at once")
    add_server_arguments(serve)
    add_text_arguments(serve)
    add_memory_arguments(serve)
    add_decoder_arguments(serve)
    add_kserve_arguments(serve)
    add_s3_arguments(serve)

    kb = sub.add_parser("kb", help="knowledge base operations")
    kb_sub = kb.add_subparsers(dest="kb_command", required=True)
    kb_add = kb_sub.add_parser("add", help="add documents to a release, as a new release (no retraining)")
    kb_add.add_argument("files", nargs="+", type=Path,
                        help="UTF-8 text files, blank lines separating documents, or JSON Lines "
                             "({\"text\": ..., \"source\": ...} a line) in files ending .jsonl or .ndjson, in any case")
    kb_add.add_argument("--release", required=True, help="the release to derive from")
    kb_add.add_argument("--name", default=None, help="name of the new release (default: RELEASE-kb-<hash>)")
    kb_add.add_argument("--remove-id", dest="remove_ids", action="append", default=[], metavar="ID",
                        help="leave the parent's reference with this id out of the new release (repeatable): "
                             "with the corrected text in FILES, a fact is corrected in one release")
    kb_add.add_argument("--remove-match", dest="remove_matches", action="append", default=[], metavar="TEXT",
                        type=utf8_text,
                        help="leave out every reference of the parent whose text contains TEXT (case-sensitive; "
                             "repeatable)")
    kb_add.add_argument("--remove-from", type=Path, default=None, metavar="FILE",
                        help='references to leave out, as JSON Lines: {"id": ...} or {"match": ...} a line '
                             "(for more than a command line holds)")
    kb_add.add_argument("--index-kind", default=None, choices=INDEX_CHOICES,
                        help=INDEX_KIND_HELP + " (default: the parent's; from an IVF-PQ index to flat or hnsw, "
                                               "every reference is embedded again)")
    kb_add.add_argument("--device", type=device_name, default="auto",
                        help="where the added references' memories are encoded: auto (the default) is CUDA where "
                             "this machine has it, else the CPU")
    kb_add.add_argument("--exist-ok", action="store_true", help=EXIST_OK_HELP)
    kb_add.add_argument("--events", action="store_true",
                        help="print progress as JSON lines on stdout (for programs; the TrainerService uses it)")
    add_s3_arguments(kb_add, local_stack=True)
    kb_remove = kb_sub.add_parser(
        "remove", help="a release without some references, as a new release (to correct a fact: remove it, "
                       "then kb add the corrected text)")
    kb_remove.add_argument("--release", required=True, help="the release to derive from")
    kb_remove.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                           help="remove the reference with this id (as `memory3 generate` lists them; repeatable)")
    kb_remove.add_argument("--match", dest="matches", action="append", default=[], metavar="TEXT", type=utf8_text,
                           help="remove every reference whose text contains TEXT (case-sensitive; repeatable)")
    kb_remove.add_argument("--from", dest="select_from", type=Path, default=None, metavar="FILE",
                           help='references to remove, as JSON Lines: {"id": ...} or {"match": ...} a line '
                                "(for more than a command line holds)")
    kb_remove.add_argument("--name", default=None, help="name of the new release (default: RELEASE-rm-<hash>)")
    kb_remove.add_argument("--dry-run", action="store_true", help="list what would be removed; publish nothing")
    add_s3_arguments(kb_remove, local_stack=True)
    kb_merge = kb_sub.add_parser(
        "merge", help="one release with the changes of releases derived from the same one (the shards of the "
                      "encoding Job): their added references, without those any of them removed")
    kb_merge.add_argument("derived", nargs="+", metavar="DERIVED",
                          help="releases that descend from --release (by kb add, kb remove or kb merge, directly "
                               "or through others)")
    kb_merge.add_argument("--release", required=True, help="the release they were derived from")
    kb_merge.add_argument("--name", default=None, help="name of the new release (default: RELEASE-merge-<hash>)")
    kb_merge.add_argument("--dry-run", action="store_true", help="say what each would add and remove; publish nothing")
    kb_merge.add_argument("--exist-ok", action="store_true", help=EXIST_OK_HELP)
    kb_merge.add_argument("--wait", type=non_negative_float, default=0.0, metavar="SECONDS",
                          help="wait up to this long for the object store to answer and the DERIVED releases to be "
                               "published, as a merge started beside the encoding Job does (default: 0, they must "
                               "exist)")
    add_s3_arguments(kb_merge, local_stack=True)

    release = sub.add_parser("release", help="the releases in the bucket: list them, show one, delete one, "
                                             "remove memories none lists")
    release_sub = release.add_subparsers(dest="release_command", required=True)
    release_list = release_sub.add_parser("list", help="published releases, oldest first, and unpublished leftovers")
    release_list.add_argument("--json", action="store_true", help="one JSON object per line")
    add_s3_arguments(release_list, local_stack=True)
    release_show = release_sub.add_parser(
        "show", help="one release: what it derives from, its memories, index and model conventions, its files")
    release_show.add_argument("name", help="the release to show")
    release_show.add_argument("--json", action="store_true", help="its manifest, with its ancestry, as JSON")
    add_s3_arguments(release_show, local_stack=True)
    release_delete = release_sub.add_parser(
        "delete", help="delete a release and the memories no other release lists (its manifest first)")
    release_delete.add_argument("name", help="the release to delete")
    release_delete.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    add_s3_arguments(release_delete, local_stack=True)
    release_gc = release_sub.add_parser(
        "gc", help="remove the memories no published release lists (left by failed or cancelled publications), "
                   "and the shards kept for index files and reference tables no published release has")
    release_gc.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    release_gc.add_argument("--shard-counts", type=shard_counts, default=None, metavar="N[,M…]|none",
                            help="the N of every --index-shard I/N the text services serve: the shards of other "
                                 "counts kept for published releases go too (none: no text service is sharded); "
                                 "without it every count stays, as the bucket cannot tell which are served")
    add_s3_arguments(release_gc, local_stack=True)
    release_shards = release_sub.add_parser(
        "shard-index", help="cut the N shards of a release's index and reference table and keep them in the "
                            "bucket, so that each text service started with --index-shard I/N downloads its "
                            "shard alone")
    release_shards.add_argument("name", help="the release whose index to shard")
    release_shards.add_argument("--shards", type=bounded_int(2, INT32_MAX, SHARDS_NOTE), required=True, metavar="N",
                                help="the number of shards the text services serve (2 or more)")
    release_shards.add_argument("--wait", type=non_negative_float, default=0.0, metavar="SECONDS",
                                help="wait this long for the release to be published (a Job started beside the "
                                     "one that publishes it)")
    add_s3_arguments(release_shards, local_stack=True)

    bench = sub.add_parser("bench", help="benchmarks (write JSON; optionally refresh the README table)")
    bench_sub = bench.add_subparsers(dest="bench_kind", required=True)
    dec = bench_sub.add_parser("decode", help="decode speed: no memory vs explicit memory vs RAG")
    dec.add_argument("--preset", type=preset, default="small")
    dec.add_argument("--batch", type=positive_int, default=8)
    dec.add_argument("--prompt-tokens", type=positive_int, default=128)
    dec.add_argument("--new-tokens", type=positive_int, default=128)
    dec.add_argument("--repeats", type=positive_int, default=21,
                     help="timed rounds, each running every variant once in rotating order; medians reported")
    dec.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    dec.add_argument("--json", type=Path, required=True)
    dec.add_argument("--readme", type=Path, default=None, help="README whose benchmark table to refresh")
    sto = bench_sub.add_parser("storage", help="bytes per memory and reconstruction error for each codec")
    sto.add_argument("--preset", type=preset, default="small",
                     help="model whose encoded K/V measure reconstruction error")
    sto.add_argument("--checkpoint", type=Path, default=None, help="use these weights instead of a random init")
    sto.add_argument("--references", type=positive_int, default=2048,
                     help="references encoded to train and test the codecs")
    sto.add_argument("--vq-rq-bits", type=int, default=14, help="bits per residual level (paper: 14)")
    sto.add_argument("--vq-pq-bits", type=int, default=10, help="bits per product-quantizer sub-space (paper: 10)")
    sto.add_argument("--vq-niter", type=positive_int, default=10, help="k-means iterations when training the VQ codec")
    sto.add_argument("--json", type=Path, required=True)
    sto.add_argument("--readme", type=Path, default=None)
    idx = bench_sub.add_parser("index", help="how often each kind of vector index (flat, HNSW, IVF-PQ) finds a "
                                             "question's own reference, its size and its query time")
    idx.add_argument("--references", type=positive_int, default=60_000, help="references embedded and indexed")
    idx.add_argument("--questions", type=positive_int, default=1000)
    idx.add_argument("--shards", type=positive_int, default=4, help="index shards each kind is also searched in")
    idx.add_argument("--json", type=Path, required=True)
    idx.add_argument("--readme", type=Path, default=None)
    tab = bench_sub.add_parser("tables", help="what the memory service and release delete/gc hold of a release's "
                                              "reference table, read from memory_ids.npy against the table")
    tab.add_argument("--references", type=positive_int, default=1_000_000, help="references of the synthetic release")
    tab.add_argument("--json", type=Path, required=True)
    qual = bench_sub.add_parser("quality", help="exact match on knowledge-base-only facts: none / memory / RAG")
    qual.add_argument("--release", required=True)
    qual.add_argument("--questions", type=positive_int, default=300)
    qual.add_argument("--device", type=device_name, default="auto",
                      help="where the model answers and is scored: auto (the default) is CUDA where this machine has "
                           "it, else the CPU; retrieval stays on the CPU")
    qual.add_argument("--json", type=Path, required=True)
    qual.add_argument("--readme", type=Path, default=None)
    add_s3_arguments(qual, local_stack=True)
    srv = bench_sub.add_parser("serving", help="the whole stack as processes: fetch, retrieval, TTFT/ITL, "
                                               "retrieval on/off throughput")
    srv.add_argument("--preset", type=preset, default="small",
                     help="model preset of the random-weights release")
    srv.add_argument("--concurrency", type=counts, default=(1, 8, 32), help="comma-separated stream counts")
    srv.add_argument("--prompt-tokens", type=positive_int, default=128)
    srv.add_argument("--new-tokens", type=positive_int, default=128)
    srv.add_argument("--rounds", type=positive_int, default=15,
                     help="interleaved rounds of retrieval on vs off (a shared machine drifts: the median of 15)")
    srv.add_argument("--samples", type=positive_int, default=30, help="fetch and retrieval samples")
    srv.add_argument("--shared-cores", action="store_true",
                     help="let all services share all cores (default: the decoder gets half of them, as its own node)")
    srv.add_argument("--json", type=Path, required=True)
    srv.add_argument("--readme", type=Path, default=None)
    pre = bench_sub.add_parser("prefill", help="a long prompt arriving at a busy decoder: the running streams' "
                                               "longest pause and its time to first token, by --prefill-tokens")
    pre.add_argument("--preset", type=preset, default="small", help="model preset (random weights)")
    pre.add_argument("--rows", type=int, default=4, help="decoder batch rows; all but one decode steadily")
    pre.add_argument("--long-tokens", type=positive_int, default=3072, help="the long prompt's tokens")
    pre.add_argument("--arms", type=counts, default=(2048, 1024, 256),
                     help="comma-separated --prefill-tokens values to compare with reading the prompt in one pass")
    pre.add_argument("--rounds", type=positive_int, default=7, help="rounds, every arm once in each")
    pre.add_argument("--json", type=Path, required=True)
    pre.add_argument("--readme", type=Path, default=None, help="README whose benchmark table to refresh")
    smp = bench_sub.add_parser("sampling", help="what penalties, a logit bias and logprobs cost a decode step, "
                                                "against plain greedy sampling")
    smp.add_argument("--preset", type=preset, default="small", help="model preset (random weights)")
    smp.add_argument("--rows", type=positive_int, default=8,
                     help="streams decoding together, all with the arm's options")
    smp.add_argument("--new-tokens", type=positive_int, default=128, help="tokens each stream decodes")
    smp.add_argument("--rounds", type=positive_int, default=7, help="rounds, every arm once in each")
    smp.add_argument("--prompt-tokens", type=positive_int, default=768,
                     help="the prompt read alone, plainly and scored, in each round")
    smp.add_argument("--json", type=Path, required=True)
    smp.add_argument("--readme", type=Path, default=None, help="README whose benchmark table to refresh")
    rel = bench_sub.add_parser("reliability", help="load, 2x overload and injected faults (Redis, S3, slow S3, "
                                                   "corrupt blob, text down, bad input, SIGTERM) on a private stack")
    rel.add_argument("--preset", type=preset, default="tiny",
                     help="model preset of the random-weights release")
    rel.add_argument("--max-batch", type=int, default=4, help="decoder batch rows")
    rel.add_argument("--max-waiting", type=int, default=4, help="decoder queue; capacity = batch rows + queue")
    rel.add_argument("--seconds", type=finite_float, default=5.0, help="length of each load run (at most 60)")
    rel.add_argument("--new-tokens", type=positive_int, default=24)
    rel.add_argument("--fuzz", type=int, default=300, help="bad requests sent over every RPC (at most 5000)")
    rel.add_argument("--json", type=Path, required=True)
    gpu = bench_sub.add_parser("gpu", help="GPU decode speed: static CUDA-graph decoder vs HF transformers, "
                                           "against the HBM roofline, with a correctness check")
    add_gpu_bench_arguments(gpu, json_required=True)
    return parser


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gRPC server (token: MEMORY3_AUTH_TOKEN)")
    group.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="one line per event; json for log collectors (request ids included either way)")
    group.add_argument("--metrics-port", type=port_number(free=True), default=None,
                       help="serve Prometheus /metrics on this port (0: any free port; default: none)")
    group.add_argument("--tls-cert", type=Path, default=None, help="PEM server certificate (with --tls-key: TLS)")
    group.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", type=Path, default=None,
                       help="PEM CA that must have signed client certificates (mTLS)")
    group.add_argument("--health-port", type=port_number(free=True), default=None,
                       help="also serve grpc.health.v1.Health alone, in plaintext, on this port, for probes that "
                            "cannot speak TLS (0: any free port; default: none)")
    group.add_argument("--max-connection-age", type=non_negative_float, default=None,
                       help="seconds after which a client connection is asked to reconnect (its calls in flight "
                            "finish), so that the replicas behind a Service share its calls (default 60; 0: never)")


def server_options(args: argparse.Namespace):
    """The only place the server's token is read from the environment (never a flag: it would be logged)."""
    from memory3.services.rpc.server import ServerOptions

    port = args.port if args.port is not None else SERVE_PORTS[args.service]
    return ServerOptions(host=args.host or "127.0.0.1", port=port, grace_s=args.grace, metrics_port=args.metrics_port,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                         auth_token=os.environ.get("MEMORY3_AUTH_TOKEN") or None, health_port=args.health_port,
                         max_connection_age_s=(ServerOptions.max_connection_age_s if args.max_connection_age is None
                                               else args.max_connection_age or None))


def listen_options(args: argparse.Namespace):
    """`server_options` for a service about to start, once its ports are known to be free."""
    options = server_options(args)
    check_ports_free(options.host, {"--port": options.port, "--health-port": options.health_port})
    return options


def check_ports_free(host: str, ports: dict[str, int | None], *, any_free: bool = True) -> None:
    """Before a model or index is loaded: on a port another server listens on, a gRPC server starts
    all the same (it binds with SO_REUSEPORT) and gets a share of that server's connections.
    `any_free`: the options take 0 for any free port, which the hint then offers (KServe's do not)."""
    from memory3.services.storage.local_s3 import port_taken

    for option, port in ports.items():
        if port and port_taken(host, port):
            raise ValueError(f"{option} {port}: another server listens on {host}:{port}; stop it, or pass "
                             f"{option} with another port" + (" (0: any free port)" if any_free else ""))


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text service")
    group.add_argument("--max-overlap", type=finite_float, default=2 / 3,
                       help="drop retrieved references whose LCS overlap with the query exceeds this "
                            "(paper: 2/3; 1 disables the filter)")
    group.add_argument("--max-concurrency", type=int, default=1,
                       help="retrieval batches embedded at once (each uses torch's threads)")
    group.add_argument("--embedder-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                       help="dtype the query embedder computes in; auto: bfloat16 on a CPU with native bf16 "
                            "(AVX-512 BF16, AMX), else float32")
    group.add_argument("--index-shard", default=None, metavar="I/N",
                       help="serve shard I of N of the release's index (the references whose row is I modulo N), "
                            "so that N services share an index too large or too slow for one; the decoder "
                            "takes all N addresses in --text-address and merges their answers")


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory service (also --release, --cache-dir and the object store)")
    group.add_argument("--redis-url", default=None,
                       help="Redis hot tier (env MEMORY3_REDIS_URL; a password apart from it, not URL-escaped: "
                            "env MEMORY3_REDIS_PASSWORD; none: no Redis tier): one server, "
                            "redis://host:6379/0; Sentinel, redis+sentinel://host:26379,host2:26379/mymaster/0; "
                            "a Cluster, redis+cluster://host:6379,host2:6379 (rediss… for TLS)")
    group.add_argument("--redis-ttl", type=int, default=86400, help="seconds a memory stays in Redis (0: no expiry)")
    group.add_argument("--redis-timeout", type=finite_float, default=0.2,
                       help="seconds each Redis call may take (connect, send, reply; 0.05 to 60) before the tier "
                            "is marked down and memories come from S3; a call carries up to 4 MiB of memories")
    group.add_argument("--ram-cache-mb", type=finite_float, default=256.0,
                       help="in-process LRU of memories, in MiB (0 disables it)")
    group.add_argument("--s3-workers", type=int, default=16, help="concurrent object-store reads per process")


def _serve_memory(args: argparse.Namespace) -> int:
    """The only place the Redis URL and password (secrets) are read from the environment."""
    from memory3.services.memory.server import MemorySettings, serve_memory

    if not args.release:
        raise ValueError("serve memory needs --release NAME: the release whose memory bank to serve")
    from memory3.services.memory.redis_url import PASSWORD_ENV, parse_redis_url

    redis_url = args.redis_url if args.redis_url is not None else os.environ.get("MEMORY3_REDIS_URL")
    redis_password = os.environ.get(PASSWORD_ENV) or None
    if redis_url:
        parse_redis_url(redis_url)  # a URL it cannot use fails here, before the release is opened
    settings = MemorySettings(release=args.release, s3=s3_config(args), cache_dir=args.cache_dir,
                              redis_url=redis_url or None, redis_password=redis_password, redis_ttl_s=args.redis_ttl,
                              redis_timeout_s=args.redis_timeout,
                              ram_cache_bytes=int(args.ram_cache_mb * (1 << 20)), s3_workers=args.s3_workers)
    return serve_memory(settings, listen_options(args))


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoder (dependency token: MEMORY3_DEPENDENCY_TOKEN)")
    group.add_argument("--text-address", default=None,
                       help="host:port of the text service (with --memory-address; neither: retrieve in-process); "
                            "for an index served in shards (serve text --index-shard I/N), every shard's "
                            "host:port, comma-separated")
    group.add_argument("--memory-address", default=None, help="host:port of the memory service")
    group.add_argument("--max-batch", type=positive_int, default=8, help="streams decoded together")
    group.add_argument("--max-waiting", type=bounded_int(0, INT32_MAX), default=32,
                       help="streams queued beyond --max-batch; more get RESOURCE_EXHAUSTED")
    group.add_argument("--max-streams-per-client", type=bounded_int(0, INT32_MAX, " (0: no limit)"), default=0,
                       help="streams one client may have open at once, by its x-client-id metadata or else its "
                            "address; more get RESOURCE_EXHAUSTED (0: no limit)")
    group.add_argument("--max-seq-len", type=int, default=None, help="context per stream (default: the model's)")
    group.add_argument("--default-max-tokens", type=int, default=128,
                       help="when a request sets no max_tokens (fewer when a long prompt leaves less room)")
    group.add_argument("--retrieval-policy", choices=["fail", "continue"], default="fail",
                       help="text/memory service down, or a memory that fails validation: fail (UNAVAILABLE, "
                            "DATA_LOSS), or generate without memory and say so")
    group.add_argument("--stall-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                       help="a model pass running this long means a stuck device: the decoder reports itself not "
                            "live (grpc.health.v1 name 'liveness'), to be restarted; above the longest prefill")
    group.add_argument("--memory-cache-mb", type=finite_float, default=256.0,
                       help="decoded memories kept in the decoder's RAM (LRU) in front of the memory service; "
                            "0 disables it")
    group.add_argument("--prefill-tokens", type=bounded_int(0, INT32_MAX, " (0: every prompt in one pass)"),
                       default=2048,
                       help="most prompt-token rows one scheduler step reads, padding included, split evenly "
                            "among the prompts being read (whole 64-token chunks): a longer prompt is read over "
                            "several steps, with a decode step of the running streams between each (0: every "
                            "prompt in one pass)")
    group.add_argument("--retrieval-lead-tokens", type=bounded_int(0, INT32_MAX), default=None,
                       help="a generated chunk's query ends this many tokens before the chunk, so that retrieval "
                            "overlaps that many decode steps (default 8; 0: the query is exactly the previous "
                            "chunk; at most the model's chunk length less 2: 62 for every preset)")
    group.add_argument("--device", type=device_name, default=None,
                       help="cpu or cuda[:N] (default cpu); for serve trainer, where its jobs train and encode "
                            "memories (default auto: CUDA where this machine has it)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="of the model's weights and computation (default float32, also with --device cuda, "
                            "where bfloat16 takes half the memory; the chart passes bfloat16 on a GPU)")
    group.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="pad decode passes to a few batch and context sizes and replay each from a CUDA graph "
                            "captured at start (default: on with --device cuda; needs it)")
    group.add_argument("--dependency-tls-ca", type=Path, default=None,
                       help="PEM CA of the text and memory services' certificates (TLS to them)")
    group.add_argument("--dependency-cert", type=Path, default=None, help="client certificate for mTLS")
    group.add_argument("--dependency-key", type=Path, default=None, help="key of --dependency-cert")


def _serve_decoder(args: argparse.Namespace) -> int:
    from memory3.services.decoder.server import serve_decoder

    return serve_decoder(_decoder_settings(args), listen_options(args))


def add_kserve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kserve (also the decoder options; KServe binds all interfaces, not --host)")
    group.add_argument("--http-port", type=port_number(), default=8080,
                       help="v2 REST, /v1/completions, health and /metrics")
    group.add_argument("--grpc-port", type=port_number(), default=8081, help="v2 (Open Inference Protocol) gRPC")
    group.add_argument("--model-name", default="memory3", help="the model name in v2 routes and OpenAI requests")
    group.add_argument("--chat-template", default=None, metavar="qa|FILE",
                       help="how /v1/chat/completions turns messages into a prompt: qa (Question:/Answer: lines, "
                            "the format `memory3 train` teaches) or a Jinja2 chat template file in Hugging Face's "
                            "form; without it the chat route answers 400")


def _serve_kserve(args: argparse.Namespace) -> int:
    if os.environ.get("MEMORY3_AUTH_TOKEN"):
        raise ValueError("serve kserve does not check MEMORY3_AUTH_TOKEN (authenticate at the ingress); unset it")
    if args.tls_cert or args.tls_client_ca or args.metrics_port is not None or args.health_port is not None:
        raise ValueError("serve kserve takes no --tls-*/--metrics-port/--health-port: TLS is the ingress's job, and "
                         "metrics and health are on --http-port (/metrics, /v2/health/*)")
    if args.port is not None:
        raise ValueError("serve kserve takes no --port: it listens on --http-port (v2 REST, /v1/completions, "
                         "health, /metrics) and --grpc-port (v2 gRPC)")
    if args.host is not None:
        raise ValueError("serve kserve takes no --host: KServe binds all interfaces (0.0.0.0 and [::]), which "
                         "cannot be changed; restrict access with a firewall or network policy")
    if args.max_connection_age is not None:
        raise ValueError("serve kserve takes no --max-connection-age: its servers are KServe's, which keep a "
                         "connection as long as its client does")
    settings = _decoder_settings(args)
    chat_template = None
    if args.chat_template is not None:
        from memory3.services.decoder.chat import load_chat_template
        chat_template = load_chat_template(args.chat_template)
    check_ports_free("0.0.0.0", {"--http-port": args.http_port, "--grpc-port": args.grpc_port}, any_free=False)
    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses sys.argv when imported; ours are parsed already
    try:
        from memory3.services.decoder.kserve_model import serve_kserve
    finally:
        sys.argv = argv
    return serve_kserve(settings, model_name=args.model_name, http_port=args.http_port, grpc_port=args.grpc_port,
                        grace_s=args.grace, chat_template=chat_template)


def _decoder_settings(args: argparse.Namespace):
    """The only place the decoder's outgoing token is read from the environment."""
    from memory3.services.decoder.engine import EngineConfig
    from memory3.services.decoder.server import DecoderSettings, DependencyOptions

    if not args.release:
        raise ValueError(f"serve {args.service} needs --release NAME: the release whose model to serve")
    lead = {} if args.retrieval_lead_tokens is None else {"retrieval_lead_tokens": args.retrieval_lead_tokens}
    device = args.device or "cpu"
    if device == "auto":
        raise ValueError(f"serve {args.service} --device auto: give cpu or cuda[:N] (auto is for the trainer)")
    if args.cuda_graphs and not device.startswith("cuda"):
        raise ValueError(f"--cuda-graphs needs --device cuda (got --device {device})")
    engine = EngineConfig(max_batch=args.max_batch, max_waiting=args.max_waiting, max_seq_len=args.max_seq_len,
                          default_max_tokens=args.default_max_tokens, retrieval_policy=args.retrieval_policy,
                          max_streams_per_client=args.max_streams_per_client, stall_s=args.stall_timeout,
                          prefill_tokens=args.prefill_tokens, cuda_graphs=args.cuda_graphs, **lead)
    token = os.environ.get("MEMORY3_DEPENDENCY_TOKEN") or None
    if token and args.dependency_tls_ca is None:  # before the weights load, not once they have
        raise ValueError("MEMORY3_DEPENDENCY_TOKEN is only sent over TLS: add --dependency-tls-ca (the PEM CA of "
                         "the text and memory services' certificates), or unset it")
    dependencies = DependencyOptions(tls_ca=args.dependency_tls_ca, client_cert=args.dependency_cert,
                                     client_key=args.dependency_key, auth_token=token)
    return DecoderSettings(release=args.release, s3=s3_config(args), cache_dir=args.cache_dir,
                           text_address=args.text_address, memory_address=args.memory_address, engine=engine,
                           device=device, dtype=args.dtype, dependencies=dependencies,
                           memory_cache_bytes=int(args.memory_cache_mb * (1 << 20)))


def add_s3_arguments(parser: argparse.ArgumentParser, *, local_stack: bool = False) -> None:
    group = parser.add_argument_group("object store (credentials: MEMORY3_S3_ACCESS_KEY / MEMORY3_S3_SECRET_KEY)")
    group.add_argument("--s3-endpoint", default=None, help="host:port of the S3 server (env MEMORY3_S3_ENDPOINT)"
                       + ("; without it, the store of the stack that `memory3 up` runs here" if local_stack else ""))
    if local_stack:
        group.add_argument("--home", type=Path, default=DEFAULT_HOME, help="the local stack's state (`memory3 up`)")
    group.add_argument("--s3-bucket", default=None, help="bucket (env MEMORY3_S3_BUCKET, default memory3)")
    group.add_argument("--s3-secure", action="store_true", help="use HTTPS")
    group.add_argument("--s3-region", default=None,
                       help="the bucket's region, which requests are signed for (env MEMORY3_S3_REGION, default "
                            "us-east-1; AWS refuses another region's signature)")
    group.add_argument("--s3-ca-bundle", type=Path, default=None, metavar="PEM",
                       help="CA certificates to trust for the S3 server's HTTPS certificate, in place of the "
                            "system's (a private CA; env MEMORY3_S3_CA_BUNDLE; needs --s3-secure)")
    group.add_argument("--cache-dir", type=Path, default=None,
                       help="local copies of releases (default: " + ("HOME/releases, HOME as --home)" if local_stack
                                                                    else f"{DEFAULT_HOME / 'releases'})"))


def s3_config(args: argparse.Namespace, *, local_stack: bool = False):
    """The only place the object store's settings are read from the environment.

    local_stack: with no endpoint given, use the object store of the stack that `memory3 up`
    started on this machine, if one runs (a user's commands; a service's settings stay explicit).
    """
    from memory3.services.storage.object_store import S3Config

    endpoint = args.s3_endpoint or os.environ.get("MEMORY3_S3_ENDPOINT")
    bucket = args.s3_bucket or os.environ.get("MEMORY3_S3_BUCKET")
    if not endpoint and local_stack:
        config = _local_stack_store(args.home)
        if config is not None:
            if bucket:
                config = dataclasses.replace(config, bucket=bucket)
            print(f"object store: the local stack's, at {config.endpoint} (bucket {config.bucket!r})", file=sys.stderr)
            return config
    if not endpoint:
        raise ValueError("no object store: pass --s3-endpoint HOST:PORT or set MEMORY3_S3_ENDPOINT"
                         + (f", or start the local stack with `memory3 up{home_option(args.home)}`" if local_stack
                            else ""))
    access = os.environ.get("MEMORY3_S3_ACCESS_KEY")
    if not access:
        raise ValueError("set MEMORY3_S3_ACCESS_KEY and MEMORY3_S3_SECRET_KEY for the object store")
    region = args.s3_region or os.environ.get("MEMORY3_S3_REGION") or "us-east-1"
    ca_bundle = args.s3_ca_bundle or (Path(os.environ["MEMORY3_S3_CA_BUNDLE"])
                                      if os.environ.get("MEMORY3_S3_CA_BUNDLE") else None)
    if ca_bundle is not None:
        if not args.s3_secure:
            raise ValueError("--s3-ca-bundle (MEMORY3_S3_CA_BUNDLE) is for HTTPS: add --s3-secure")
        if not ca_bundle.is_file():
            raise ValueError(f"--s3-ca-bundle {ca_bundle}: no such file; give the PEM file of the CA certificates "
                             "to trust")
    secret = os.environ.get("MEMORY3_S3_SECRET_KEY")
    if not secret:  # the store would refuse every request's signature, and say only that
        raise ValueError("MEMORY3_S3_ACCESS_KEY is set but MEMORY3_S3_SECRET_KEY is not: set the secret key that "
                         "goes with the access key")
    return S3Config(endpoint=endpoint, access_key=access, secret_key=secret, bucket=bucket or "memory3",
                    secure=args.s3_secure, region=region, ca_bundle=ca_bundle)


def _local_stack_store(home: Path):
    """The object store of the stack `memory3 up` started in `home`, when its S3 server runs (the
    release commands need nothing else of it); None when no stack was started there."""
    from memory3.services.stack import down_message, read_state

    state = read_state(home)
    if state is None:
        return None
    if state.not_running(("s3",)):
        raise ValueError(f"no object store: {down_message(state, home_option(home))}; or pass --s3-endpoint "
                         "HOST:PORT")
    return state.s3_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if hasattr(args, "cache_dir") and args.cache_dir is None:  # beside the stack's state, as `--home` says
        args.cache_dir = getattr(args, "home", DEFAULT_HOME) / "releases"
    return args


# Commands whose work a SIGTERM (a Job's pod stopped) or a SIGHUP must unwind as Ctrl-C does: what they publish
# is removed when unfinished, and the lease a removal holds (which every publication waits for) goes.
# `up` does the same while it starts (`cmd_up`), and not once it has.
SIGTERM_UNWINDS = frozenset({"kb", "train", "release"})
# What an interrupted command leaves, said in its last line: by "command subcommand", else by command.
INTERRUPTED = {"kb": "any release it had not finished publishing is removed; run it again",
               "train": "run it again with the same --work-dir: it resumes from its last checkpoint",
               "release delete": "what it had not removed yet is still in the bucket: run it again if "
                                 "`memory3 release list` still shows the release, then `memory3 release gc` for "
                                 "the memories it had not reached",
               "release gc": "the memories it had not removed yet are still in the bucket: run it again",
               "up": "what it had started is stopped", "demo": "what it had started is stopped"}


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user's mistake (a bad value, a file that cannot be read or written, a
    store that does not answer) ends in one line and exit 2; Ctrl-C or SIGTERM in one line and
    128 + the signal; anything else is a bug, and its traceback is kept."""
    args = parse_args(argv)
    try:
        if args.command in SIGTERM_UNWINDS:
            from .stack_commands import interrupt_on_sigterm
            with interrupt_on_sigterm():
                return _run(args)
        return _run(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"memory3 {args.command}: error: {_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)  # a SIGTERM or SIGHUP comes as stack_commands.Terminated
        said = getattr(e, "left", None) or _interrupted(args)
        print(f"memory3 {args.command}: interrupted ({signal.Signals(signum).name})" + (f"; {said}" if said else ""),
              file=sys.stderr)
        return 128 + signum


def _interrupted(args: argparse.Namespace) -> str | None:
    """What the interrupted command leaves (INTERRUPTED), or None where it leaves nothing to say."""
    sub = getattr(args, f"{args.command}_command", None)
    return INTERRUPTED.get(f"{args.command} {sub}") or INTERRUPTED.get(args.command)


def _selection(ids: list[str], matches: list[str], path: Path | None) -> tuple[list[str], list[str]]:
    """The references chosen on the command line, and those of a --from file."""
    if path is None:
        return ids, matches
    from memory3.services.trainer.corpus import read_selection_file

    more_ids, more_matches = read_selection_file(path)
    return [*ids, *more_ids], [*matches, *more_matches]


def _error_text(e: Exception) -> str:
    """An OSError from the system names its file after its reason, not as "[Errno 21] ...: 'x'"."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 is not None else "")
    return str(e)


def _run(args: argparse.Namespace) -> int:
    if args.command == "bench":
        return _bench(args)
    if args.command == "init":
        from .commands import cmd_init
        return cmd_init(args.preset, args.out, args.seed)
    if args.command == "generate":
        return _generate(args)
    if args.command in ("up", "down", "status", "demo"):
        from . import stack_commands as stack
        if args.command == "down":
            return stack.cmd_down(args.home)
        if args.command == "status":
            return stack.cmd_status(args.home, home_option(args.home))
        if args.command == "demo":
            return stack.cmd_demo_stack(args.home, release=args.release, quick=args.quick,
                                        home_option=home_option(args.home))
        stack.cmd_up(args.home, release=args.release, quick=args.quick, redis=not args.no_redis,
                     retrieval_policy=args.retrieval_policy, max_batch=args.max_batch,
                     decoder_port=args.decoder_port, text_shards=args.text_shards,
                     home_option=home_option(args.home))
        return 0
    if args.command == "train":
        from .commands import cmd_train
        work_dir = args.work_dir or args.home / "runs" / args.release
        return cmd_train(s3_config(args, local_stack=True), preset=args.preset, quick=args.quick,
                         release=args.release, work_dir=work_dir, seed=args.seed, codec=args.codec, bf16=args.bf16,
                         stage3_steps=args.stage3_steps, attention_weight=args.attention_weight,
                         events=args.events, exist_ok=args.exist_ok, index_kind=args.index_kind,
                         device=args.device)
    if args.command == "serve":
        from memory3.services.rpc.logs import configure_logging
        configure_logging(args.log_format)
        if args.release and args.wait_for_release > 0:
            _wait_for_release(s3_config(args), args.release, args.wait_for_release)
        if args.service == "text":
            return _serve_text(args)
        if args.service == "memory":
            return _serve_memory(args)
        if args.service == "decoder":
            return _serve_decoder(args)
        if args.service == "kserve":
            return _serve_kserve(args)
        from memory3.services.trainer.placement import training_placement
        from memory3.services.trainer.server import serve_trainer
        if args.device is not None:
            training_placement(args.device)  # one it cannot have fails here, not in every job it runs
        return serve_trainer(s3_config(args), args.work_dir, listen_options(args), device=args.device)
    if args.command == "release":
        from .commands import (
            cmd_release_delete,
            cmd_release_gc,
            cmd_release_list,
            cmd_release_shard_index,
            cmd_release_show,
        )
        if args.release_command == "list":
            return cmd_release_list(s3_config(args, local_stack=True), as_json=args.json)
        if args.release_command == "show":
            return cmd_release_show(s3_config(args, local_stack=True), args.name, as_json=args.json)
        if args.release_command == "gc":
            return cmd_release_gc(s3_config(args, local_stack=True), dry_run=args.dry_run,
                                  served_shard_counts=args.shard_counts)
        if args.release_command == "shard-index":
            return cmd_release_shard_index(s3_config(args, local_stack=True), args.name, shards=args.shards,
                                           cache_dir=args.cache_dir, wait_s=args.wait)
        return cmd_release_delete(s3_config(args, local_stack=True), args.name, dry_run=args.dry_run,
                                  cache_dir=args.cache_dir, home=args.home, home_option=home_option(args.home))
    if args.command == "kb":
        from .commands import cmd_kb_add, cmd_kb_merge, cmd_kb_remove
        if args.kb_command == "merge":
            return cmd_kb_merge(s3_config(args, local_stack=True), parent=args.release, derived=args.derived,
                                name=args.name, cache_dir=args.cache_dir, dry_run=args.dry_run,
                                wait_s=args.wait, exist_ok=args.exist_ok)
        if args.kb_command == "remove":
            ids, matches = _selection(args.ids, args.matches, args.select_from)
            return cmd_kb_remove(s3_config(args, local_stack=True), parent=args.release, ids=ids,
                                 matches=matches, name=args.name, cache_dir=args.cache_dir,
                                 dry_run=args.dry_run)
        remove_ids, remove_matches = _selection(args.remove_ids, args.remove_matches, args.remove_from)
        return cmd_kb_add(s3_config(args, local_stack=True), args.files, parent=args.release, name=args.name,
                          cache_dir=args.cache_dir, exist_ok=args.exist_ok, remove_ids=remove_ids,
                          remove_matches=remove_matches, events=args.events, index_kind=args.index_kind,
                          device=args.device)
    return 1


def _check_writable(path: Path) -> None:
    """Before a benchmark runs for minutes, that its --json can be written at the end (the GPU
    bench's may name a directory, checked where it is written)."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    with open(path, "ab"):
        pass
    if not existed:
        path.unlink()


def _bench(args: argparse.Namespace) -> int:
    _check_writable(args.json)
    if args.bench_kind == "gpu":  # its JSON may go to a directory, kept as measured, its status says if correct
        from memory3.bench.gpu import run_from_args
        return run_from_args(args)
    if args.bench_kind == "decode":
        from memory3.bench.decode import run_decode_bench
        result = run_decode_bench(preset=args.preset, batch=args.batch, prompt_tokens=args.prompt_tokens,
                                  new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
    elif args.bench_kind == "index":
        from memory3.bench.index import run_index_bench
        result = run_index_bench(references=args.references, questions=args.questions, shards=args.shards)
    elif args.bench_kind == "tables":
        from memory3.bench.tables import run_tables_bench
        result = run_tables_bench(references=args.references, log=lambda msg: print(msg, file=sys.stderr))
    elif args.bench_kind == "quality":
        from memory3.bench.quality import run_quality_bench
        from memory3.services.trainer.placement import make_current, training_placement
        placement = training_placement(args.device)
        make_current(placement)
        result = run_quality_bench(s3_config(args, local_stack=True), args.release, cache_dir=args.cache_dir,
                                   n_questions=args.questions, plot=args.json.with_suffix(".png"),
                                   device=placement.device)
    elif args.bench_kind == "reliability":
        from memory3.bench.reliability import run_reliability_bench
        if not (0 < args.seconds <= 60 and 0 <= args.fuzz <= 5000 and args.max_batch >= 1 and args.max_waiting >= 0):
            raise ValueError("bench reliability: --seconds in (0, 60], --fuzz in [0, 5000], --max-batch >= 1, "
                             "--max-waiting >= 0")
        result = run_reliability_bench(preset=args.preset, max_batch=args.max_batch, max_waiting=args.max_waiting,
                                       seconds=args.seconds, new_tokens=args.new_tokens, fuzz=args.fuzz,
                                       log=lambda msg: print(msg, file=sys.stderr))
    elif args.bench_kind == "prefill":
        from memory3.bench.prefill import run_prefill_bench
        if args.rows < 2:
            raise ValueError("bench prefill: --rows must be >= 2 (one row for the long prompt, the others decode)")
        result = run_prefill_bench(preset=args.preset, rows=args.rows, long_tokens=args.long_tokens,
                                   arms=list(args.arms), rounds=args.rounds,
                                   log=lambda msg: print(msg, file=sys.stderr))
    elif args.bench_kind == "sampling":
        from memory3.bench.sampling import run_sampling_bench
        result = run_sampling_bench(preset=args.preset, rows=args.rows, new_tokens=args.new_tokens,
                                    rounds=args.rounds, prompt_tokens=args.prompt_tokens,
                                    log=lambda msg: print(msg, file=sys.stderr))
    elif args.bench_kind == "serving":
        from memory3.bench.serving import run_serving_bench
        result = run_serving_bench(preset=args.preset, concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
                                   new_tokens=args.new_tokens, rounds=args.rounds, samples=args.samples,
                                   pin=not args.shared_cores, log=lambda msg: print(msg, file=sys.stderr))
    else:
        from memory3.bench.storage import run_storage_bench
        result = run_storage_bench(preset=args.preset, checkpoint=args.checkpoint, n_references=args.references,
                                   rq_bits=args.vq_rq_bits, pq_bits=args.vq_pq_bits, niter=args.vq_niter)
    from memory3.bench.report import update_readme, write_json
    write_json(result, args.json)
    print(json.dumps(result["summary"], indent=2))
    if getattr(args, "readme", None) is not None:  # reliability has no README table
        update_readme(args.readme, args.json.parent)
    return 0


def _wait_for_release(s3, release: str, timeout_s: float) -> None:
    """Until `release` is published (or the store answers), for up to `timeout_s`: a chart installs
    the services beside the Job that trains and publishes their release."""
    import logging

    from memory3.services.release.reader import wait_for_releases
    from memory3.services.storage.object_store import ObjectStore

    wait_for_releases(ObjectStore(s3), [release], timeout_s, poll_s=2.0, log=logging.getLogger("memory3.release").info)


def _serve_text(args: argparse.Namespace) -> int:
    from memory3.services.retrieval.embedder import native_bf16
    from memory3.services.retrieval.index import IndexShard
    from memory3.services.text.server import serve_text

    if not args.release:
        raise ValueError("serve text needs --release NAME: the release whose tokenizer and index to serve")
    dtype = args.embedder_dtype
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16() else "float32"
    return serve_text(s3_config(args), args.release, args.cache_dir, listen_options(args),
                      max_overlap=args.max_overlap, max_concurrency=args.max_concurrency, embedder_dtype=dtype,
                      shard=IndexShard.parse(args.index_shard) if args.index_shard else IndexShard(0, 1))


def _generate(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        from .commands import cmd_generate
        remote_only = [flag for flag, given in (("--address", args.address), ("--home", args.home),
                                                ("--stop", args.stop), ("--no-memory", args.no_memory),
                                                ("--timeout", args.timeout), ("--tls-ca", args.tls_ca)) if given]
        if remote_only:
            raise ValueError(f"{', '.join(remote_only)}: only for generating from the decoder, and --checkpoint "
                             "generates in-process: leave out --checkpoint or these options")
        references = list(args.reference)
        for file in args.reference_file:
            references.append(_read_text(file))
        return cmd_generate(args.checkpoint, args.prompt, references=references,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    if args.reference or args.reference_file:
        raise ValueError("--reference/--reference-file need --checkpoint; the decoder retrieves from its release")
    from .stack_commands import cmd_generate_remote, decoder_address
    if args.device != "cpu":
        raise ValueError("--device is for --checkpoint: the decoder runs where `serve decoder --device` put it")
    home = args.home or DEFAULT_HOME
    return cmd_generate_remote(decoder_address(home, args.address, home_option(home)), args.prompt,
                               max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, stop=args.stop, memory=not args.no_memory,
                               presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                               show_references=True, tls_ca=args.tls_ca,
                               timeout_s=GENERATE_TIMEOUT_S if args.timeout is None else args.timeout,
                               auth_token=os.environ.get("MEMORY3_AUTH_TOKEN") or None)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


if __name__ == "__main__":
    sys.exit(main())
