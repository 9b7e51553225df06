"""Text sources: real English from Debian packages, and user corpus files, all streamed.

Debian sources (installed by `make system-deps`, which `make demo` and `.ci/run` run): WordNet
glosses (`wordnet-base`), the GCIDE dictionary (`dict-gcide`) and the Python documentation in info
format (`python3.11-doc`).
Each yields (source, document) pairs one at a time; nothing is read whole into memory beyond one
compressed file's stream.

User corpus files (for `kb add` and custom training text) are UTF-8 text with documents
separated by blank lines, or JSON Lines (`.jsonl` or `.ndjson`, in any case). They are checked
strictly: a file that is not UTF-8, empty, or holds an oversize document is rejected with the file,
the position and what to change.
"""

from __future__ import annotations

import codecs
import gzip
import re
from collections.abc import Iterator
from pathlib import Path

MAX_DOCUMENT_BYTES = 1 << 20
WORDNET_DIR = Path("/usr/share/wordnet")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
PYTHON_INFO = Path("/usr/share/info/python3.11.info.gz")
DEBIAN_PACKAGES = "wordnet-base dict-gcide python3.11-doc"
# Read as JSON Lines, whatever their case (`.JSONL` from a Windows tool is the same format).
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")


class CorpusError(ValueError):
    """A corpus file that cannot be used as it is."""


def wordnet_glosses(root: Path = WORDNET_DIR) -> Iterator[tuple[str, str]]:
    for part in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{part}"
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header lines start with two spaces
                words = line.split(" ")
                lemma = words[4].replace("_", " ")
                gloss = line.split(" | ", 1)[1].strip()
                yield "wordnet", f"{lemma}: {gloss}"


_GCIDE_HEAD = re.compile(r"^(\S[^\\]*?)\s*\\[^\\]*\\,?\s*")
_GCIDE_NOISE = re.compile(r"\[(?:1913 Webster|WordNet 1\.5|PJC|Webster 1913 Suppl\.)[^\]]*\]")


def gcide_entries(path: Path = GCIDE_DICT) -> Iterator[tuple[str, str]]:
    """Dictionary entries as plain text, pronunciation marks and edition tags removed."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        entry: list[str] = []
        for line in f:
            if line.strip():
                entry.append(line.strip())
                continue
            if entry:
                text = " ".join(entry)
                entry = []
                if text.startswith("00-database"):
                    continue
                text = _GCIDE_NOISE.sub("", _GCIDE_HEAD.sub(r"\1: ", text)).strip()
                if len(text) > 40:
                    yield "gcide", text


def python_docs(path: Path = PYTHON_INFO) -> Iterator[tuple[str, str]]:
    """Paragraphs of the Python documentation (info format)."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        para: list[str] = []
        for line in f:
            if line.strip() and not line.startswith(("\x1f", "File:", "*")):
                para.append(line.strip())
                continue
            if para:
                text = " ".join(para)
                para = []
                if len(text) > 80 and text.count(" ") > 10:
                    yield "python-docs", text


DEBIAN_SOURCES = {"wordnet": wordnet_glosses, "gcide": gcide_entries, "python-docs": python_docs}


def debian_documents(sources: tuple[str, ...] = tuple(DEBIAN_SOURCES)) -> Iterator[tuple[str, str]]:
    """Interleave the Debian sources so any prefix of the stream mixes all of them."""
    missing = [p for p in (WORDNET_DIR / "data.noun", GCIDE_DICT, PYTHON_INFO) if not p.exists()]
    if missing:
        raise CorpusError(f"missing {', '.join(map(str, missing))}: apt-get install -y {DEBIAN_PACKAGES}")
    streams = [DEBIAN_SOURCES[name]() for name in sources]
    while streams:
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
            else:
                yield item


def read_corpus_file(path: str | Path, *, max_document_bytes: int = MAX_DOCUMENT_BYTES) -> list[tuple[str, str]]:
    """A user's UTF-8 file -> (source, document) pairs.

    Plain text: documents are separated by blank lines, and the file is their source. JSON Lines
    (`JSON_LINES_SUFFIXES`): one object a line, `{"text": ..., "source": ...}`, each a document with
    its own source (default: the file and line), for documents that hold blank lines or come from
    many places.
    """
    path = Path(path)
    text = _read_text(path, instead=f"name the files in it (e.g. {path}/*.txt)")
    if "\x00" in text:
        raise CorpusError(f"{path}: contains NUL bytes; is it a binary file?")
    if is_json_lines(path):
        documents = _json_lines_documents(path, text)
    else:
        documents = [(str(path), d.strip()) for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not documents:
        raise CorpusError(f"{path}: no text (the file is empty or holds only whitespace)")
    for i, (_, doc) in enumerate(documents):
        size = len(doc.encode("utf-8"))
        if size > max_document_bytes:
            raise CorpusError(f"{path}: document {i + 1} is {size} bytes, over the {max_document_bytes}-byte limit; "
                              "split it into smaller documents")
    return documents


def is_json_lines(path: Path) -> bool:
    """Whether a corpus file is read as JSON Lines rather than as plain text."""
    return path.suffix.lower() in JSON_LINES_SUFFIXES


def _read_text(path: Path, *, instead: str) -> str:
    """A user's file as text; a CorpusError that says what to fix if it is no file or not UTF-8.

    A byte-order mark (as Windows editors write) is not text: kept, it would start the first
    document, whose reference would then get another id than the same text without it. `instead`
    says what to give in place of a directory."""
    if path.is_dir():
        raise CorpusError(f"{path}: is a directory, not a file; {instead}")
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)  # offsets skip the mark
        line = raw[:at].count(b"\n") + 1
        raise CorpusError(f"{path}: not UTF-8 text (byte {at}, line {line}: {e.reason}); "
                          "convert it, e.g. with iconv -t UTF-8") from e


def _json_lines(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line; a CorpusError names a line that is not JSON."""
    import json

    # Lines end at "\n" only: JSON leaves U+2028 and U+2029 unescaped, and str.splitlines would cut there.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: line {number} is not JSON ({e.msg})") from e


def _json_lines_documents(path: Path, text: str) -> list[tuple[str, str]]:
    documents = []
    for number, item in _json_lines(path, text):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise CorpusError(f'{path}: line {number} must be an object with a non-empty string "text"')
        source = item.get("source", f"{path}:{number}")
        if not isinstance(source, str):
            raise CorpusError(f'{path}: line {number}: "source" must be a string')
        for key, value in (("text", item["text"]), ("source", source)):
            _check_encodable(value, f'{path}: line {number}: "{key}"')
        documents.append((source, item["text"].strip()))
    return documents


def _check_encodable(value: str, where: str) -> None:
    """JSON's \\u escapes can spell a lone surrogate (\\ud800), which no UTF-8 file can hold: without
    this check the document would be encoded and its memory uploaded before the reference table fails."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CorpusError(f"{where} holds a lone surrogate ({value[e.start]!a} at character {e.start}), which is not "
                          "text: write the character itself, or both halves of its \\u escape pair") from e


def read_selection_file(path: str | Path) -> tuple[list[str], list[str]]:
    """A JSON Lines file of references to remove -> (ids, matches): each line `{"id": ...}` or
    `{"match": ...}`. For more than a command line holds (Linux takes 2 MiB of arguments, 128 KiB one),
    texts with newlines or NULs, and values that begin with "-"; the TrainerService passes its jobs'
    removals this way."""
    path = Path(path)
    text = _read_text(path, instead="name the JSON Lines file of the references to remove")
    ids, matches = [], []
    for number, item in _json_lines(path, text):
        key, value = next(iter(item.items())) if isinstance(item, dict) and len(item) == 1 else (None, None)
        if key not in ("id", "match") or not isinstance(value, str) or not value:
            raise CorpusError(f'{path}: line {number} must be {{"id": "..."}} or {{"match": "..."}} (a non-empty '
                              "string)")
        _check_encodable(value, f'{path}: line {number}: "{key}"')
        (ids if key == "id" else matches).append(value)
    if not ids and not matches:
        raise CorpusError(f"{path}: no references to remove (the file is empty or holds only whitespace)")
    return ids, matches
