"""Model configuration: one serializable dataclass, named presets, and validation.

Kept free of heavy imports (no torch) so services and tools can read a config cheaply.
The memory conventions live here too, because serving must never disagree with training
about them: which layers hold memories, how many tokens each KV head keeps, the chunk length,
how many memories a chunk reads and the reference prefix.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_PREFIX = "<s>Reference:"
SCORE_REDUCTIONS = ("sum", "max")


class ConfigError(ValueError):
    """A model configuration that cannot describe a working model."""


@dataclass(frozen=True)
class Memory3Config:
    name: str = "custom"

    # General size parameters
    vocab_size: int = 512
    n_layer: int = 4
    dim: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # context tokens (reference prefix included), not memory tokens

    # Explicit memory conventions (paper §3). memory_layers=None means "the first half".
    memory_layers: tuple[int, ...] | None = None
    ref_len: int = 128  # tokens per reference, and the width of the shared memory position interval
    mem_tokens_per_head: int = 8  # tokens kept per KV head and memory layer after sparsification
    chunk_len: int = 64  # context tokens per retrieval
    mems_per_chunk: int = 5  # memories read by each chunk
    reference_prefix: str = REFERENCE_PREFIX
    # How the query heads of a GQA group are combined when ranking tokens for sparsification:
    # "sum" adds the attention each query head gives a token (equal to the mean for ranking).
    score_reduction: str = "sum"

    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, never read by the model

    def __post_init__(self) -> None:
        if self.memory_layers is None:
            object.__setattr__(self, "memory_layers", tuple(range(self.n_layer // 2)))
        elif not isinstance(self.memory_layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.memory_layers):
            raise ConfigError(f"invalid config {self.name!r}: memory_layers must be a list of layer numbers, "
                              f"got {self.memory_layers!r}")
        else:
            object.__setattr__(self, "memory_layers", tuple(self.memory_layers))
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def n_memory_layers(self) -> int:
        return len(self.memory_layers)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_kv_head

    @property
    def memory_shape(self) -> tuple[int, int, int, int]:
        """One memory's keys (or values): (memory layers, KV heads, tokens per head, head dim)."""
        return (self.n_memory_layers, self.n_kv_head, self.mem_tokens_per_head, self.head_dim)

    @property
    def mem_slots(self) -> int:
        """Memory tokens a chunk attends to per KV head and memory layer."""
        return self.mems_per_chunk * self.mem_tokens_per_head

    def check_token_ids(self, ids: Iterable[Sequence[int]], what: str) -> None:
        """ValueError naming the first id of `ids` outside the vocabulary: the embedding would raise an
        IndexError, and on a GPU a device-side assert that breaks every later call of the process."""
        for row in ids:
            bad = next((t for t in row if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{what}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    def max_positions(self, prefix_len: int) -> int:
        """RoPE table size: prefix, the shared memory interval, then the context."""
        return prefix_len + self.ref_len + self.max_seq_len

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        problems: list[str] = []
        for name in ("vocab_size", "n_layer", "dim", "n_head", "n_kv_head", "head_dim",
                     "intermediate_size", "max_seq_len", "ref_len", "mem_tokens_per_head",
                     "chunk_len", "mems_per_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or value == float("inf"):
                problems.append(f"{name} must be a positive number, got {value!r}")
        for name in ("reference_prefix", "score_reduction"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string, got {getattr(self, name)!r}")
        if problems:
            raise ConfigError(f"invalid config {self.name!r}: " + "; ".join(problems))
        if self.n_head % self.n_kv_head:
            problems.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.n_head * self.head_dim != self.dim:
            problems.append(
                f"n_head*head_dim must equal dim: {self.n_head}*{self.head_dim} != {self.dim}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.memory_layers:
            problems.append("memory_layers is empty: a Memory3 model reads its memories in at least one layer")
        bad = [i for i in self.memory_layers if not 0 <= i < self.n_layer]
        if bad:
            problems.append(f"memory_layers {bad} out of range [0, {self.n_layer})")
        if list(self.memory_layers) != sorted(set(self.memory_layers)):
            problems.append(f"memory_layers must be sorted and unique, got {list(self.memory_layers)}")
        if self.mem_tokens_per_head > self.ref_len:
            problems.append(
                f"mem_tokens_per_head={self.mem_tokens_per_head} exceeds ref_len={self.ref_len}"
            )
        if self.score_reduction not in SCORE_REDUCTIONS:
            problems.append(f"score_reduction must be one of {SCORE_REDUCTIONS}, got {self.score_reduction!r}")
        if not self.reference_prefix:
            problems.append("reference_prefix must not be empty")
        if problems:
            raise ConfigError(f"invalid config {self.name!r}: " + "; ".join(problems))

    # ---- constructors and serialization ---------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Memory3Config:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory_layers"] = list(self.memory_layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Memory3Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Memory3Config:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Memory3Config:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


PRESETS: dict[str, Memory3Config] = {
    # The paper's Memory3-2.4B (paper §1, App. A).
    "paper-2.4b": Memory3Config(
        name="paper-2.4b", vocab_size=60416, n_layer=44, dim=3200, n_head=40, n_kv_head=8,
        head_dim=80, intermediate_size=3200, max_seq_len=2048, memory_layers=tuple(range(22)),
    ),
    # Demos, CPU benchmarks and `memory3 train`: same conventions, sized so that both training
    # stages fit in minutes on 2 CPU cores (~3.7M non-embedding parameters). Layer 0 must be a
    # memory layer at this depth: its memory values are the references' token embeddings, a direct
    # path for copying a value out of a memory (copying a profession from a one-sentence memory was
    # learned in ~150 steps with layers (0, 1), against a loss near chance after 275 with (1, 2)).
    # Unlike the paper's first half, every layer is one: with the same training run (1500 steps,
    # 150 held-out questions, the right memory alone), exact match was 0.45 with layers (0, 1),
    # 0.83 with (0, 1, 2) and 0.89 with (0, 1, 2, 3); the deeper layers' memory keys have seen more
    # of their reference's context.
    "small": Memory3Config(
        name="small", vocab_size=2048, n_layer=4, dim=256, n_head=4, n_kv_head=2, head_dim=64,
        intermediate_size=768, max_seq_len=1024, memory_layers=(0, 1, 2, 3),
    ),
    # Unit tests: a fraction of a second per forward pass.
    "tiny": Memory3Config(
        name="tiny", vocab_size=320, n_layer=4, dim=64, n_head=4, n_kv_head=2, head_dim=16,
        intermediate_size=128, max_seq_len=1024, memory_layers=(0, 1),
    ),
}


def default_preset(quick: bool) -> str:
    """The preset of a training run that names none: `small`, or `tiny` for a quick one."""
    return "tiny" if quick else "small"
