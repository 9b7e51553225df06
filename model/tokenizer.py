"""Tokenizer conventions shared by training and serving.

The special tokens and the reference prefix are defined here once. A checkpoint or release
carries its own `tokenizer.json` (HF `tokenizers`); `byte_level_tokenizer()` builds an untrained
byte-level one (every byte a token, no merges) for tests and random-weight demos.

Text is data: a prompt or a document that holds the characters `</s>` or `<s>Reference:` gets the
tokens of those characters, never the control tokens (an end of sequence inside a prompt, a
reference's layout inside a memory). Only the code places control tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .config import Memory3Config

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def _byte_level_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet, which `tokenizers`' ByteLevel uses, as symbol -> byte: a
    printable Latin-1 byte is its own symbol, the other bytes are U+0100 on, in order. (`tokenizers`
    gives the alphabet, not the mapping.)"""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = (b for b in range(256) if b not in printable)
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


BYTE_OF_SYMBOL = _byte_level_symbols()


def byte_level_tokenizer() -> Tokenizer:
    """Special tokens at ids 0-2, then the 256 byte-level symbols."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


class TextCodec:
    """Text <-> token ids, with the Memory3 layout conventions."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.tokenizer = tokenizer
        # A copy that reads special tokens' spellings in text as text (the flag is not saved with it).
        self.text_tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.text_tokenizer.encode_special_tokens = True
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self.pad_id = tokenizer.token_to_id(PAD)
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        # Ids whose text `decode` leaves out (`<s>`, `</s>`, `<pad>`).
        self.control_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._token_bytes: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> TextCodec:
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text's tokens, none of them a control token."""
        return self.text_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, for showing tokens one at a time (logprobs): a byte-level
        token may hold part of a character, which its decoded text cannot show. A control token's
        are its spelling."""
        found = self._token_bytes.get(token_id)
        if found is None:
            if token_id in self._added:
                found = self._added[token_id].encode()
            elif self._byte_level:
                found = bytes(BYTE_OF_SYMBOL[c] for c in self.tokenizer.id_to_token(token_id))
            else:
                found = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
            self._token_bytes[token_id] = found
        return found

    def token_label(self, token_id: int) -> str:
        """One token as logprobs name it: its text, or for a token that is not whole characters (a part
        of one) its bytes as vLLM spells them, `bytes:\\xe6\\x97`, so that two such tokens stay apart."""
        data = self.token_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def reference_prefix(self, config: Memory3Config) -> list[int]:
        """`<s>Reference:` as tokens: prepended to every reference and to every context. The
        configuration spells its control tokens (`<s>`), which are read as such here alone."""
        return self.tokenizer.encode(config.reference_prefix, add_special_tokens=False).ids

    def body(self, text: str) -> list[int]:
        """A context body: the ordinary `<s>` separator, then the text."""
        return [self.bos_id, *self.encode(text)]

    def bodies(self, texts: Sequence[str]) -> list[list[int]]:
        """`body` of each text, in one call that lets other Python threads run meanwhile (`encode`
        holds the GIL throughout: a long prompt tokenized in a worker thread still stalled the
        event loop that streams every other request's tokens)."""
        return [[self.bos_id, *e.ids] for e in self.text_tokenizer.encode_batch(list(texts), add_special_tokens=False)]
