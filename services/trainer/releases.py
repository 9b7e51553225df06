"""From a finished training run to a published release, and derived releases with new knowledge."""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memory3.model.codecs import MemoryCodec, VQCodec, codec_from_name
from memory3.model.encoder import encode_batch

from ..release.manifest import Manifest, check_release_name
from ..release.memory_ids import MEMORY_IDS_FILE, holds, sorted_ids
from ..release.publish import TOKENIZER_KEY, publish_release
from ..release.reader import Release, already_published, read_manifest
from ..retrieval.embedder import Embedder
from ..retrieval.index import VectorIndex, in_sorted
from ..storage.object_store import ObjectStore
from .corpus import CorpusError, is_json_lines, read_corpus_file
from .kb import Reference, build_references
from .pipeline import RUN_SETTINGS, PipelineResult, config_leaves


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def make_memory_codec(name: str, model, references: Sequence[Reference], prefix: list[int],
                      sample: int = 512) -> MemoryCodec:
    """A fixed codec by name, or a VQ codec trained on K/V of a sample of the references."""
    if name != "vq":
        return codec_from_name(name)
    step = max(1, len(references) // sample)
    tokens = [list(r.tokens) for r in references[::step][:sample]]
    with torch.inference_mode():
        keys, values, _ = encode_batch(model, tokens, prefix)
    vectors = torch.cat([keys.flatten(0, 3), values.flatten(0, 3)]).float()
    head_dim = model.config.head_dim
    # The paper's 2 x 14-bit residual levels need ~40 training vectors per centroid; with fewer
    # sampled vectors, use fewer bits rather than centroids fitted to a handful of points.
    rq_bits = min(14, max(4, (len(vectors) // 64).bit_length() - 1))
    codec = VQCodec(head_dim, opq_m=head_dim // 4, rq_bits=rq_bits, pq_bits=8, niter=10, opq_niter=10)
    return codec.train(vectors, progress=True)


def publish_trained(result: PipelineResult, store: ObjectStore, name: str, *, codec: str = "bf16",
                    pipeline_config: dict | None = None, embedder: Embedder | None = None,
                    progress: bool = True, index_kind: str = "auto") -> Manifest:
    check_release_name(name)
    embedder = embedder or Embedder()
    prefix = result.codec.reference_prefix(result.model.config)
    memory_codec = make_memory_codec(codec, result.model, result.references, prefix)
    final_loss = next((h["loss"] for h in reversed(result.history) if "loss" in h), None)
    provenance = {"seed": (pipeline_config or {}).get("seed"), "steps": result.steps, "commit": git_commit(),
                  "pipeline": pipeline_config, "train_seconds": round(result.seconds, 1),
                  "final_loss": final_loss}
    return publish_release(store, name, model=result.model, codec=result.codec, references=result.references,
                           embed=embedder.embed, embedder_name=embedder.name, memory_codec=memory_codec,
                           provenance=provenance, progress=progress, index_kind=index_kind)


def differs_from_training(pipeline_config: dict, codec: str,
                          index_kind: str = "auto") -> Callable[[Manifest], str | None]:
    """How a published release's training differs from this configuration, codec and index kind
    (None: it does not), setting aside `RUN_SETTINGS`."""
    asked = config_leaves(json.loads(json.dumps(pipeline_config)))  # as the manifest stores it

    def differs(manifest: Manifest) -> str | None:
        had = config_leaves(manifest.provenance.get("pipeline") or {})
        keys = sorted(k for k in asked.keys() | had.keys() if asked.get(k) != had.get(k) and k not in RUN_SETTINGS)
        if keys:
            return "; ".join(f"{k} {had.get(k)!r} there, {asked.get(k)!r} asked" for k in keys[:3])
        published_codec = manifest.memory_bank["codec"].split(":")[0]
        if published_codec != codec:
            return f"codec {published_codec!r} there, {codec!r} asked"
        return _index_differs(manifest, index_kind)
    return differs


def index_choice(manifest: Manifest) -> str:
    """The index kind a release asked for, which the releases derived from it keep unless told
    otherwise ("auto" for one published before the choice was recorded)."""
    return manifest.index.get("choice", "auto")


def _index_differs(manifest: Manifest, index_kind: str) -> str | None:
    choice = index_choice(manifest)
    return None if choice == index_kind else f"index kind {choice!r} there, {index_kind!r} asked"


def differs_from_merge(parent: str, derived: Sequence[str]) -> Callable[[Manifest], str | None]:
    """How a published release differs from the merge of `derived` into `parent` (None: it does not).

    In any order: the default name is made from the sorted names, and a Job's list of shards may
    come back in another order when it runs again."""
    def differs(manifest: Manifest) -> str | None:
        if manifest.parent != parent:
            return f"derived from {manifest.parent!r}, not {parent!r}"
        merged = manifest.provenance.get("merged")
        if not isinstance(merged, list):
            return f"not a merge, {sorted(derived)!r} asked"
        return None if sorted(merged) == sorted(derived) else f"a merge of {sorted(merged)!r}, not {sorted(derived)!r}"
    return differs


def derived_name(parent: str, kind: str, inputs: Iterable[tuple[str, str | bytes]]) -> str:
    """The default name of a release derived from `parent` by `kind` ("kb", "rm", "merge"): the same
    request gives the same name, and any other request another.

    The hash covers all that makes a derivation: the whole parent name (a long one is cut in the
    name, never in the hash, to keep to the 63 characters of a release name), the kind, and each
    labelled input with its length, so that no two requests hash the same bytes."""
    digest = hashlib.sha256()
    for label, value in [("parent", parent), ("kind", kind), *inputs]:
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        digest.update(f"{label}:{len(data)}:".encode() + data)
    suffix = f"-{kind}-{digest.hexdigest()[:8]}"
    return check_release_name(check_release_name(parent)[: 63 - len(suffix)] + suffix)


def kb_add_name(parent: str, files: Sequence[Path], *, remove_ids: Sequence[str] = (),
                remove_matches: Sequence[str] = (), index_kind: str | None = None) -> str:
    """The default name of `kb_add`'s release: from the files' contents, in order, and how each is
    read (the same bytes as JSON Lines and as plain text are other documents), the removals, and the
    index kind (None: the parent's). A file that is missing is left to `kb_add` to report."""
    return derived_name(parent, "kb", [
        ("index-kind", index_kind or "parent's"),
        *(("jsonl" if is_json_lines(f) else "text", f.read_bytes()) for f in files if f.is_file()),
        *(("remove-id", i) for i in remove_ids), *(("remove-match", m) for m in remove_matches)])


def kb_remove_name(parent: str, removed_ids: Collection[str]) -> str:
    """The default name of `kb_remove`'s release: from the ids it leaves out, in any order."""
    return derived_name(parent, "rm", [("id", i) for i in sorted(removed_ids)])


def kb_merge_name(parent: str, derived: Collection[str]) -> str:
    """The default name of `kb_merge`'s release: from the merged releases' names, in any order (as
    `differs_from_merge` compares them)."""
    return derived_name(parent, "merge", [("release", d) for d in sorted(derived)])


def kb_add(store: ObjectStore, parent: str, files: Sequence[Path], name: str, cache_dir: Path, *,
           remove_ids: Collection[str] = (), remove_matches: Collection[str] = (), embedder: Embedder | None = None,
           progress: bool = True, exist_ok: bool = False,
           on_encoded: Callable[[int, int], None] | None = None, index_kind: str | None = None,
           device: torch.device | str = "cpu") -> Manifest:
    """New documents become references, memories and index entries of a release derived from `parent`.

    The model is the parent's, unchanged: knowledge is added without retraining. The parent's
    references chosen by `remove_ids` and `remove_matches` (`references_to_remove`) are left out of
    the same release, which is how a fact is corrected in one publication: its old statement out,
    the new one in. With `exist_ok`,
    a release `name` already published from `parent` with exactly these references is returned as it is.
    `index_kind` None keeps the parent's choice (`index_choice`). The memories are encoded on `device`.
    """
    check_release_name(name)
    documents = []
    for file in files:
        documents.extend(read_corpus_file(file))
    base = Release.open(store, parent, cache_dir)
    index_kind = index_kind or index_choice(base.manifest)
    model, codec = base.load_model(device=str(device)), base.text_codec()
    removed = references_to_remove(base, ids=remove_ids, matches=remove_matches) if remove_ids or remove_matches \
        else []
    drop = {r["id"] for r in removed}
    # Those of the parent's that stay are not added again. Its ids are held sorted (`Release.ids`), and
    # its table is read a row at a time (`parent_rows`): at 10^8 references it is tens of GB.
    new = [r for r in build_references(documents, codec, model.config.ref_len)
           if r.id in drop or not holds(base.ids, r.id)]
    if not new:
        raise CorpusError(f"{', '.join(map(str, files))}: every reference is already in release {parent!r}")

    def differs(manifest: Manifest) -> str | None:
        if manifest.parent != parent:
            return f"derived from {manifest.parent!r}, not {parent!r}"
        there = Release.open(store, name, cache_dir, only={MEMORY_IDS_FILE}).ids
        asked = np.union1d(np.setdiff1d(base.ids, sorted_ids(drop)), sorted_ids(r.id for r in new))
        missing, others = len(np.setdiff1d(asked, there)), len(np.setdiff1d(there, asked))
        if missing or others:
            return f"{missing} of the references asked for are not there, {others} others are"
        return _index_differs(manifest, index_kind)
    if already_published(store, name, exist_ok=exist_ok, differs=differs):
        print(f"release {name!r} is already published from {parent!r} with these references: nothing to do",
              file=sys.stderr)
        return read_manifest(store, name)
    embedder = embedder or Embedder()
    provenance = {**base.manifest.provenance, "parent": parent, "added_files": [str(f) for f in files],
                  "added_references": len(new), "removed_references": len(drop), "commit": git_commit()}
    print(f"adding {len(new)} references to {parent!r} as {name!r}"
          + (f", without {len(drop)} of its own" if drop else ""), file=sys.stderr)
    return publish_release(store, name, model=model, codec=codec, references=new, embed=embedder.embed,
                           embedder_name=embedder.name, memory_codec=base.memory_codec(), provenance=provenance,
                           parent_index=base.index().without(drop) if drop else base.index(),
                           parent_references=lambda: (r for r in base.rows() if r["id"] not in drop), parent=parent,
                           progress=progress, on_encoded=on_encoded, index_kind=index_kind, as_read=[base.manifest])


def references_to_remove(release: Release, *, ids: Collection[str] = (), matches: Collection[str] = ()) -> list[dict]:
    """The rows of `release`'s reference table chosen by id or by text containing one of
    `matches` (case-sensitive), in table order; an error if that is none. All of them is for
    `kb add` to replace, not for `kb remove` (`check_keeps_one`)."""
    if not ids and not matches:
        raise ValueError("say which references to remove: --id ID or --match TEXT (repeatable)")
    unknown = sorted(i for i in set(ids) if not holds(release.ids, i))
    if unknown:
        raise ValueError(f"release {release.name!r} has no reference {unknown[0]!r}"
                         + (f" (nor {len(unknown) - 1} more of the ids given)" if len(unknown) > 1 else ""))
    if any(not m for m in matches):
        raise ValueError("--match needs some text: an empty one would match every reference")
    wanted = set(ids)
    chosen = [r for r in release.rows() if r["id"] in wanted or any(m in r["text"] for m in matches)]
    if not chosen:
        raise ValueError(f"no reference of release {release.name!r} contains "
                         + " or ".join(repr(m) for m in matches))
    return chosen


def check_keeps_one(release: Release, removed: Sequence[dict]) -> None:
    """A release needs at least one reference: removing every one of `release`'s, with nothing
    added in their place, is refused (`kb add` with removals adds its documents)."""
    if len({r["id"] for r in removed}) >= release.count:
        raise ValueError(f"that is every reference of release {release.name!r}: a release needs at least one")


def kb_remove(store: ObjectStore, base: Release, removed: Sequence[dict], name: str, *,
              progress: bool = True) -> Manifest:
    """A release derived from `base` without the `removed` rows of its reference table.

    Knowledge lives in the references, so this is how a fact is withdrawn or corrected (then
    `kb add` the corrected text): the model, the bank and every other memory stay as they are, no
    memory is encoded and no text embedded; the index is rebuilt from the vectors it stores.
    The removed memories stay in the bank for the releases that still list them
    (`memory3 release delete` removes what no release lists).
    """
    check_release_name(name)
    check_keeps_one(base, removed)
    drop = {r["id"] for r in removed}
    provenance = {**base.manifest.provenance, "parent": base.name, "removed_references": len(drop),
                  "commit": git_commit()}
    print(f"removing {len(drop)} references from {base.name!r} as {name!r}", file=sys.stderr)
    return _publish_derived(store, base, name, lambda: (r for r in base.rows() if r["id"] not in drop),
                            base.index().without(drop), provenance, progress)


@dataclass(frozen=True)
class MergePlan:
    """The changes that releases derived from `base` made to it (`plan_merge`): the references they
    added (an id added by several, once, from the first), the base's references they removed, and
    what each withdrew. Those rows are few (an encoding Job's shards, a correction); the base's table,
    tens of GB at 10^8 references, is never held: `rows` reads it anew, a row at a time."""

    base: Release
    derived: list[Release]
    added: list[tuple[Release, dict]]  # (the release that added it, its reference-table row)
    removed: list[dict]  # rows of the base's table
    withdrawn: Mapping[str, np.ndarray]  # release name -> ids it withdrew that the merge leaves out, sorted bytes

    def changes_of(self, release: Release) -> tuple[int, int]:
        """(references the merge takes from `release`, references the merge leaves out because it
        withdrew them: the base's, or ones added on its way from the base)."""
        return (sum(source is release for source, _ in self.added), len(self.withdrawn[release.name]))

    @property
    def count(self) -> int:
        """How many references the merged release lists."""
        return self.base.count - len(self.removed) + len(self.added)

    def rows(self) -> Iterator[dict]:
        """The merged reference table: the base's kept rows in order, then the added ones. Read anew
        at each call, as publishing reads a parent's table (twice, never held)."""
        gone = {r["id"] for r in self.removed}
        yield from (r for r in self.base.rows() if r["id"] not in gone)
        yield from (row for _, row in self.added)


def plan_merge(base: Release, derived: Sequence[Release], *,
               ancestry: Mapping[str, Sequence[str]] | None = None,
               open_table: Callable[[str], Release] | None = None) -> MergePlan:
    """What merging `derived` into `base` changes; a ValueError that says why if they cannot merge.

    Each derived release must descend from `base`: its parent (as the shards of the encoding Job),
    or an ancestor further up. `ancestry` gives each one's (`reader.ancestry`, parent first; without
    it, only the parent is known), and `open_table` opens the reference ids of a release between
    (by default from the base's store into the base's cache directory). They must share the base's
    memory bank (same weights and codec), tokenizer and embedder, so their rows and vectors mean
    what the base's do.

    What the merge lists is decided reference by reference, from each derived release's line of
    descent (the base, the releases between, the release itself): the last release on it where the
    reference came in or went out decides for that line (`_last_changes`); a reference that no line
    changes stays as the base has it. A line's decision is overruled by another line that passes
    through the release that made it and changes the reference later: a correction made on top of a
    release wins over it. Of the decisions left, which were made apart, a withdrawal wins over an
    addition, so that a withdrawn fact does not come back: a reference is left out when a derived
    release, or a release on its line, withdrew it and nothing later on that line brought it back.
    A fact that a release between the base and them added is then gone from the merge when one of
    them withdrew it, however many releases lie between; a release derived from anything else is
    refused, as it could bring back a reference one of them removed.

    It is decided from what each release changed from its parent (`_steps`, from their sorted ids),
    never from their tables: only the rows it takes or leaves out are kept, each table read past them.
    """
    if not derived:
        raise ValueError(f"name the releases derived from {base.name!r} to merge into it")
    names = [d.name for d in derived]
    if len(set(names)) < len(names) or base.name in names:
        raise ValueError(f"each release to merge must be named once, and not be the base {base.name!r}")
    chains = {d.name: _chain_to(base, d, ancestry) for d in derived}
    for d in derived:
        _check_same_bank(base, d)
    lines = _lines_from(base, derived, chains, open_table or functools.partial(_open_table, base))
    steps = _steps(base, lines)
    last_changes = {d.name: _last_changes(lines[d.name], steps) for d in derived}
    withdrawn = {d.name: _withdrawals(d, last_changes, lines) for d in derived}
    left_out = functools.reduce(np.union1d, withdrawn.values())  # (n,) sorted
    added = _additions(base, derived, last_changes, left_out)
    removed_ids = left_out[in_sorted(left_out, base.ids)]  # (m,) sorted
    if not added and not len(removed_ids):
        raise ValueError(f"nothing to merge: {', '.join(names)} leave the references of {base.name!r} as they are")
    if len(removed_ids) == base.count and not added:
        raise ValueError(f"that removes every reference of {base.name!r}: a release needs at least one")
    return MergePlan(base, list(derived), added, _rows_with(base, removed_ids), withdrawn)


def _additions(base: Release, derived: Sequence[Release], last_changes: Mapping[str, _Changes],
               left_out: np.ndarray) -> list[tuple[Release, dict]]:
    """The references that derived releases list and neither the base nor `left_out` (sorted) does,
    each once, from the first release that lists it, in its table's order. Found among the changes
    (a release lists what came in last on its line), then read from each table streamed past them: a
    shard's table holds the base's rows too."""
    added: list[tuple[Release, dict]] = []
    taken = left_out  # (t,) sorted: ids no later release adds
    for d in derived:
        changes = last_changes[d.name]
        new = _outside(_outside(changes.ids[changes.came_in], base.ids), taken)  # (n,) sorted
        if len(new):
            taken = np.union1d(taken, new)
            added.extend((d, row) for row in _rows_with(d, new))
    return added


def _rows_with(release: Release, ids: np.ndarray) -> list[dict]:
    """The rows of `release`'s table whose id is one of `ids` (a few), in table order; its table is
    not read when there are none."""
    if not len(ids):
        return []
    wanted = {i.decode() for i in ids.tolist()}
    return [row for row in release.rows() if row["id"] in wanted]


def _outside(ids: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The ids of sorted `ids` that sorted `others` lack, in order (`in_sorted`: a binary search each,
    as both may be a table's 10^8 ids)."""
    return ids[~in_sorted(ids, others)]


def _chain_to(base: Release, release: Release, ancestry: Mapping[str, Sequence[str]] | None) -> list[str]:
    """The releases between `release` and `base`, parent first (`base` not included); an error if
    `base` is not among its ancestors."""
    chain = [a for a in (ancestry or {}).get(release.name) or [release.manifest.parent] if a is not None]
    if base.name not in chain:
        origin = f"derived from {' <- '.join(map(repr, chain))}" if chain else "derived from no release"
        raise ValueError(f"release {release.name!r} was {origin}, not from {base.name!r}: only releases that descend "
                         "from the base merge into it")
    return chain[:chain.index(base.name)]


def _check_same_bank(base: Release, release: Release) -> None:
    """Rows and vectors of `release` mean what the base's do only with the same memory bank (weights
    and codec), tokenizer and embedder."""
    ours, theirs = base.manifest, release.manifest
    for what, mine, its in (
            ("memory bank", ours.memory_bank["bank"], theirs.memory_bank["bank"]),
            ("tokenizer", ours.files[TOKENIZER_KEY]["sha256"], theirs.files[TOKENIZER_KEY]["sha256"]),
            ("embedder", ours.index["embedder"], theirs.index["embedder"])):
        if mine != its:
            raise ValueError(f"release {release.name!r} has another {what} than {base.name!r} ({its} vs {mine}): "
                             "only releases of the same model, codec and embedder merge")


def _open_table(base: Release, name: str) -> Release:
    """A release between the base and those merged into it, for its ids only (its table, where it has
    no `memory_ids.npy`: `Release.ids`), from the base's store into the base's cache directory."""
    return Release.open(base.store, name, base.local_dir.parent, only={MEMORY_IDS_FILE})


def _lines_from(base: Release, derived: Sequence[Release], chains: Mapping[str, Sequence[str]],
                open_table: Callable[[str], Release]) -> dict[str, list[Release]]:
    """Each derived release's line of descent: the base first, then each release down to it. A
    release between is opened once, however many lines it is on, and a derived release on another's
    line is the one given."""
    opened = {base.name: base} | {d.name: d for d in derived}
    lines = {}
    for d in derived:
        for name in chains[d.name]:
            if name not in opened:
                opened[name] = open_table(name)
        lines[d.name] = [base, *(opened[name] for name in reversed(chains[d.name])), d]
    return lines


@dataclass(frozen=True)
class _Step:
    """What a release changed from its parent: the ids that came in and those that went out."""

    came_in: np.ndarray  # (i,) sorted bytes
    went_out: np.ndarray  # (o,) sorted bytes


def _steps(base: Release, lines: Mapping[str, Sequence[Release]]) -> dict[str, _Step]:
    """What each release on `lines` but the base changed from the one before it, by name: each pair
    compared once, from the two's sorted ids. A release's ids (~3 GB at 10^8 references) are read
    afresh, not kept on it, and let go once its pairs are done: a merge of many shards holds the
    base's and two more, never all of theirs. The changes are what the merge needs of them."""
    pairs = {child.name: (parent, child) for line in lines.values() for parent, child in itertools.pairwise(line)}
    uses = collections.Counter(r.name for pair in pairs.values() for r in pair if r is not base)
    held = {base.name: base.ids}
    steps = {}
    for name, (parent, child) in pairs.items():
        for release in (parent, child):
            if release.name not in held:
                held[release.name] = Release.ids.func(release)  # (N,) sorted, not cached on `release`
        before, after = held[parent.name], held[child.name]
        steps[name] = _Step(came_in=_outside(after, before), went_out=_outside(before, after))
        for release in (parent, child):
            if release is not base:
                uses[release.name] -= 1
                if not uses[release.name]:
                    del held[release.name]
    return steps


@dataclass(frozen=True)
class _Changes:
    """The references that came in or went out on a line of descent (the base first), each with the
    name of the last release of it where it did, and which it was (`_last_changes`); any other is as
    the base has it, and the line's last release lists those that came in."""

    ids: np.ndarray  # (n,) sorted bytes
    where: np.ndarray  # (n,) str: the release that last changed each
    came_in: np.ndarray  # (n,) bool: that change brought it in (else it went out)

    def last(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) str: the release that last changed each of `ids` on the line, "" where none did."""
        if not len(self.ids):
            return np.full(len(ids), "")
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)  # (len(ids),)
        return np.where(self.ids[at] == ids, self.where[at], "")


def _last_changes(line: Sequence[Release], steps: Mapping[str, _Step]) -> _Changes:
    """Which references came in or went out on `line` (the base first), where last, and how: from
    each release's step from its parent, the last first."""
    ids, where, came_in = np.zeros(0, dtype="S1"), np.zeros(0, dtype=str), np.zeros(0, dtype=bool)  # (n,) each
    for child in reversed(line[1:]):
        step = steps[child.name]
        new = _outside(np.union1d(step.came_in, step.went_out), ids)  # (k,): not changed again later on
        ids, where = np.concatenate([ids, new]), np.concatenate([where, np.full(len(new), child.name)])
        came_in = np.concatenate([came_in, in_sorted(new, step.came_in)])
        order = np.argsort(ids, kind="stable")
        ids, where, came_in = ids[order], where[order], came_in[order]
    return _Changes(ids, where, came_in)


def _withdrawals(release: Release, last_changes: Mapping[str, _Changes],
                 lines: Mapping[str, Sequence[Release]]) -> np.ndarray:
    """The ids (sorted) `release` does not list because a release on its line withdrew them, unless
    another derived release has that withdrawal on its own line and changed the reference since."""
    mine = last_changes[release.name]
    ids, where = mine.ids[~mine.came_in], mine.where[~mine.came_in]  # (w,) each
    kept = np.ones(len(ids), dtype=bool)  # (w,)
    for name, line in lines.items():
        if name != release.name:
            passes = np.isin(where, [r.name for r in line])  # (w,): that line has the withdrawal
            kept &= ~(passes & (last_changes[name].last(ids) != where))
    return ids[kept]


def kb_merge(store: ObjectStore, plan: MergePlan, name: str, *, progress: bool = True,
             embedder: Embedder | None = None) -> Manifest:
    """One release with the changes of every release derived from the base: how the shards that
    the encoding Job published separately become the release to serve.

    Nothing is encoded: the added memories are in the shared bank already. Their vectors are copied
    from the index of the release that added them, except from an IVF-PQ index into another kind:
    its vectors are approximations, so those references are embedded again (`embedder`, by default
    the release's), as `kb add --index-kind` does.
    """
    check_release_name(name)
    index = plan.base.index()
    if plan.removed:
        index = index.without({r["id"] for r in plan.removed})
    for d in plan.derived:
        rows = [row for source, row in plan.added if source is d]
        if not rows:
            continue
        ids, source_index = [row["id"] for row in rows], d.index()
        if source_index.kind == "ivfpq" and index.kind != "ivfpq":
            embedder = embedder or Embedder()
            indexed_with = plan.base.manifest.index["embedder"]
            if embedder.name != indexed_with:
                raise ValueError(f"release {plan.base.name!r} was indexed with {indexed_with!r}, not "
                                 f"{embedder.name!r}: its vectors cannot be embedded again here")
            print(f"embedding {len(rows)} references of {d.name!r} again: its IVF-PQ index holds approximations",
                  file=sys.stderr)
            vectors = embedder.embed([row["text"] for row in rows])  # (len(ids), dim)
        else:
            vectors = source_index.vectors_of(ids)  # (len(ids), dim)
        index.add(vectors, ids)
    provenance = {**plan.base.manifest.provenance, "parent": plan.base.name, "merged": [d.name for d in plan.derived],
                  "added_references": len(plan.added), "removed_references": len(plan.removed),
                  "commit": git_commit()}
    print(f"merging {len(plan.derived)} releases into {plan.base.name!r} as {name!r}: "
          f"{len(plan.added)} references added, {len(plan.removed)} removed", file=sys.stderr)
    return _publish_derived(store, plan.base, name, plan.rows, index, provenance, progress,
                            sources=[d.name for d in plan.derived], as_read=[d.manifest for d in plan.derived])


def _publish_derived(store: ObjectStore, base: Release, name: str,
                     rows: Sequence[dict] | Callable[[], Iterable[dict]], index: VectorIndex,
                     provenance: dict, progress: bool, sources: Sequence[str] = (),
                     as_read: Sequence[Manifest] = ()) -> Manifest:
    """Publish `name` with `base`'s model and bank, and this table and index (nothing encoded), under
    `base`'s index kind: shards merged into a base past a size threshold get the index of their size."""
    return publish_release(store, name, model=base.load_model(), codec=base.text_codec(), references=[],
                           embed=_never_embeds, embedder_name=base.manifest.index["embedder"],
                           memory_codec=base.memory_codec(), provenance=provenance, parent_index=index,
                           parent_references=rows, parent=base.name, progress=progress,
                           index_kind=index_choice(base.manifest), sources=sources,
                           as_read=[base.manifest, *as_read])


def _never_embeds(texts):
    raise AssertionError(f"a release made of published references embeds nothing, asked for {len(texts)}")
