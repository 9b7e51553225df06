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
        end = len(self._ids)
        if full_text.endswith("\ufffd") and not final:
            held = end - self._read_offset
            if held < _MAX_HELD:
                return ""
            end = self._start_of_partial_character(full_text, held)
            full_text = self._decode(self._ids[self._prefix_offset : end])
        delta = full_text[len(prefix_text) :]
        self._read_offset = end
        self._prefix_offset = max(0, self._read_offset - _WINDOW)
        return delta

    def _start_of_partial_character(self, full_text: str, held: int) -> int:
        """Where the held tokens go out up to, when they must (they hold invalid bytes): all of them,
        but for the last few when those alone make the final U+FFFD, the start of a character that
        the next tokens may complete (sent as U+FFFD with the invalid bytes, it was lost)."""
        for keep in range(1, held):
            end = len(self._ids) - keep
            if self._decode(self._ids[self._prefix_offset : end]) == full_text[:-1]:
                return end
        return len(self._ids)
