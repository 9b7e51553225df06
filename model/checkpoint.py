"""Checkpoints: `config.json` + `model.safetensors` (+ `tokenizer.json`). Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from .config import ConfigError, Memory3Config
from .model import RotaryEmbedding, Transformer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is."""


def save_checkpoint(model: Transformer, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_FILE, model.state_dict().items(),
                      metadata={"format": "pt", "config": model.config.to_json()})
    (path / CONFIG_FILE).write_text(model.config.to_json() + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(str(path / TOKENIZER_FILE))
    return path


# safetensors' names of the dtypes a checkpoint holds.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of `tensors`, wherever they live, holding one of them in host memory at a time.

    safetensors' `save_file` wants every tensor in host memory at once: saving a model trained on a
    GPU would copy all its weights (and an optimizer's moments, twice their size) to the host first,
    ~8 bytes a parameter for a checkpoint, more than a trainer's pod is given for a large preset.
    The file is the one `save_file` writes (same header, order and alignment), so any safetensors
    reader opens it.
    """
    named = sorted(tensors, key=lambda item: (-item[1].element_size(), item[0]))  # largest items first: aligned
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in named:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, tensor in named:
            host = tensor.detach().contiguous().cpu()  # this tensor's copy alone (none for a host tensor)
            f.write(host.reshape(-1).view(torch.uint8).numpy().data)  # (numel * element_size,) bytes
            del host
    return path


def load_config(path: str | Path) -> Memory3Config:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a checkpoint directory needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    return Memory3Config.from_file(file)


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Build the model on the meta device and assign the stored tensors (no double allocation)."""
    config = load_config(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    check_device(device)
    try:
        state = load_file(str(weights), device=str(device))
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from e
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match config {config.name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, param in model.state_dict().items():
        if state[name].shape != param.shape:
            raise CheckpointError(f"{weights}: {name} has shape {tuple(state[name].shape)}, "
                                  f"config expects {tuple(param.shape)}")
    _check_saved_config(config, metadata.get("config"), weights)
    dtypes = {t.dtype for t in state.values()}
    if any(not d.is_floating_point for d in dtypes) or (dtype is None and len(dtypes) > 1):
        raise CheckpointError(f"{weights} holds tensors of {sorted(map(str, dtypes))}: a checkpoint's weights are "
                              "of one floating-point type (or load it with a dtype to convert them to)")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.rope = RotaryEmbedding(config.head_dim, config.rope_theta)  # rebuilt off the meta device
    return model.eval()


def _check_saved_config(config: Memory3Config, saved: str | None, weights: Path) -> None:
    """The config the weights were saved with (their metadata) is the one beside them: conventions
    that keep every shape (memory layers, chunk and reference lengths, RoPE) would otherwise load
    silently, and serving would disagree with training."""
    if saved is None:  # weights written by another tool
        return
    try:
        theirs = Memory3Config.from_json(saved).to_dict()
    except ConfigError as e:
        raise CheckpointError(f"the config {weights.name} was saved with cannot be read: {e}") from e
    ours = config.to_dict()
    differ = sorted(k for k in ours if k not in ("name", "extra") and ours[k] != theirs.get(k))
    if differ:
        raise CheckpointError(f"{CONFIG_FILE} disagrees with the config {weights.name} was saved with, on "
                              + ", ".join(f"{k} ({ours[k]!r} here, {theirs.get(k)!r} there)" for k in differ))


def check_device(device: str | torch.device) -> None:
    """A CUDA device this machine has: without it, safetensors' error would blame the weights file."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise CheckpointError("CUDA is not available on this machine; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CheckpointError(f"there is no CUDA device {device.index} on this machine (it has "
                              f"{torch.cuda.device_count()}); use --device cuda:0 or --device cpu")


def load_tokenizer(path: str | Path) -> Tokenizer:
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: this checkpoint carries no tokenizer")
    return Tokenizer.from_file(str(file))


def weights_digest(model: Transformer) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order.

    Identifies the weights independently of file layout, so a model reloaded from a release
    hashes the same as the model that was saved.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
