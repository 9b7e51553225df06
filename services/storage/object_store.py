"""The object store (S3 or MinIO), through the `minio` client.

Errors are translated into two domain errors so callers never see urllib3 or S3 error codes:
`ObjectNotFound` (the key does not exist) and `StoreUnavailable` (the server cannot be reached
or refused the request). Retries are few and short: a caller that needs to survive a store
outage has its own policy.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error
from urllib3.util.retry import Retry


class StoreError(RuntimeError):
    pass


class ObjectNotFound(StoreError):
    pass


class StoreUnavailable(StoreError):
    pass


@dataclass(frozen=True)
class S3Config:
    endpoint: str  # host:port
    access_key: str
    secret_key: str = ""
    bucket: str = "memory3"
    secure: bool = False
    region: str = "us-east-1"  # the bucket's region: AWS signs every request for it
    timeout_s: float = 10.0
    ca_bundle: Path | None = None  # PEM CA certificates trusted for HTTPS, in place of the system's

    def __repr__(self) -> str:  # credentials never reach logs
        return f"S3Config(endpoint={self.endpoint!r}, bucket={self.bucket!r}, secure={self.secure})"


def s3_arguments(s3: S3Config) -> list[str]:
    """The `memory3` command-line arguments that give a child process this store (its credentials go
    in the environment): all of it, or a service on HTTPS ran its jobs over plain HTTP."""
    return ["--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket, "--s3-region", s3.region,
            *(["--s3-secure"] if s3.secure else []),
            *(["--s3-ca-bundle", str(s3.ca_bundle)] if s3.ca_bundle is not None else [])]


class ObjectStore:
    """An S3 bucket. `read_retries`: how often a request whose answer did not come within
    `timeout_s` is sent again (a server that hangs then holds a call that long, times this plus
    one); `connections`: HTTP connections kept per host, one for each thread that calls at once."""

    def __init__(self, config: S3Config, *, read_retries: int = 2, connections: int = 16) -> None:
        self.config = config
        trust = {"cert_reqs": "CERT_REQUIRED", "ca_certs": str(config.ca_bundle)} if config.ca_bundle else {}
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(3.0, config.timeout_s), read=config.timeout_s),
            retries=Retry(total=2, read=read_retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
            maxsize=connections, **trust,
        )
        self.client = Minio(config.endpoint, access_key=config.access_key, secret_key=config.secret_key,
                            secure=config.secure, region=config.region, http_client=http)
        self.bucket = config.bucket

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                raise ObjectNotFound(f"{what}: {e.code} ({self.bucket}/{getattr(e, '_object_name', '')})") from e
            raise StoreUnavailable(f"{what}: the object store refused the request ({e.code}: {e.message})") from e
        except InvalidResponseError as e:
            # Some S3 servers (rclone among them) send error bodies minio cannot parse.
            if "Response code: 404" in str(e):
                raise ObjectNotFound(f"{what}: not found in bucket {self.bucket}") from e
            raise StoreUnavailable(f"{what}: unexpected answer from the object store ({str(e)[:200]})") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise StoreUnavailable(f"{what}: cannot reach the object store at {self.config.endpoint} ({e})") from e

    def ensure_bucket(self) -> None:
        if not self._call("bucket check", self.client.bucket_exists, self.bucket):
            self._call("bucket creation", self.client.make_bucket, self.bucket)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call(f"put {key}", self.client.put_object, self.bucket, key, io.BytesIO(data), len(data),
                   content_type=content_type)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """Upload the file at `path`, streamed (in parts when it is large), never held whole in memory."""
        self._call(f"put {key}", self.client.fput_object, self.bucket, key, str(path), content_type=content_type)

    def size(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFound without one."""
        return self._call(f"stat {key}", self.client.stat_object, self.bucket, key).size

    def get_bytes(self, key: str) -> bytes:
        response = self._call(f"get {key}", self.client.get_object, self.bucket, key)
        try:
            return response.read()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise StoreUnavailable(f"get {key}: connection lost while reading ({e})") from e
        finally:
            response.close()
            response.release_conn()

    def download(self, key: str, out: BinaryIO, *, chunk_bytes: int = 8 << 20) -> str:
        """Stream the object into `out`, a chunk at a time (a release's weights may be gigabytes, and
        `get_bytes` would hold them whole); returns its sha256 (hex)."""
        response = self._call(f"get {key}", self.client.get_object, self.bucket, key)
        digest = hashlib.sha256()
        try:
            for chunk in response.stream(chunk_bytes):
                digest.update(chunk)
                out.write(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise StoreUnavailable(f"get {key}: connection lost while reading ({e})") from e
        finally:
            response.close()
            response.release_conn()
        return digest.hexdigest()

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {key}", self.client.stat_object, self.bucket, key)
            return True
        except ObjectNotFound:
            return False

    def _listed(self, prefix: str, recursive: bool) -> list:
        return self._call(f"list {prefix}", lambda: list(self.client.list_objects(self.bucket, prefix=prefix,
                                                                                  recursive=recursive)))

    def list_keys(self, prefix: str, *, recursive: bool = True) -> list[str]:
        return [o.object_name for o in self._listed(prefix, recursive)]

    def list_ages(self, prefix: str) -> list[tuple[str, float]]:
        """Every key under `prefix` with the seconds since its object was last written."""
        objects, now = self._listed(prefix, True), time.time()
        return [(o.object_name, now - o.last_modified.timestamp() if o.last_modified else 0.0) for o in objects]

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`, a listed page at a time (memory stays flat however many)."""
        objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
        while (item := self._call(f"list {prefix}", next, objects, None)) is not None:
            yield item.object_name

    def remove_keys(self, keys: Iterable[str], *, progress: Callable[[int], None] | None = None) -> int:
        """Removes `keys` (a missing one is no error), 1000 per request (S3's limit), reading `keys`
        as it goes; `progress` gets the count so far at every 1000, and at the end. Returns how many
        were asked for."""
        count = 0

        def objects():
            nonlocal count
            for key in keys:
                count += 1
                if progress is not None and count % 1000 == 0:
                    progress(count)
                yield DeleteObject(key)

        errors = self._call("remove objects", lambda: list(self.client.remove_objects(self.bucket, objects())))
        if progress is not None:
            progress(count)
        if errors:
            first = errors[0]
            raise StoreUnavailable(f"the object store refused to remove {len(errors)} objects "
                                   f"(first: {first.name}: {first.code} {first.message})")
        return count
