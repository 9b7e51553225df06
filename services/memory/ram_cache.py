"""The in-process tier: an LRU of validated blobs, bounded by bytes rather than entries.

Blobs differ in size by codec (about 40 KB for VQ to 450 KB for bf16 at the paper's shape), so a
count bound would say nothing about memory use. Only validated blobs are inserted, so a hit needs
no second check. A blob larger than the whole budget is not cached (it would evict everything).
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class RamCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the RAM cache size must be >= 0 bytes (0 disables it), got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the engine calls from the event loop, tools and tests from threads

    def get(self, key: str) -> bytes | None:
        with self._lock:
            blob = self._items.get(key)
            if blob is not None:
                self._items.move_to_end(key)
            return blob

    def put(self, key: str, blob: bytes) -> bool:
        """Insert (or refresh) `key`, evicting least recently used entries; False if it cannot fit."""
        size = len(blob)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)
            self._items[key] = blob
            self._bytes += size
            return True

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

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
