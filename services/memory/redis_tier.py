"""The shared hot tier: Redis, one key per memory, optional.

Layout and policy:

- One key per memory, `KEY_PREFIX + <bank key>` (e.g. `memory3:memories/<bank>/ab/ab12…`), whose
  value is the whole blob, header and payload together. Splitting them over two keys lets
  eviction drop one half (LMCache's Redis connector hit exactly this). The bank key comes from
  the release manifest and is content addressed (weights, codec, format version, reference id),
  so replicas and releases that share a bank share cache entries, and any copy is valid.
- Every value is written with a TTL (`ttl_s`; 0 = none). The server should evict with
  `maxmemory-policy allkeys-lru`: every key is a re-readable copy of the bank. Under
  `noeviction` a full Redis refuses writes; reads keep working and a warning is logged.
- Redis is an optimisation, never a dependency: socket timeouts are short (0.2 s), redis-py's
  own retries are off, and after a failure the tier is marked down (logged once) and skipped,
  with a retry after an exponential backoff. Callers then read through to the object store. A
  timeout bounds a whole reply (and a whole send), so reads and writes go in parts of at most
  PART_BYTES (from the memories' size, `value_bytes`): 64 memories of the paper's size in bf16 are
  29 MB, which a healthy Redis behind a 1 Gb/s link cannot deliver in 0.2 s, and it was marked
  down. At most `max_concurrency` calls reach Redis at once (the others wait their turn): past
  redis-py's 100 connections the pool itself refused, and a healthy Redis was marked down at the
  busiest moment. A Redis that answers but refuses a read (an ACL without `memory3:*` keys, a
  read-only replica, a Cluster node behind a plain URL) is treated as down too; at start,
  `check_usable` turns these into a configuration error that says what to fix.
- One server, the primary that Sentinel names, or a Cluster (`redis_url`). Sentinel: a failover
  marks the tier down until the backoff's retry, whose new connection goes to the new primary.
  Cluster: keys spread over slots, so reads are one MGET per slot (`mget_nonatomic`) instead of
  pipelined MGETs, which a cluster refuses across slots.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from redis.exceptions import ClusterError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..rpc.metrics import MEMORY_TIER_ERRORS
from .redis_url import CLUSTER, connect, parse_redis_url

log = logging.getLogger("memory3.memory")
KEY_PREFIX = "memory3:"
# Keys per MGET: a batch of 1024 bf16 memories at the paper's shape is ~460 MB; in pieces (sent
# in one pipelined round trip) no single reply monopolises Redis or the socket buffers.
MGET_KEYS = 64
# Bytes of values per MGET reply, and per pipeline of SETs: each must arrive (or go) within the socket
# timeout, which at 20 MB/s it does.
PART_BYTES = 4 << 20
# Concurrent calls to Redis: below redis-py's pool of 100 connections.
MAX_CONCURRENCY = 64
# A cluster without a primary for a slot (ClusterDownError) is down, not full.
_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, ClusterError, RedisClusterException)


class RedisUnusable(ValueError):
    """A Redis URL the tier cannot use, however long it waits."""


class RedisTier:
    def __init__(self, url: str, *, password: str | None = None, ttl_s: int = 86400, socket_timeout: float = 0.2,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0, value_bytes: int = 0,
                 max_concurrency: int = MAX_CONCURRENCY, clock: Callable[[], float] = time.monotonic) -> None:
        """`value_bytes`: the size of one memory's blob (0: unknown), which sizes the parts of a call."""
        if ttl_s < 0:
            raise ValueError(f"the Redis TTL must be >= 0 seconds (0 = no expiry), got {ttl_s}")
        if value_bytes < 0 or max_concurrency < 1:
            raise ValueError("value_bytes must be >= 0 and max_concurrency >= 1")
        self.target = parse_redis_url(url, password=password)  # password: as is, when the URL holds none
        self.where, self.ttl_s = self.target.redacted(), ttl_s
        self.keys_per_part = max(1, min(MGET_KEYS, PART_BYTES // value_bytes)) if value_bytes else MGET_KEYS
        self._slots = asyncio.Semaphore(max_concurrency)
        self.client = connect(self.target, socket_timeout=socket_timeout)
        self._backoff_s, self._max_backoff_s, self._clock = backoff_s, max_backoff_s, clock
        self.up = True
        self._delay = backoff_s
        self._down_at = self._retry_at = 0.0  # when the tier last went down (or failed a retry), and retries
        self._warned_full = False

    @staticmethod
    def key(memory_key: str) -> str:
        return KEY_PREFIX + memory_key

    def should_try(self) -> bool:
        """Up, or down with its backoff elapsed (the next call is the retry)."""
        return self.up or self._clock() >= self._retry_at

    def _down(self, what: str, exc: BaseException, started: float) -> None:
        """Redis failed a call `started` (clock time) then. The backoff doubles once per failed retry: calls
        already in flight when the tier went down fail with it, and each doubled it, so that one blip under
        load (a Sentinel failover) took Redis out for the longest backoff at once, on every replica."""
        MEMORY_TIER_ERRORS.labels(tier="redis").inc()
        if self.up:
            log.warning("Redis at %s unavailable (%s: %s); serving from the object store, retrying in %.1fs",
                        self.where, what, exc, self._delay)
        elif started <= self._down_at:
            return  # the failure that marked it down, seen again
        else:
            self._delay = min(self._delay * 2, self._max_backoff_s)
        self.up = False
        self._down_at = self._clock()
        self._retry_at = self._down_at + self._delay

    def _ok(self) -> None:
        if not self.up:
            log.info("Redis at %s is back", self.where)
        self.up, self._delay = True, self._backoff_s

    async def ping(self) -> bool:
        """Check the connection now (readiness, stats); updates the tier's state. A refusal (an ACL
        granting the tier's commands but not PING) is an answer: Redis is up, and what the tier
        does is checked by `check_usable` and by every request."""
        started = self._clock()
        try:
            await self.client.ping()
        except _DOWN_ERRORS as e:
            self._down("ping", e, started)
            return False
        except ResponseError:
            pass
        self._ok()
        return True

    async def check_policy(self) -> str | None:
        """Warn when the server would refuse writes when full; managed Redis may forbid CONFIG."""
        try:
            policy = (await self.client.config_get("maxmemory-policy")).get("maxmemory-policy")
        except RedisError:
            return None
        if policy == "noeviction":
            log.warning("Redis at %s has maxmemory-policy noeviction: when full it refuses new memories; "
                        "set maxmemory-policy allkeys-lru", self.where)
        return policy

    async def check_usable(self) -> None:
        """Raises RedisUnusable where Redis answers but refuses what the tier does. Run at start, once
        it answered: a URL that can never work should fail there, not as an error per request."""
        started = self._clock()
        try:
            await self._probe()
        except _DOWN_ERRORS as e:  # down after its PING: as at start, the tier is down for now, never fatal
            self._down("probe", e, started)

    async def _probe(self) -> None:
        if self.target.mode != CLUSTER:
            try:
                cluster = (await self.client.info("cluster")).get("cluster_enabled")
            except ResponseError:  # INFO forbidden to this user: the probe below still runs
                cluster = None
            if cluster:
                raise RedisUnusable(f"Redis at {self.where} is a Cluster node: give the cluster as "
                                    f"redis+cluster://HOST:PORT[,HOST:PORT…] (--redis-url or MEMORY3_REDIS_URL)")
        probe = self.key(f"probe/{uuid.uuid4().hex}")
        try:
            await self.client.set(probe, b"1", ex=10)
            await self.client.mget([probe])
            await self.client.delete(probe)
        except ResponseError as e:
            if str(e).startswith("OOM"):  # full under noeviction: reads still work (check_policy warns)
                return
            raise RedisUnusable(f"Redis at {self.where} refuses the memory tier's commands on {KEY_PREFIX}* keys "
                                f"({e}): grant its user those keys and GET, SET, MGET, DEL, or point --redis-url "
                                "(or MEMORY3_REDIS_URL) at the primary; without either the service reads the object "
                                "store") from e

    async def mget(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """Values for bank keys (None per miss), pipelined in one round trip; None if the tier is down."""
        if not self.should_try():
            return None
        names = [self.key(k) for k in keys]
        async with self._slots:
            if not self.should_try():  # marked down while this call waited its turn
                return None
            started = self._clock()
            try:
                if self.target.mode == CLUSTER:
                    values = await self.client.mget_nonatomic(names)
                else:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for start in range(0, len(names), self.keys_per_part):
                            pipe.mget(names[start:start + self.keys_per_part])
                        values = [value for part in await pipe.execute() for value in part]
            except (*_DOWN_ERRORS, RedisError) as e:  # refused (NOPERM, CROSSSLOT): as unusable as down
                self._down("get", e, started)
                return None
        self._ok()
        return values

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> bool:
        """Write blobs with the TTL, pipelined; False (and logged) if Redis did not take them."""
        if not items or not self.should_try():
            return False
        started = self._clock()
        try:
            async with self._slots:
                for part in _parts(items):  # one pipeline each: a send must go within the socket timeout
                    if not self.should_try():
                        return False
                    async with self.client.pipeline(transaction=False) as pipe:
                        for key, blob in part:
                            pipe.set(self.key(key), blob, ex=self.ttl_s or None)
                        await pipe.execute()
        except _DOWN_ERRORS as e:
            self._down("set", e, started)
            return False
        except ResponseError as e:  # e.g. OOM under noeviction: Redis is up, just full
            MEMORY_TIER_ERRORS.labels(tier="redis").inc()
            if not self._warned_full:
                log.warning("Redis at %s refused a write (%s); memories are served without caching them",
                            self.where, e)
                self._warned_full = True
            return False
        self._ok()
        return True

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys or not self.should_try():
            return
        started = self._clock()
        try:
            async with self._slots:
                await self.client.delete(*[self.key(k) for k in keys])
        except (*_DOWN_ERRORS, RedisError) as e:  # READONLY on a replica: the value stays, S3 answers
            self._down("delete", e, started)

    async def close(self) -> None:
        await self.client.aclose()


def _parts(items: Sequence[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """`items` in runs of at most PART_BYTES of values (a larger value alone)."""
    parts: list[list[tuple[str, bytes]]] = []
    size = PART_BYTES
    for item in items:
        if size + len(item[1]) > PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += len(item[1])
    return parts
