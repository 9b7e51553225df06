"""The release manifest: the contract between the trainer and the services.

A release is immutable and lives under `releases/<name>/`. Its manifest is written last; a reader
trusts a release only when the manifest exists, its format is known, and every file it lists
matches its sha256. Memories live in a content-addressed bank shared by releases with the same
model weights and codec: `memories/<bank>/<id[:2]>/<id>`, where the key is derived from the
reference id, so no reader ever lists the bucket.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RELEASE_FORMAT = 1
RELEASES_PREFIX = "releases/"
MEMORIES_PREFIX = "memories/"
MANIFEST_FILE = "manifest.json"  # under releases/<name>/; a release exists once it does
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ReleaseError(ValueError):
    pass


class ReleaseNotFound(ReleaseError):
    pass


class ReleaseExists(ReleaseError):
    pass


def check_release_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ReleaseError(f"invalid release name {name!r}: use 1-63 of a-z, 0-9, '.', '_', '-' "
                           "starting with a letter or digit")
    return name


def release_key(name: str, file: str) -> str:
    return f"{RELEASES_PREFIX}{name}/{file}"


def bank_id(weights_digest: str, codec_fingerprint: bytes, memory_format: int) -> str:
    return hashlib.sha256(f"{weights_digest}:{codec_fingerprint.hex()}:{memory_format}".encode()).hexdigest()[:20]


def memory_key(bank: str, reference_id: str) -> str:
    return f"{MEMORIES_PREFIX}{bank}/{reference_id[:2]}/{reference_id}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of_file(path: Path) -> str:
    """A file's sha256, read in chunks (hashlib.file_digest): never the whole file in memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Manifest:
    name: str
    created: str
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"}
    conventions: dict[str, Any]  # memory layers, tokens kept, chunk length, prefix, positions, codec
    memory_bank: dict[str, Any]  # {"bank", "key_scheme", "count", "bytes", "codec", "format_version"}
    index: dict[str, Any]  # {"embedder", "dim", "type", "count", "kind", "choice"} (the last two may be absent)
    provenance: dict[str, Any]  # seed, steps, commit, parent, pipeline config
    parent: str | None = None
    format: int = RELEASE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """The manifest in `text`; ReleaseError, as for invalid JSON, for one of another shape, so
        that a damaged manifest is listed as unreadable (and can be deleted) instead of failing
        whatever reads a field of it."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReleaseError(f"manifest is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ReleaseError(f"manifest is a JSON {type(data).__name__}, not an object")
        if data.get("format") != RELEASE_FORMAT:
            raise ReleaseError(f"release format {data.get('format')!r} is not supported (this build reads "
                               f"{RELEASE_FORMAT})")
        _check_shape(data)
        try:
            return cls(**data)
        except TypeError as e:
            raise ReleaseError(f"manifest fields do not match release format {RELEASE_FORMAT}: {e}") from e


# The fields every reader of a manifest relies on, with their JSON types ("created" is an ISO date).
_FIELDS = {"name": str, "created": str, "files": dict, "conventions": dict, "memory_bank": dict, "index": dict,
           "provenance": dict}
_NESTED = {"memory_bank": {"bank": str, "count": int, "bytes": int, "codec": str},
           "index": {"embedder": str, "dim": int, "type": str, "count": int}}
_FILE = {"sha256": str, "bytes": int}


def _check_shape(data: dict) -> None:
    """ReleaseError naming the first field of a manifest that is missing or of the wrong type."""
    def check(where: str, value: Any, kind: type) -> None:
        if value is None:
            raise ReleaseError(f"manifest field {where} is missing")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ReleaseError(f"manifest field {where} is {repr(value)[:40]}, not a JSON {_JSON_TYPES[kind]}")
    for key, kind in _FIELDS.items():
        check(key, data.get(key), kind)
    for key, fields in _NESTED.items():
        for field_name, kind in fields.items():
            check(f"{key}.{field_name}", data[key].get(field_name), kind)
    for file, meta in data["files"].items():
        _check_file_name(file)
        check(f"files[{file!r}]", meta, dict)
        for field_name, kind in _FILE.items():
            check(f"files[{file!r}].{field_name}", meta.get(field_name), kind)
    if data.get("parent") is not None:
        check("parent", data["parent"], str)


_JSON_TYPES = {str: "string", int: "integer", dict: "object"}
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")


def _check_file_name(file: str) -> None:
    """A file name is a relative path below the release, as readers join it to their local copy's
    directory: an absolute one, or one climbing out with '..', would be written anywhere the reader
    may write (AWS S3 takes such keys)."""
    if not _FILE_NAME.match(file):
        raise ReleaseError(f"manifest field files[{file[:80]!r}] is not a file of the release: file names are "
                           "relative paths of letters, digits, '.', '_' and '-', no part starting with '.'")
