"""The releases in a bucket: listing them, and deleting one with the memories no other release reads.

Memories live in banks shared by every release with the same weights and codec (manifest.py): a
release derived with `memory3 kb add` lists its parent's memories as well as its own, and a
retrained release with the same weights would share them too. So deleting a release removes, of
its memories, only those that no other published release lists; a bank that no other release uses
goes whole, with whatever a failed publication left in it.

The manifest goes first, so the release is invisible to readers before any file of it is gone, as
publication writes it last. A release without a manifest is a publication in progress or one left
half-written, and one whose manifest this build cannot read has a bank we cannot know: either may
list any memory, so while one exists, deleting a published release stops and says so. The leftovers
of a publication are deleted only once its lease has expired (lease.py): a publication still running
holds its name, and would otherwise publish a manifest over files that are gone. Removing is done
under a `Maintenance` lease taken before the plan is made, which publications wait for (lease.py).

A published release whose reference table cannot be read (missing, damaged), nor its `memory_ids.npy`
where it has one, lists memories no one can know. It can be deleted: its objects go, and its memories
stay, for `release gc` to remove once no readable release lists them. While it is published,
deleting another release of its bank removes none of that bank's memories, and `release gc` leaves
its bank whole: either may list any of them.

The shards of index files and reference tables kept in the store (file_shards.py) go with the last
release that has the file: by `release delete`, or by `release gc` for those no published release
has.
"""


from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace

from ..storage.object_store import ObjectStore
from .file_shards import kept_files, shard_count_of, shards_by_count, shards_dir, unnamed_bytes
from .lease import LEASE_TTL_S, Lease, Maintenance, MaintenanceLapsed, ReleaseBusy, live_leases
from .listed import Listed, UnreadableTable, read_listed
from .manifest import (
    MEMORIES_PREFIX,
    RELEASES_PREFIX,
    Manifest,
    ReleaseError,
    ReleaseNotFound,
    check_release_name,
    release_key,
)
from .publish import INDEX_FILE, MANIFEST_FILE, REFERENCES_FILE
from .reader import read_manifest

__all__ = ["Catalog", "CollectionPlan", "DeletionPlan", "Maintenance", "MaintenanceLapsed", "ReleaseBusy",
           "collect_unlisted", "delete_release", "plan_collection", "plan_deletion", "read_catalog", "release_names"]


def release_names(store: ObjectStore) -> list[str]:
    """Every name with objects under `releases/`, published or not, sorted."""
    return sorted(key[len(RELEASES_PREFIX):].strip("/") for key in store.list_keys(RELEASES_PREFIX, recursive=False))


@dataclass
class Catalog:
    """What a bucket holds: published releases (oldest first), names without a manifest, and
    names whose manifest this build cannot read (with why)."""

    published: list[Manifest]
    unpublished: list[str]
    unreadable: dict[str, str]


def read_catalog(store: ObjectStore) -> Catalog:
    """Each manifest named by its directory, whatever name it records: a release copied to a new name
    (its objects copied, as a promotion does) keeps the original's, and taken for a second release of
    that name, its memories would go with the original's."""
    published, unpublished, unreadable = [], [], {}
    for name in release_names(store):
        try:
            published.append(replace(read_manifest(store, name), name=name))
        except ReleaseNotFound:
            unpublished.append(name)
        except (ReleaseError, UnicodeDecodeError) as e:  # another format, or a damaged manifest
            unreadable[name] = str(e)
    return Catalog(sorted(published, key=lambda m: (m.created, m.name)), unpublished, unreadable)


@dataclass
class DeletionPlan:
    """What `delete_release` removes.

    memory_keys: memories that only this release lists; whole_bank: remove the bank's whole prefix,
    as no other release uses it (then memory_keys is empty); kept: memories this release lists
    that others (`listed_by`) list too, or all of them where a reference table cannot be read (its
    own: `table_unreadable`, why; others of the bank: `unknown_tables`, name to why); derived:
    releases made from this one (they keep working). `removed_memories` counts what goes of what
    the release lists. shard_keys: the shards kept in the store for its index file and reference table
    (file_shards.py), of those no other release has.
    """

    name: str
    published: bool
    release_keys: list[str]
    bank: str | None = None
    whole_bank: bool = False
    memory_keys: list[str] = field(default_factory=list)
    kept: int = 0
    listed: int = 0  # memories the release lists
    listed_by: list[str] = field(default_factory=list)
    table_unreadable: str | None = None
    unknown_tables: dict[str, str] = field(default_factory=dict)
    derived: list[str] = field(default_factory=list)
    unreadable: str | None = None  # why its manifest cannot be read
    shard_keys: list[str] = field(default_factory=list)
    planned_at: float = 0.0  # monotonic time its reading of the bucket began

    @property
    def removed_memories(self) -> int:
        return self.listed if self.whole_bank else len(self.memory_keys)

    def summary(self) -> str:
        if self.unreadable is not None:
            what = f"release {self.name!r}, whose manifest cannot be read ({self.unreadable}),"
        else:
            what = f"{'release' if self.published else 'unpublished leftovers of release'} {self.name!r}:"
        lines = [f"{what} {len(self.release_keys)} objects under {release_key(self.name, '')}"]
        if self.unreadable is not None:
            lines.append("its memories, unknown here, are kept")
        if self.whole_bank:
            lines.append(f"memory bank {self.bank}: removed whole, with the {self.listed} memories this release "
                         "lists (no other release uses it)")
        elif self.table_unreadable is not None:
            lines.append(f"memory bank {self.bank}: its reference table cannot be read ({self.table_unreadable}), so "
                         f"its {self.listed} memories are kept; `memory3 release gc` then removes those no other "
                         "release lists")
        elif self.unknown_tables:
            lines.append(f"memory bank {self.bank}: its {self.kept} memories are kept, as "
                         f"{_unreadable_tables(self.unknown_tables)}; then `memory3 release gc` removes those no "
                         "release lists")
        elif self.bank is not None:
            n = len(self.memory_keys)
            lines.append(f"memory bank {self.bank}: {n} {'memory' if n == 1 else 'memories'} only this release "
                         f"lists; {self.kept} kept" + (f", listed by {', '.join(self.listed_by)} too"
                                                       if self.listed_by else ""))
        if self.shard_keys:
            lines.append(f"the shards of its index and reference table kept in the store: {len(self.shard_keys)} "
                         "objects")
        if self.derived:
            lines.append(f"derived from it, and unaffected: {', '.join(self.derived)}")
        return "\n".join(lines)


def _unreadable_tables(tables: dict[str, str]) -> str:
    """The releases whose reference tables cannot be read (name to why), and what to do about them."""
    return (f"the reference tables of {', '.join(tables)} cannot be read ("
            + "; ".join(f"{name}: {why}" for name, why in tables.items())
            + f"), so which memories they list is unknown: delete them (`memory3 release delete {next(iter(tables))}`"
            "; their memories are kept) or restore their tables")


def plan_deletion(store: ObjectStore, name: str) -> DeletionPlan:
    """Reads the catalog and, where other releases share the bank, what each release of that bank
    lists (listed.py: its `memory_ids.npy`, or its reference table), one at a time: the release's
    ids are held (about 32 bytes a memory), with those of one other release while it is compared."""
    check_release_name(name)
    planned_at = time.monotonic()
    catalog = read_catalog(store)
    mine = next((m for m in catalog.published if m.name == name), None)
    if mine is None:
        if name not in catalog.unpublished and name not in catalog.unreadable:
            names = [m.name for m in catalog.published]
            raise ReleaseNotFound(f"release {name!r} is not in bucket {store.bucket!r} (releases there: "
                                  f"{', '.join(names) or 'none'})")
        keys, running = _release_keys(store, name)
        if running:
            raise ReleaseBusy(f"release {name!r} is being published by {running[0].describe()}; nothing was "
                              "deleted. Wait for it to finish, or stop it: its lease then expires "
                              f"{LEASE_TTL_S:.0f} s after its last heartbeat ({running[0].expiry()})")
        # Its own objects only: what memories it lists is unknown, and they stay.
        return DeletionPlan(name, published=False, release_keys=keys, unreadable=catalog.unreadable.get(name),
                            planned_at=planned_at)
    _refuse_while_unknown(store, catalog, may_list=f"memories of {name!r}", done="deleted", besides=name)
    others = [m for m in catalog.published if m.name != name]
    plan = DeletionPlan(name, published=True, release_keys=_release_keys(store, name)[0],
                        bank=mine.memory_bank["bank"], derived=[m.name for m in others if m.parent == name],
                        listed=int(mine.memory_bank["count"]), planned_at=planned_at)
    for file_sha256 in sorted(_sharded_files(mine) - set().union(*(_sharded_files(m) for m in others))):
        plan.shard_keys += store.list_keys(shards_dir(file_sha256))
    sharing = [m for m in others if m.memory_bank["bank"] == plan.bank]
    if not sharing:
        plan.whole_bank = True
        return plan
    _plan_memories(store, plan, mine, sharing)
    return plan


def _release_keys(store: ObjectStore, name: str) -> tuple[list[str], list[Lease]]:
    """The objects under the name that a deletion removes, and the live publication leases there,
    which it never removes. Listed before the leases are looked for: a publication of the name that
    begins under the maintenance lease writes its lease, then waits for the removal to end, and that
    lease is either seen live, or written after the listing. Removed, it would leave the name free to
    a second publisher, and fail the first at its end."""
    keys = store.list_keys(release_key(name, ""))
    running = live_leases(store, name)
    live = {lease.key for lease in running}
    return [key for key in keys if key not in live], running


def _plan_memories(store: ObjectStore, plan: DeletionPlan, mine: Manifest, sharing: list[Manifest]) -> None:
    """Of the memories `mine` lists, those that no release of `sharing` (its bank's others) lists go.
    None goes while a reference table, its own or another's, cannot be read: which memories it lists
    is unknown. Only the memories `mine` lists are held, with those of the others among them."""
    try:
        own = read_listed(store, mine)
    except UnreadableTable as e:
        plan.table_unreadable, plan.kept = e.why, plan.listed
        return
    listed = Listed(own.bank)
    for other in sharing:
        try:
            also = own & read_listed(store, other)
        except UnreadableTable as e:
            plan.unknown_tables[other.name] = e.why
            continue
        if len(also):
            plan.listed_by.append(other.name)
            listed |= also
    if plan.unknown_tables:
        plan.kept = len(own)
        return
    plan.memory_keys = sorted((own - listed).keys())
    plan.kept = len(listed)


REMOVAL_BATCH = 1000  # keys per deletion request (S3's limit); the lease is checked before each
LISTING_CHUNK = 1 << 16  # keys of a bank's listing checked against the releases' at a time


class _Removal:
    """Removes keys a batch at a time, each only once `Maintenance.check_held` passed, and counts
    them: a removal whose lease lapsed stops before its next batch, and says what it removed
    (`left(removed)`: what it did, what is left and what to run again)."""

    def __init__(self, store: ObjectStore, under: Maintenance, left: Callable[[int], str]) -> None:
        self.store, self.under, self.left = store, under, left
        self.removed = 0

    def remove(self, keys: Iterable[str], progress: Callable[[int], None] | None = None) -> int:
        """Removes `keys`, read as it goes (a bank's listing: memory stays flat); `progress` gets the
        count this call removed so far after each batch. Returns that count."""
        keys, count = iter(keys), 0
        while batch := list(itertools.islice(keys, REMOVAL_BATCH)):
            self.under.check_held(lambda: self.left(self.removed))
            done = self.store.remove_keys(batch)
            self.removed, count = self.removed + done, count + done
            if progress is not None:
                progress(count)
        return count


def delete_release(store: ObjectStore, plan: DeletionPlan, under: Maintenance, *,
                   log: Callable[[str], None] = lambda _: None, progress: Callable[[int], None] | None = None) -> int:
    """Carries out `plan`, made `under` the maintenance lease: manifest, then the release's other
    objects, then its memories, whose count removed so far `progress` gets at every 1000. Returns
    how many objects were removed. Each batch is removed only while the lease holds: once it lapsed,
    a publication may have taken the name (unpublished by then) or listed its memories, and this
    stops with MaintenanceLapsed, saying what it removed."""
    under.check_covers(plan.planned_at)
    manifest = release_key(plan.name, MANIFEST_FILE)
    removal = _Removal(store, under, lambda removed: _deletion_left(plan, removed))
    if manifest in plan.release_keys:
        removal.remove([manifest])  # from here on no reader opens it
        log(f"release {plan.name!r} unpublished (manifest removed)")
    removal.remove(k for k in plan.release_keys if k != manifest)
    removal.remove(plan.shard_keys)
    if plan.whole_bank:
        log(f"removing memory bank {plan.bank}")
        removal.remove(store.iter_keys(f"{MEMORIES_PREFIX}{plan.bank}/"), progress)
    elif plan.memory_keys:
        log(f"removing {len(plan.memory_keys)} of the memories in bank {plan.bank}")
        removal.remove(plan.memory_keys, progress)
    return removal.removed


def _deletion_left(plan: DeletionPlan, removed: int) -> str:
    """What a deletion that stopped after `removed` objects did, and what to run then. Once its first
    object is gone the name is free, and a publication may have published it anew: that release is
    not to be deleted."""
    if removed == 0:
        return f"Nothing was removed: run `memory3 release delete {plan.name}` again."
    what = "its manifest first (it is unpublished)" if plan.published or plan.unreadable is not None else \
        "of its leftovers"
    return (f"It removed {removed} objects of release {plan.name!r}, {what}; the rest stay, memories included. "
            f"If `memory3 release list` shows {plan.name!r} published, it was published anew since then: leave "
            f"it. Otherwise run `memory3 release delete {plan.name}` again, then `memory3 release gc` for the "
            "memories no release lists.")


UNLISTED = "the memories no published release lists"  # what `release gc` removes


@dataclass
class CollectionPlan:
    """Memories no published release lists, which `release gc` removes: whole banks that no release
    uses (`banks`, with how many objects each holds), and in the banks in use the keys none of their
    releases lists (`keys`, by bank). Failed or cancelled publications leave them; a retry of the same
    publication would reuse them, as keys are content hashes. `skipped`: banks left whole, as a
    release using them has a reference table that cannot be read (by bank, release name to why).
    `shards`: the objects kept in the store for the shards of index files and reference tables
    (file_shards.py), by the file's sha256: all of them for a file no published release has, else the
    bytes no pointer names and the shards of a count the text services do not serve, when told which."""

    banks: dict[str, int] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    shards: dict[str, list[str]] = field(default_factory=dict)
    unkept_counts: list[int] = field(default_factory=list)  # counts said to be served that no published file has
    planned_at: float = 0.0  # monotonic time its reading of the bucket began

    @property
    def count(self) -> int:
        return sum(self.banks.values()) + sum(len(k) for k in self.keys.values()) + \
            sum(len(k) for k in self.shards.values())

    def summary(self) -> str:
        lines = [f"memory bank {bank}: no release uses it; its {n} objects go" for bank, n in self.banks.items()]
        lines += [f"memory bank {bank}: {len(keys)} memories no release lists" for bank, keys in self.keys.items()]
        lines += [f"memory bank {bank}: left whole, as {_unreadable_tables(tables)}; then run this again"
                  for bank, tables in self.skipped.items()]
        lines += [f"shards of file {sha[:12]}…: {len(keys)} objects go ({_by_count(keys)})"
                  for sha, keys in self.shards.items()]
        lines += [f"warning: no published release has shards of {n} kept: if the text services serve another "
                  "count, its shards go (check --shard-counts)" for n in self.unkept_counts]
        return "\n".join(lines) or "every memory in the bucket is listed by a published release: nothing to remove"


def _by_count(keys: list[str]) -> str:
    """How many of a file's shard objects are of each count: `4 shards: 8, 8 shards: 1`."""
    counts = Counter(shard_count_of(key) for key in keys)
    parts = [f"{n} shards: {counts[n]}" for n in sorted(c for c in counts if c is not None)]
    if None in counts:
        parts.append(f"other: {counts[None]}")
    return ", ".join(parts)


def plan_collection(store: ObjectStore, served_shard_counts: Collection[int] | None = None) -> CollectionPlan:
    """Lists every bank (one listing of each: this is the one command that does), and reads the
    reference tables of the releases that use it. Refused, as a deletion is, while a release is
    being published, left half-written or unreadable: it may list any memory. A bank used by a
    release whose reference table cannot be read is left whole (`skipped`), and the others done.
    `served_shard_counts`: the N of the text services' `--index-shard I/N`; the shards of other counts
    kept for published releases' files go too (None: every count stays)."""
    planned_at = time.monotonic()
    catalog = read_catalog(store)
    _refuse_while_unknown(store, catalog, may_list=UNLISTED, done="removed")
    plan = CollectionPlan(planned_at=planned_at)
    listed_by_bank: dict[str, Listed] = {}
    for manifest in catalog.published:
        bank = manifest.memory_bank["bank"]
        try:
            listed = read_listed(store, manifest)
        except UnreadableTable as e:
            plan.skipped.setdefault(bank, {})[manifest.name] = e.why
            listed = Listed(bank)
        listed_by_bank[bank] = listed_by_bank[bank] | listed if bank in listed_by_bank else listed
    for prefix in store.list_keys(MEMORIES_PREFIX, recursive=False):
        bank = prefix[len(MEMORIES_PREFIX):].strip("/")
        if bank in plan.skipped:
            continue
        keys = store.iter_keys(f"{MEMORIES_PREFIX}{bank}/")
        listed = listed_by_bank.get(bank)
        if listed is None:
            plan.banks[bank] = sum(1 for _ in keys)
        else:
            unlisted: list[str] = []
            while part := list(itertools.islice(keys, LISTING_CHUNK)):  # the bank's listing is never held whole
                unlisted += listed.unlisted(part)
            if unlisted:
                plan.keys[bank] = unlisted
    sharded = set().union(*(_sharded_files(m) for m in catalog.published))
    kept_counts: set[int] = set()
    for file_sha256 in kept_files(store):
        if file_sha256 not in sharded:
            keys = store.list_keys(shards_dir(file_sha256))
        else:
            unserved = []
            if served_shard_counts is not None:
                by_count = shards_by_count(store, file_sha256)
                unserved = [key for n, keys in by_count.items() if n not in served_shard_counts for key in keys]
                kept_counts.update(n for n, keys in by_count.items() if any(k.endswith(".json") for k in keys))
            keys = list(dict.fromkeys([*unnamed_bytes(store, file_sha256), *unserved]))
        if keys:
            plan.shards[file_sha256] = keys
    # A count typed wrong finds none of its shards, and every served count's go: said in the plan.
    plan.unkept_counts = sorted(set(served_shard_counts or ()) - kept_counts)
    return plan


def _sharded_files(manifest: Manifest) -> set[str]:
    """The sha256 of the release's files whose shards the store may keep (file_shards.py)."""
    return {meta["sha256"] for file, meta in manifest.files.items() if file in (INDEX_FILE, REFERENCES_FILE)}


def collect_unlisted(store: ObjectStore, plan: CollectionPlan, under: Maintenance, *,
                     log: Callable[[str], None] = lambda _: None, progress: Callable[[int], None] | None = None) -> int:
    """Carries out `plan`, made `under` the maintenance lease (a publication that began since waits
    for it). Returns how many objects were removed; `progress` gets that count so far after each
    batch. Each batch is removed only while the lease holds: once it lapsed, a publication that did
    not wait may list memories the plan removes, and this stops with MaintenanceLapsed."""
    under.check_covers(plan.planned_at)
    removal = _Removal(store, under, lambda removed: (
        f"It removed {removed} of the {plan.count} objects it planned to; the others stay: run `memory3 release gc` "
        "again (it plans anew, and keeps what releases published since list)."))
    report = None if progress is None else (lambda _count: progress(removal.removed))
    for bank in plan.banks:
        log(f"removing memory bank {bank}")
        removal.remove(store.iter_keys(f"{MEMORIES_PREFIX}{bank}/"), report)
    for bank, keys in plan.keys.items():
        log(f"removing {len(keys)} memories of bank {bank}")
        removal.remove(keys, report)
    for file_sha256, keys in plan.shards.items():
        log(f"removing the shards of file {file_sha256}")
        removal.remove(keys, report)
    return removal.removed


def _refuse_while_unknown(store: ObjectStore, catalog: Catalog, *, may_list: str, done: str,
                         besides: str | None = None) -> None:
    """ReleaseBusy while releases other than `besides` have memories this cannot know: being published,
    left half-written, or unreadable. `may_list` says which memories are at stake, `done` what was not."""
    if catalog.unreadable:
        raise ReleaseBusy(
            f"the manifests of releases {', '.join(catalog.unreadable)} cannot be read, so which memories they list "
            f"is unknown; nothing was {done}. Delete them first (their memories are kept), or fix them ("
            + "; ".join(f"{n}: {why}" for n, why in catalog.unreadable.items()) + ")")
    pending = [n for n in catalog.unpublished if n != besides]
    running = {n: leases[0] for n in pending if (leases := live_leases(store, n))}
    if running:
        raise ReleaseBusy(
            f"releases {', '.join(running)} are being published and may list {may_list}, so nothing was {done}: "
            "wait until they are published. A publisher that was stopped never finishes: its lease expires "
            f"{LEASE_TTL_S:.0f} s after its last heartbeat, and this can be run again then ("
            + "; ".join(f"{n}: by {lease.describe()}; {lease.expiry()}" for n, lease in running.items()) + ")")
    if pending:
        raise ReleaseBusy(
            f"releases {', '.join(pending)} have no manifest and no publication running: left half-written. "
            f"They may list {may_list}, so nothing was {done}. Delete their leftovers first "
            f"(`memory3 release delete {pending[0]}`)")
