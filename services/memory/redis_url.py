"""Which Redis a URL names, and a client for it: one server, the primary that Sentinel names, or a Cluster.

    redis://[[user]:password@]host[:port][/db]                  one server (rediss:// for TLS), as redis-py reads it
    redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service[/db]
                                                                the primary the Sentinels name for `service`
    redis+cluster://[[user]:password@]host[:port][,host[:port]…]   a Redis Cluster, from these seed nodes

`rediss+sentinel://` and `rediss+cluster://` speak TLS to the data nodes. The password is the data
nodes'; Sentinels that require their own take `?sentinel_password=…` (the URL is a secret either way).
A password can also come apart from the URL (`password=`, the memory service's MEMORY3_REDIS_PASSWORD),
as is: no URL escaping, so a generated one with `/`, `+`, `=`, `#`, `@` or `%` needs none. It applies when
the URL holds no password.
redis-py has no URL form for Sentinel or Cluster, so these two schemes are ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, unquote, urlsplit

SERVER, SENTINEL, CLUSTER = "server", "sentinel", "cluster"
_MODES = {"redis": SERVER, "rediss": SERVER, "unix": SERVER, "redis+sentinel": SENTINEL,
          "rediss+sentinel": SENTINEL, "redis+cluster": CLUSTER, "rediss+cluster": CLUSTER}
DEFAULT_PORTS = {SERVER: 6379, SENTINEL: 26379, CLUSTER: 6379}
# The environment variable the memory service reads a Redis password from, apart from the URL.
PASSWORD_ENV = "MEMORY3_REDIS_PASSWORD"


@dataclass(frozen=True)
class RedisTarget:
    url: str = field(repr=False)  # as given: it may hold a password, so never log it (`redacted`)
    mode: str  # SERVER, SENTINEL or CLUSTER
    hosts: tuple[tuple[str, int], ...] = ()  # Sentinels or seed nodes (for SERVER, redis-py reads `url`)
    service: str | None = None  # the Sentinel service name
    db: int = 0
    tls: bool = False
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """Where it points, without credentials, for logs."""
        parts = urlsplit(self.url)
        scheme = parts.scheme
        if self.mode == SERVER:
            return f"{scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{hosts}" + (f"/{self.service}/{self.db}" if self.mode == SENTINEL else "")


def parse_redis_url(url: str, *, password: str | None = None) -> RedisTarget:
    """A ValueError that says what to fix, for anything this module cannot connect to. `password`, taken as
    is (not URL-escaped), is the data nodes' when the URL holds none."""
    target = _parse(url)
    if password and target.password is None and not (target.mode == SERVER and urlsplit(url).password):
        target = replace(target, password=password)
    return target


def _parse(url: str) -> RedisTarget:
    scheme, sep, rest = url.partition("://")
    mode = _MODES.get(scheme.lower()) if sep else None
    if mode is None:
        raise ValueError(f"Redis URL {_scheme_only(url)!r}: the scheme must be one of "
                         f"{', '.join(s + '://' for s in _MODES)}")
    if mode == SERVER:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 -- urlsplit checks the port only when asked
        except ValueError as e:
            raise ValueError(f"Redis URL {scheme}://…: {e}") from None
        if scheme != "unix" and not parts.hostname:
            raise ValueError(f"Redis URL {scheme}://…: no host")
        return RedisTarget(url=url, mode=SERVER, tls=scheme == "rediss")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    hosts = tuple(_host_port(item, DEFAULT_PORTS[mode], scheme) for item in hostlist.split(","))
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = sorted(set(options) - {"sentinel_password"})
    if unknown or (mode == CLUSTER and options):
        raise ValueError(f"Redis URL {scheme}://…: unknown option {(unknown or sorted(options))[0]!r}")
    segments = [s for s in path.split("/") if s]
    service, db = None, 0
    if mode == SENTINEL:
        if not segments or len(segments) > 2:
            raise ValueError(f"Redis URL {scheme}://…: name the Sentinel service and optionally the database, "
                             "as /mymaster or /mymaster/0")
        service = segments[0]
        db = _db(segments[1], scheme) if len(segments) == 2 else 0
    elif segments:
        raise ValueError(f"Redis URL {scheme}://…: a Redis Cluster has one database, so the URL takes no path")
    return RedisTarget(url=url, mode=mode, hosts=hosts, service=service, db=db, tls=scheme.startswith("rediss"),
                       username=username, password=password, sentinel_password=options.get("sentinel_password"))


def connect(target: RedisTarget, *, socket_timeout: float):
    """An asyncio client that fails fast: short timeouts, and no retries of redis-py's own (the
    tier marks Redis down and backs off instead)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
              "retry": Retry(NoBackoff(), 0)}
    if target.mode == SERVER:
        # redis-py reads the URL; a password given apart from it (target.password) is passed as such.
        extra = {"password": target.password} if target.password is not None else {}
        return aioredis.Redis.from_url(target.url, **extra, **common)
    auth = {"username": target.username, "password": target.password}
    if target.mode == CLUSTER:
        from redis.asyncio.cluster import ClusterNode

        # MOVED and ASK redirections are followed apart from `retry`: a slot that moved is still read.
        return aioredis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.hosts], ssl=target.tls,
                                     **auth, **common)
    from redis.asyncio.sentinel import Sentinel

    sentinels = Sentinel(list(target.hosts), sentinel_kwargs={**common, "password": target.sentinel_password},
                         ssl=target.tls, **auth, **common)
    return sentinels.master_for(target.service, db=target.db)


def _host_port(item: str, default_port: int, scheme: str) -> tuple[str, int]:
    host, colon, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
    if not host:
        raise ValueError(f"Redis URL {scheme}://…: an empty host in the host list")
    if not colon:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Redis URL {scheme}://…: port {port!r} of {host} is not a port number")
    return host, int(port)


def _db(text: str, scheme: str) -> int:
    if not text.isdigit():
        raise ValueError(f"Redis URL {scheme}://…: database {text!r} is not a number")
    return int(text)


def _scheme_only(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    return f"{scheme}://…" if sep else "(no scheme)"
