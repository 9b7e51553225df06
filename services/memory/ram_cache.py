"""The in-process tier: an LRU of validated memories, bounded by bytes rather than entries.

Memories differ in size by codec (about 40 KB for VQ to 450 KB for bf16 at the paper's shape), so
a count bound would say nothing about memory use. Only validated memories are inserted, so a hit
needs no second check. One larger than the whole budget is not cached (it would evict everything).
The memory service keeps blobs here; the decoder keeps decoded memories (`sizeof` tells their size).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class RamCache(Generic[Item]):
    def __init__(self, max_bytes: int, sizeof: Callable[[Item], int] = len) -> None:
        if max_bytes < 0:
            raise ValueError(f"the RAM cache size must be >= 0 bytes (0 disables it), got {max_bytes}")
        self.max_bytes = max_bytes
        self.sizeof = sizeof
        self._items: OrderedDict[str, tuple[Item, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the engine calls from the event loop, tools and tests from threads

    def get(self, key: str) -> Item | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: str, item: Item) -> bool:
        """Insert (or refresh) `key`, evicting least recently used entries; False if it cannot fit."""
        size = self.sizeof(item)
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
            self._items[key] = (item, size)
            self._bytes += size
            return True

    def discard(self, key: str) -> None:
        with self._lock:
            self._pop(key)

    def _pop(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes
