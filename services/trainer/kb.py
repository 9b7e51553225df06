"""The knowledge base: documents split into references of at most `ref_len` tokens.

References are cut at sentence ends where possible (a sentence longer than ref_len is cut at the
last whitespace that fits, or else at a character boundary), so a fact is rarely split across two
memories and no character is ever cut in half. A reference's id is a content hash of its text, so
the same text always gets the same id in every release.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tokenizers import Encoding

from memory3.model.tokenizer import TextCodec

REFERENCE_ID_VERSION = "memory3.reference.v1"
# CJK and full-width sentence ends (。 ｡ ． ！ ？), optionally followed by closing quotes or brackets: the next
# sentence usually follows with no whitespace, so the split may be empty. The ASCII rule is unchanged,
# so English text splits exactly as it always has (reference ids depend on it).
_CJK_END = "\u3002\uff61\uff0e\uff01\uff1f"
_CJK_CLOSE = "\u300d\u300f\uff09\u3015\u3011\u3009\u300b\u201d\u2019"
_SENTENCE_END = re.compile(
    r"(?<=[.!?])\s+|\n+"
    rf"|(?<=[{_CJK_END}])(?![{_CJK_CLOSE}])\s*"
    rf"|(?<=[{_CJK_END}][{_CJK_CLOSE}])(?![{_CJK_CLOSE}])\s*"
)
_LAST_SPACE = re.compile(r".*\s", re.DOTALL)  # greedy: the match ends just after the last whitespace
_SPACES = re.compile(r"\s*")


@dataclass(frozen=True)
class Reference:
    id: str
    text: str
    tokens: tuple[int, ...]
    source: str  # the document it was cut from


def reference_id(text: str) -> str:
    """sha256 of a versioned, canonical (UTF-8, NFC-free, exact) encoding of the text; 32 hex chars."""
    return hashlib.sha256(f"{REFERENCE_ID_VERSION}\n{text}".encode()).hexdigest()[:32]


def _sentence_spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each non-empty sentence of `text`, stripped of surrounding whitespace."""
    start = 0
    for match in [*_SENTENCE_END.finditer(text), None]:
        stop = len(text) if match is None else match.start()
        sentence = text[start:stop]
        stripped = sentence.strip()
        if stripped:
            lead = len(sentence) - len(sentence.lstrip())
            yield start + lead, start + lead + len(stripped)
        if match is not None:
            start = match.end()


class _Cutter:
    """Cuts a sentence into pieces of <= ref_len tokens, at the last whitespace that fits or else at a
    character boundary, never inside a character.

    Linear in the sentence's length: each piece is found by encoding a window of about 1.5 times its
    length (the tokens' character offsets say where token ref_len starts), then checked by encoding
    the piece itself.
    """

    def __init__(self, codec: TextCodec, ref_len: int) -> None:
        self.tokenizer, self.ref_len = codec.text_tokenizer, ref_len
        self.window = max(8 * ref_len, 64)  # characters to encode; then adapted to the pieces' length

    def encode(self, text: str) -> Encoding:
        return self.tokenizer.encode(text, add_special_tokens=False)  # as TextCodec.encode

    def fit(self, text: str) -> list[int] | None:
        """text's tokens if they are <= ref_len, else None."""
        ids = self.encode(text).ids
        return ids if len(ids) <= self.ref_len else None

    def cut(self, text: str, start: int, end: int) -> Iterator[tuple[int, int, list[int]]]:
        """(start, end, tokens) of the pieces of text[start:end], a stripped sentence: the sentence itself
        if it fits; whitespace at a cut is dropped."""
        pos = start
        while pos < end:
            while True:
                stop = min(end, pos + self.window)
                encoding = self.encode(text[pos:stop])
                if len(encoding.ids) > self.ref_len:
                    break
                if stop == end:  # the rest fits
                    yield pos, end, encoding.ids
                    return
                self.window *= 2
            # Token ref_len is the first that does not fit: cut before the character where it starts
            # (a character of several byte tokens is then wholly left out).
            limit = pos + encoding.offsets[self.ref_len][0]
            piece = None
            space = _LAST_SPACE.match(text, pos + 1, limit + 1)  # the cut may fall just before a space
            if space is not None:  # prefer the last whitespace, so that the piece ends with a word
                piece_end = space.end() - 1
                while text[piece_end - 1].isspace():  # text[pos] is not whitespace
                    piece_end -= 1
                piece = self.fit(text[pos:piece_end])
            if piece is None:
                piece_end = limit
                piece = self.fit(text[pos:limit]) if limit > pos else None
            if piece is None:  # re-encoding merged differently: prefix lo fits, prefix hi does not
                lo, hi = 0, max(limit - pos, 1)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self.fit(text[pos:pos + mid]) is None:
                        hi = mid
                    else:
                        lo = mid
                piece_end = pos + max(lo, 1)  # a character needing more than ref_len tokens is a piece alone
                piece = self.encode(text[pos:piece_end]).ids
            self.window = max(3 * (limit - pos) // 2, 64)  # the next piece is probably about as long
            yield pos, piece_end, piece
            pos = _SPACES.match(text, piece_end, end).end()


def split_document(text: str, codec: TextCodec, ref_len: int) -> list[tuple[str, list[int]]]:
    """Greedily pack sentences into references of <= ref_len tokens; returns (text, tokens) pairs.

    Sentences are joined with a space, or with nothing where the document has nothing between them
    (CJK sentences, a long word cut in two), so that such a reference is a substring of the document.
    """
    cutter = _Cutter(codec, ref_len)
    out: list[tuple[str, list[int]]] = []
    joined, joined_ids, previous_end = "", [], -1
    for start, end in _sentence_spans(text):
        for piece_start, piece_end, ids in cutter.cut(text, start, end):
            piece = text[piece_start:piece_end]
            if joined:
                candidate = joined + (" " if piece_start > previous_end else "") + piece
                candidate_ids = codec.encode(candidate)
                if len(candidate_ids) > ref_len:
                    out.append((joined, joined_ids))
                    joined, joined_ids = piece, ids
                else:
                    joined, joined_ids = candidate, candidate_ids
            else:
                joined, joined_ids = piece, ids
            previous_end = piece_end
    if joined:
        out.append((joined, joined_ids))
    return out


def build_references(
    documents: Iterable[tuple[str, str]], codec: TextCodec, ref_len: int
) -> Iterator[Reference]:
    """(source, text) documents -> references, duplicates (same text) dropped."""
    seen: set[str] = set()
    for source, text in documents:
        for ref_text, tokens in split_document(text, codec, ref_len):
            # A safety net: split_document's tokens are its text's own and fit, except for a lone character
            # of more than ref_len tokens (possible only with ref_len < 4).
            if len(tokens) > ref_len:
                tokens = tokens[:ref_len]
                ref_text = codec.decode(tokens)
            rid = reference_id(ref_text)
            if rid in seen:
                continue
            seen.add(rid)
            yield Reference(rid, ref_text, tuple(tokens), source)
