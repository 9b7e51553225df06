"""The RAM tier: least recently used entries leave first, and the byte budget is never exceeded."""

import pytest

from memory3.services.memory.ram_cache import RamCache


def test_evicts_least_recently_used_by_bytes():
    cache = RamCache(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")  # 12 bytes > 10: b (least recent) goes
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.bytes == 8 and len(cache) == 2


def test_one_large_entry_evicts_several():
    cache = RamCache(max_bytes=10)
    for key in "abcde":
        cache.put(key, b"12")
    cache.put("big", b"123456789")
    assert [k for k in "abcde" if k in cache] == []  # 9 + 2 > 10: every small entry had to go
    assert cache.bytes == 9 and "big" in cache


def test_replacing_a_key_updates_the_byte_count():
    cache = RamCache(max_bytes=100)
    cache.put("a", b"x" * 40)
    cache.put("a", b"x" * 10)
    assert cache.bytes == 10 and len(cache) == 1
    cache.discard("a")
    assert cache.bytes == 0 and cache.get("a") is None


def test_blob_larger_than_the_budget_is_not_cached_and_evicts_nothing():
    cache = RamCache(max_bytes=10)
    cache.put("a", b"12345")
    assert cache.put("huge", b"x" * 11) is False
    assert "huge" not in cache and cache.get("a") == b"12345"


def test_zero_disables_and_negative_is_rejected():
    cache = RamCache(max_bytes=0)
    assert cache.put("a", b"1") is False and len(cache) == 0
    with pytest.raises(ValueError, match="0 disables"):
        RamCache(max_bytes=-1)
