"""Memory3 model package: pure PyTorch, no service code.

Import the pieces from their modules (`memory3.model.model`, `.encoder`, `.generate`, ...);
this file re-exports the most used names.
"""

from .config import PRESETS, ConfigError, Memory3Config
from .memory import ExplicitMemory, MemoryKV, stack_memories
from .model import Transformer

__all__ = [
    "PRESETS", "ConfigError", "ExplicitMemory", "Memory3Config", "MemoryKV", "Transformer", "stack_memories",
]
