"""Token ids -> text deltas that are always whole UTF-8 characters.

A byte-level BPE token can end in the middle of a multi-byte character; decoding then yields
U+FFFD. Like vLLM's incremental detokenizer, each step decodes only a short window of recent
tokens (so a long stream costs O(1) per token, not O(n)) and holds text back while the window
ends in a partial character (for at most 4 tokens: longer, the bytes are invalid, and their
replacement characters are emitted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_WINDOW = 6  # tokens decoded before the new ones, so merges across the boundary decode right
_MAX_HELD = 4  # a UTF-8 character has at most 4 bytes: past that, the bytes are invalid, not incomplete


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = 0  # tokens whose text has been emitted

    def add(self, ids: Sequence[int], *, final: bool = False) -> str:
        """Append tokens; return the new complete text (on `final`, whatever is left)."""
        self._ids.extend(ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if full_text.endswith("\ufffd") and not final and len(self._ids) - self._read_offset < _MAX_HELD:
            return ""
        delta = full_text[len(prefix_text) :]
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - _WINDOW)
        return delta
