"""Implementations of the CLI subcommands; each takes plain values parsed by `main`."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from memory3.model.checkpoint import CONFIG_FILE, save_checkpoint
from memory3.model.config import Memory3Config
from memory3.model.generate import SamplingParams
from memory3.model.init import random_model
from memory3.model.tokenizer import byte_level_tokenizer

if TYPE_CHECKING:
    import torch

    from memory3.services.trainer.train import Distributed


def cmd_init(preset: str, out: Path, seed: int) -> int:
    config = Memory3Config.from_name(preset)
    tokenizer = byte_level_tokenizer()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"preset {preset!r} has vocab_size {config.vocab_size} < {tokenizer.get_vocab_size()}")
    if (out / CONFIG_FILE).exists():
        raise ValueError(f"{out} already holds a checkpoint; choose another --out")
    save_checkpoint(random_model(config, seed=seed), out, tokenizer)
    print(f"wrote a randomly initialised {preset!r} checkpoint to {out}")
    return 0


def cmd_generate(checkpoint: Path, prompt: str, *, references: list[str], max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, seed: int | None, device: str,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> int:
    from memory3.services.local import LocalGenerator

    generator = LocalGenerator(checkpoint, device=device)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    cited: list[int] = []
    finish = None
    for event in generator.stream(prompt, references=references, max_new_tokens=max_new_tokens, sampling=sampling):
        if event.citations:
            cited.extend(i for i in event.citations if i not in cited)
        sys.stdout.write(event.text)
        sys.stdout.flush()
        finish = event.finish_reason or finish
    sys.stdout.write("\n")
    print(f"[finish: {finish}; references used: {cited or 'none'}]", file=sys.stderr)
    return 0


def train_pipeline_config(*, preset: str | None, quick: bool, seed: int, bf16: bool | None = None,
                          stage3_steps: int | None = None, attention_weight: float | None = None,
                          device: torch.device | None = None):
    """The run `memory3 train` asks for. None for `preset` means small, or tiny for a quick run: a
    preset that is named is the one trained, so a command that says small trains small. None for
    `stage3_steps` or `attention_weight` means the training default; None for `bf16` means on where
    `device` (None: the CPU) computes bf16 natively."""
    import torch

    from memory3.model.config import default_preset
    from memory3.services.trainer.pipeline import PipelineConfig
    from memory3.services.trainer.placement import native_bf16_on
    from memory3.services.trainer.train import TrainConfig

    if stage3_steps is not None and stage3_steps < 0:
        raise ValueError(f"--stage3-steps {stage3_steps}: give a number of steps >= 0")
    if attention_weight is not None and not (math.isfinite(attention_weight) and attention_weight >= 0):
        raise ValueError(f"--attention-weight {attention_weight}: give a finite number >= 0")
    preset = preset or default_preset(quick)
    config = PipelineConfig.quick(preset, seed) if quick else \
        PipelineConfig(preset=preset, seed=seed, train=TrainConfig(seed=seed))
    native = native_bf16_on(torch.device("cpu") if device is None else device) if bf16 is None else bf16
    train = dataclasses.replace(config.train, bf16=native)
    if attention_weight is not None:
        train = dataclasses.replace(train, attention_weight=attention_weight)
    if stage3_steps is not None:
        train = dataclasses.replace(train, stage3=dataclasses.replace(train.stage3, steps=stage3_steps))
    return dataclasses.replace(config, train=train)


def cmd_train(s3, *, preset: str | None, quick: bool, release: str, work_dir: Path, seed: int, codec: str,
              bf16: bool | None = None, stage3_steps: int | None = None, attention_weight: float | None = None,
              events: bool = False, exist_ok: bool = False, index_kind: str = "auto", device: str = "auto") -> int:
    from memory3.services.release.manifest import check_release_name
    from memory3.services.release.reader import already_published
    from memory3.services.retrieval.index import check_index_choice
    from memory3.services.storage.object_store import ObjectStore
    from memory3.services.trainer.pipeline import run_pipeline
    from memory3.services.trainer.placement import training_placement
    from memory3.services.trainer.releases import differs_from_training, publish_trained

    check_release_name(release)
    check_index_choice(index_kind)
    world_size, local_rank = torchrun_ranks()
    placement = training_placement(device, world_size=world_size, local_rank=local_rank)
    config = train_pipeline_config(preset=preset, quick=quick, seed=seed, bf16=bf16, stage3_steps=stage3_steps,
                                   attention_weight=attention_weight, device=placement.device)
    store = ObjectStore(s3)
    store.ensure_bucket()  # fail before training, not after, when the store is unreachable
    if already_published(store, release, exist_ok=exist_ok,
                         differs=differs_from_training(config.to_dict(), codec, index_kind)):
        print(f"release {release} is already published from this training configuration: nothing to do")
        return 0
    dist = init_distributed(placement, world_size)
    emit = _json_lines if events and dist.is_main else None
    log = (lambda msg: _json_lines({"message": msg})) if emit else None
    # A rank that fails exits with its group: torchrun then stops the others, where a destroy could wait on
    # them while they wait in a collective.
    result = run_pipeline(config, work_dir, dist=dist, device=placement.device, progress=not events,
                          on_event=emit, log=log,
                          check_references=lambda refs: check_index_choice(index_kind, len(refs)))
    close_distributed(dist)
    if not dist.is_main:
        return 0
    manifest = publish_trained(result, store, release, codec=codec, pipeline_config=config.to_dict(),
                               progress=not events, index_kind=index_kind)
    summary = (f"release {manifest.name}: {manifest.memory_bank['count']} memories, "
               f"trained in {result.seconds:.0f}s; work dir {work_dir}")
    if emit:
        emit({"message": summary, "release": manifest.name})
    else:
        print(summary)
    return 0


def _json_lines(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def torchrun_ranks() -> tuple[int, int]:
    """(world size, local rank) from torchrun's environment (read here, at the entry point)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


# Rank 0 evaluates, writes checkpoints and, after the last step, the model alone, while the others wait
# in a collective: NCCL's default of 10 minutes would abort them while a large preset's checkpoint is written.
COLLECTIVE_TIMEOUT_S = 3600


def init_distributed(placement, world_size: int):
    """Data-parallel settings of this process: NCCL between GPUs, gloo between CPUs."""
    from memory3.services.trainer.placement import make_current
    from memory3.services.trainer.train import Distributed

    make_current(placement)
    if world_size == 1:
        return Distributed()
    import datetime

    import torch.distributed as dist

    bound = {"device_id": placement.device} if placement.device.type == "cuda" else {}  # NCCL starts now, not late
    dist.init_process_group(placement.backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), **bound)
    return Distributed(rank=dist.get_rank(), world_size=world_size)


def close_distributed(distributed: Distributed) -> None:
    """Training's last collective is behind: the group goes on every rank before rank 0 publishes for
    minutes (an NCCL group left to the interpreter's exit can hang it), and rank 0 takes back the
    CPU threads torchrun gave each process (one), for the embedder, the index and the codec."""
    if distributed.world_size == 1:
        return
    import os

    import faiss
    import torch
    import torch.distributed as dist

    dist.destroy_process_group()
    if distributed.is_main:
        cpus = len(os.sched_getaffinity(0))
        torch.set_num_threads(cpus)
        faiss.omp_set_num_threads(cpus)


def cmd_kb_add(s3, files: list[Path], *, parent: str, name: str | None, cache_dir: Path,
               exist_ok: bool = False, remove_ids: list[str] = (), remove_matches: list[str] = (),
               events: bool = False, index_kind: str | None = None, device: str = "auto") -> int:
    from memory3.services.storage.object_store import ObjectStore
    from memory3.services.trainer.placement import make_current, training_placement
    from memory3.services.trainer.releases import kb_add, kb_add_name

    placement = training_placement(device)
    make_current(placement)
    if name is None:
        name = kb_add_name(parent, files, remove_ids=remove_ids, remove_matches=remove_matches, index_kind=index_kind)

    def encoded(done: int, total: int) -> None:
        _json_lines({"step": done, "total_steps": total, "message": "encoding memories"})

    manifest = kb_add(ObjectStore(s3), parent, files, name, cache_dir, exist_ok=exist_ok, remove_ids=remove_ids,
                      remove_matches=remove_matches, progress=not events, on_encoded=encoded if events else None,
                      index_kind=index_kind, device=placement.device)
    removed = manifest.provenance.get("removed_references") or 0
    summary = (f"release {manifest.name} (from {parent}): {manifest.memory_bank['count']} memories"
               + (f", {removed} references removed" if removed else ""))
    if events:
        _json_lines({"message": summary, "release": manifest.name})
    else:
        print(summary)
    return 0


def cmd_kb_remove(s3, *, parent: str, ids: list[str], matches: list[str], name: str | None, cache_dir: Path,
                  dry_run: bool) -> int:
    from memory3.services.release.reader import Release
    from memory3.services.storage.object_store import ObjectStore
    from memory3.services.trainer.releases import check_keeps_one, kb_remove, kb_remove_name, references_to_remove

    store = ObjectStore(s3)
    base = Release.open(store, parent, cache_dir)
    removed = references_to_remove(base, ids=ids, matches=matches)
    check_keeps_one(base, removed)  # on a dry run too
    for row in removed:
        text = row["text"] if len(row["text"]) <= 100 else row["text"][:99] + "…"
        print(f"  {row['id']}: {text}")
    if dry_run:
        print(f"dry run: {len(removed)} of the {base.count} references of {parent!r} would be removed")
        return 0
    if name is None:
        name = kb_remove_name(parent, [r["id"] for r in removed])
    manifest = kb_remove(store, base, removed, name)
    print(f"release {manifest.name} (from {parent}): {manifest.memory_bank['count']} memories, "
          f"{len(removed)} references removed")
    return 0


def cmd_kb_merge(s3, *, parent: str, derived: list[str], name: str | None, cache_dir: Path, dry_run: bool,
                 wait_s: float, exist_ok: bool = False) -> int:
    from memory3.services.release.memory_ids import MEMORY_IDS_FILE
    from memory3.services.release.publish import INDEX_FILE, REFERENCES_FILE
    from memory3.services.release.reader import (
        Release,
        already_published,
        ancestry,
        once_the_store_answers,
        wait_for_releases,
    )
    from memory3.services.storage.object_store import ObjectStore
    from memory3.services.trainer.releases import differs_from_merge, kb_merge, kb_merge_name, plan_merge

    if not (math.isfinite(wait_s) and wait_s >= 0):  # NaN is not < 0
        raise ValueError(f"--wait must be a finite number of seconds, 0 or more, got {wait_s:g}")
    if name is None:
        name = kb_merge_name(parent, derived)
    store = ObjectStore(s3)
    deadline = time.monotonic() + wait_s

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def merged_already() -> bool:
        return already_published(store, name, exist_ok=exist_ok, differs=differs_from_merge(parent, derived))
    # Before waiting for the derived releases: once merged, they may have been deleted.
    if not dry_run and once_the_store_answers(merged_already, wait_s, log=log):
        print(f"release {name} is already published from these releases: nothing to do")
        return 0
    if wait_s:
        wait_for_releases(store, [parent, *derived], max(deadline - time.monotonic(), 0), log=log)
    base = Release.open(store, parent, cache_dir)
    # Of a derived release, only its ids, table and index are read: the model is the base's.
    derived_files = {MEMORY_IDS_FILE, INDEX_FILE, REFERENCES_FILE}
    plan = plan_merge(base, [Release.open(store, d, cache_dir, only=derived_files) for d in derived],
                      ancestry={d: ancestry(store, d, until=parent) for d in derived})
    for release in plan.derived:
        added, removed = plan.changes_of(release)
        print(f"  {release.name}: {added} references added, {removed} removed")
    if dry_run:
        print(f"dry run: merging into {parent!r} would add {len(plan.added)} references and remove "
              f"{len(plan.removed)}, for {plan.count} in all")
        return 0
    manifest = kb_merge(store, plan, name)
    print(f"release {manifest.name} (from {parent}): {manifest.memory_bank['count']} memories, "
          f"{len(plan.added)} references added, {len(plan.removed)} removed")
    return 0


def cmd_release_list(s3, *, as_json: bool) -> int:
    from memory3.services.release.catalog import read_catalog
    from memory3.services.storage.object_store import ObjectStore

    catalog = read_catalog(ObjectStore(s3))
    rows = [{"name": m.name, "published": True, "created": m.created, "parent": m.parent,
             "memories": m.memory_bank["count"], "memory_bytes": m.memory_bank["bytes"],
             "bank": m.memory_bank["bank"], "codec": m.memory_bank["codec"]} for m in catalog.published]
    rows += [{"name": n, "published": False} for n in catalog.unpublished]
    rows += [{"name": n, "published": False, "unreadable": why} for n, why in catalog.unreadable.items()]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print(f"no releases in bucket {s3.bucket!r}")
        return 0
    print(f"{'NAME':<24} {'CREATED':<25} {'PARENT':<16} {'MEMORIES':>9} {'MB':>8}  {'CODEC':<5} BANK")
    for m in catalog.published:
        bank = m.memory_bank
        print(f"{m.name:<24} {m.created:<25} {m.parent or '-':<16} {bank['count']:>9} "
              f"{bank['bytes'] / 1e6:>8.1f}  {bank['codec']:<5} {bank['bank']}")
    for name in catalog.unpublished:
        print(f"{name:<24} (no manifest: a publication in progress, or left half-written)")
    for name, why in catalog.unreadable.items():
        print(f"{name:<24} (manifest unreadable: {why})")
    return 0


def cmd_release_show(s3, name: str, *, as_json: bool) -> int:
    from memory3.services.release.manifest import ReleaseError, ReleaseNotFound, check_release_name
    from memory3.services.release.reader import ancestry, read_manifest
    from memory3.services.storage.object_store import ObjectStore
    from memory3.services.trainer.releases import index_choice

    check_release_name(name)  # a name no release can have is a typo, not a damaged manifest
    store = ObjectStore(s3)
    try:
        manifest = read_manifest(store, name)
    except ReleaseNotFound:
        raise
    except (ReleaseError, UnicodeDecodeError) as e:  # as `release list` shows it
        raise ReleaseError(f"the manifest of release {name!r} cannot be read ({e}); `memory3 release delete "
                           f"{name}` removes what it has in the bucket") from e
    lineage = ancestry(store, name)
    if as_json:
        print(json.dumps({**dataclasses.asdict(manifest), "ancestry": lineage}, indent=2, sort_keys=True))
        return 0
    bank, index, conv, prov = manifest.memory_bank, manifest.index, manifest.conventions, manifest.provenance
    root = lineage[-1] if lineage else name
    try:
        origin = f"{root} was trained" if read_manifest(store, root).parent is None else f"{root} was derived"
    except ReleaseNotFound:  # the chain stops at a deleted ancestor
        origin = f"{root} is deleted: what it derived from is unknown"
    rows = [("created", manifest.created),
            ("lineage", " <- ".join([name, *lineage]) + f" ({origin})"),
            ("memories", f"{bank['count']:,} ({bank['bytes'] / 1e6:.1f} MB, codec {bank['codec']}, "
                         f"bank {bank['bank']})"),
            ("index", f"{index.get('kind') or FAISS_KINDS.get(index['type'], index['type'])} "
                      f"(kind asked: {index_choice(manifest)}), "
                      f"{index['count']:,} references, {index['embedder']}, {index['dim']} dims"),
            ("model", f"memory layers {conv.get('memory_layers')}, {conv.get('mems_per_chunk')} memories per "
                      f"{conv.get('chunk_len')}-token chunk, {conv.get('mem_tokens_per_head')} tokens per head")]
    changes = [f"{prov[k]} reference{'s' * (prov[k] != 1)} {what}"
               for k, what in (("added_references", "added"), ("removed_references", "removed")) if prov.get(k)]
    if manifest.parent is not None:
        rows.append(("changes", ", ".join(changes) or "none listed"))
    if prov.get("merged"):
        rows.append(("merged", ", ".join(prov["merged"])))
    if prov.get("commit"):
        rows.append(("commit", prov["commit"]))
    rows += [("file", f"{file}  {_size(meta['bytes'])}  sha256 {meta['sha256'][:12]}")
             for file, meta in sorted(manifest.files.items())]
    print(f"release {name}")
    for key, value in rows:
        print(f"  {key:<9} {value}")
    return 0


# The kind of a release's index, for manifests written before they named it.
FAISS_KINDS = {"IndexFlatIP": "flat", "IndexHNSWFlat": "hnsw", "IndexIVFPQ": "ivfpq"}


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _removal_progress() -> Callable[[int], None]:
    """A line every 5 s: removing a bank can take hours."""
    shown = [time.monotonic()]

    def progress(count: int) -> None:
        if time.monotonic() - shown[0] >= 5.0:
            shown[0] = time.monotonic()
            print(f"  {count} memories removed so far", file=sys.stderr, flush=True)
    return progress


def cmd_release_gc(s3, *, dry_run: bool, served_shard_counts: tuple[int, ...] | None = None) -> int:
    from memory3.services.release.catalog import Maintenance, collect_unlisted, plan_collection
    from memory3.services.storage.object_store import ObjectStore

    store = ObjectStore(s3)
    if dry_run:
        print(plan_collection(store, served_shard_counts).summary())
        print("dry run: nothing removed")
        return 0
    with Maintenance(store, "release gc") as maintenance:
        plan = plan_collection(store, served_shard_counts)
        print(plan.summary())
        if not plan.count:
            print("nothing removed")
            return 0
        removed = collect_unlisted(store, plan, maintenance, log=lambda msg: print(msg, file=sys.stderr),
                                   progress=_removal_progress())
    print(f"{removed} objects removed from bucket {s3.bucket!r}")
    return 0


def cmd_release_shard_index(s3, name: str, *, shards: int, cache_dir: Path, wait_s: float = 0.0) -> int:
    """Each shard of the release's index and reference table cut and kept in the store, for text
    services started with `--index-shard I/N` (file_shards.py). A shard kept already is left; one whose
    objects are missing or of another shape is cut again. The release is read into a directory of its
    own, removed at the end: a shard kept beside a local copy would not be put in the store again.
    A shard's local copy goes once the store keeps it, so the disk holds the release's files and one
    shard at a time.
    `wait_s`: how long to wait for the release to be published (a Job started beside the one that
    publishes it)."""
    import tempfile

    from memory3.services.release.file_shards import ShardShape, is_shared
    from memory3.services.release.publish import INDEX_FILE, REFERENCES_FILE
    from memory3.services.release.reader import SHARDS_DIR, Release, wait_for_releases
    from memory3.services.retrieval.index import IndexShard
    from memory3.services.storage.object_store import ObjectStore

    if shards < 2:
        raise ValueError(f"--shards {shards}: give 2 or more; a text service without --index-shard reads the whole "
                         "index as it is published")
    store = ObjectStore(s3)
    if wait_s:
        wait_for_releases(store, [name], wait_s)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{name}-shards-") as tmp:
        release = Release.open(store, name, Path(tmp), only=set())

        def unshared(shard: IndexShard) -> list[str]:
            """The release's files whose shard `shard` the store does not keep."""
            shapes = {REFERENCES_FILE: ShardShape(release.shard_rows(shard)), INDEX_FILE: release.index_shape(shard)}
            return [file for file, shape in shapes.items()
                    if not is_shared(store, release.manifest.files[file]["sha256"], shard, shape)]

        for i in range(shards):
            shard = IndexShard(i, shards)
            if not unshared(shard):
                print(f"shard {shard}: kept already")
                continue
            started = time.monotonic()
            rows = release.reference_shard(shard)
            index = release.index_shard(shard, [row["id"] for row in rows])
            missing = unshared(shard)
            if missing:  # `_file_shard` warned why (a store or a disk that refused it)
                raise RuntimeError(f"shard {shard} of {' and '.join(missing)} was cut but could not be kept in the "
                                   "store (see the warning above): check that these credentials may write under "
                                   "shards/ in the bucket, and the space under --cache-dir, then run this again")
            print(f"shard {shard}: {len(rows)} references ({index.kind} index) kept in the store, in "
                  f"{time.monotonic() - started:.1f} s")
            shutil.rmtree(release.local_dir / SHARDS_DIR, ignore_errors=True)  # in the store now: not kept twice
    return 0


def cmd_release_delete(s3, name: str, *, dry_run: bool, cache_dir: Path, home: Path, home_option: str = "") -> int:
    """`home_option`: the `--home` the user gave, repeated in the hint to stop the stack (empty for
    the default home): without it the hint stopped another stack, or none."""
    import shutil

    from memory3.services.release.catalog import Maintenance, delete_release, plan_deletion
    from memory3.services.stack import SERVICES, stack_is_up
    from memory3.services.storage.object_store import ObjectStore

    state = stack_is_up(home)
    served = state is not None and state.release == name and state.s3_config.endpoint == s3.endpoint \
        and state.s3_config.bucket == s3.bucket
    if served and not dry_run:
        raise ValueError(f"the local stack serves release {name!r}: stop it first (`memory3 down{home_option}`)")
    store = ObjectStore(s3)
    if dry_run:
        print(plan_deletion(store, name).summary())
        print("dry run: nothing removed"
              + (f" (the local stack serves it: `memory3 down{home_option}` first)" if served else ""))
        return 0
    with Maintenance(store, f"release delete {name}") as maintenance:
        plan = plan_deletion(store, name)
        print(plan.summary())
        removed = delete_release(store, plan, maintenance, log=lambda msg: print(msg, file=sys.stderr),
                                 progress=_removal_progress())
    # This command's copy, and those of the services `memory3 up` runs (one cache directory each).
    for local in (cache_dir / name, *(cache_dir / service / name for service in SERVICES)):
        if local.is_dir():
            shutil.rmtree(local)
            print(f"removed the local copy {local}")
    print(f"deleted {name!r}: {removed} objects removed from bucket {s3.bucket!r}")
    return 0
