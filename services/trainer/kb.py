"""The knowledge base: documents split into references of at most `ref_len` tokens.

References are cut at sentence ends where possible (a sentence longer than ref_len is cut by
tokens), so a fact is rarely split across two memories. A reference's id is a content hash of
its text, so the same text always gets the same id in every release.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from memory3.model.tokenizer import TextCodec

REFERENCE_ID_VERSION = "memory3.reference.v1"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class Reference:
    id: str
    text: str
    tokens: tuple[int, ...]
    source: str  # the document it was cut from


def reference_id(text: str) -> str:
    """sha256 of a versioned, canonical (UTF-8, NFC-free, exact) encoding of the text; 32 hex chars."""
    return hashlib.sha256(f"{REFERENCE_ID_VERSION}\n{text}".encode()).hexdigest()[:32]


def split_document(text: str, codec: TextCodec, ref_len: int) -> list[tuple[str, list[int]]]:
    """Greedily pack sentences into references of <= ref_len tokens; returns (text, tokens) pairs."""
    pieces: list[tuple[str, list[int]]] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        ids = codec.encode(sentence)
        while len(ids) > ref_len:  # a very long sentence: cut by tokens
            head = ids[:ref_len]
            pieces.append((codec.decode(head), head))
            ids = ids[ref_len:]
            sentence = codec.decode(ids)
        pieces.append((sentence, ids))
    out: list[tuple[str, list[int]]] = []
    text_parts: list[str] = []
    for sentence, _ in pieces:
        candidate = " ".join([*text_parts, sentence])
        if text_parts and len(codec.encode(candidate)) > ref_len:
            joined = " ".join(text_parts)
            out.append((joined, codec.encode(joined)))
            text_parts = [sentence]
        else:
            text_parts.append(sentence)
    if text_parts:
        joined = " ".join(text_parts)
        out.append((joined, codec.encode(joined)))
    return out


def build_references(
    documents: Iterable[tuple[str, str]], codec: TextCodec, ref_len: int
) -> Iterator[Reference]:
    """(source, text) documents -> references, duplicates (same text) dropped."""
    seen: set[str] = set()
    for source, text in documents:
        for ref_text, tokens in split_document(text, codec, ref_len):
            if len(tokens) > ref_len:  # re-encoding a joined text can merge differently: cut again
                tokens = tokens[:ref_len]
                ref_text = codec.decode(tokens)
            rid = reference_id(ref_text)
            if rid in seen:
                continue
            seen.add(rid)
            yield Reference(rid, ref_text, tuple(tokens), source)
