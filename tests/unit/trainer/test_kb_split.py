"""split_document: CJK sentence ends, long sentences cut at character boundaries in linear time, and
English text split exactly as it always was (reference ids of existing releases depend on it)."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer.kb import build_references, reference_id, split_document
from memory3.services.trainer.tokenizer_train import train_tokenizer

ENGLISH = [
    "One fact. Two facts!  Three?\nFour.\n\nA fifth fact is here. Six.",
    "Ada Lovelace was born in London in 1815. She worked with Charles Babbage on the Analytical Engine! "
    "Did she write the first program? Many say so.\tHer notes, e.g. note G, describe an algorithm.\n"
    "Pi is about 3.14159 and e is about 2.718. \"Quoted sentences end too.\" (So do bracketed ones.)\n\n\n"
    "Semicolons; colons: and commas, do not end a sentence. Wait... what?! Really.\r\nWindows line ends.\n"
    "  Leading and trailing spaces are dropped.   ",
    "The quick brown fox jumps over the lazy dog. " * 12,
]
WORDS = [
    "memory", "reference", "token", "split", "document", "fact", "river", "mountain", "city", "engineer", "born",
    "worked", "the", "a", "of", "in", "on", "and", "is", "was", "1815", "3.14", "e.g.", "U.S.", "don't", "it's",
    "(note)", '"quoted"',
]
PLAIN_WORDS = [w for w in WORDS if not re.search(r"[.!?]", w)]  # no sentence end in a line of them


def _old_split_document(text, codec, ref_len):
    """split_document as it was before CJK sentence ends and character-boundary cuts (commit d62bea5)."""
    pieces = []
    for sentence in (s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text)):
        if not sentence:
            continue
        ids = codec.encode(sentence)
        while len(ids) > ref_len:
            head = ids[:ref_len]
            pieces.append((codec.decode(head), head))
            ids = ids[ref_len:]
            sentence = codec.decode(ids)
        pieces.append((sentence, ids))
    out, text_parts = [], []
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


def _english_paragraphs():
    rng = random.Random(0)
    paragraphs = list(ENGLISH)
    for _ in range(20):
        sentences = []
        for _ in range(rng.randrange(1, 40)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 9)))
            sentences.append(words[0].upper() + words[1:] + rng.choice(".!?"))
        paragraphs.append("".join(s + rng.choice([" ", " ", "  ", "\n", "\n\n", " \t"]) for s in sentences))
    return paragraphs


@pytest.fixture(scope="module")
def trained_codec():
    return TextCodec(train_tokenizer(_english_paragraphs() * 5, 400))


@pytest.fixture(scope="module")
def byte_codec():
    return TextCodec(byte_level_tokenizer())


@pytest.fixture(params=["byte", "trained"])
def codec(request, byte_codec, trained_codec):
    return byte_codec if request.param == "byte" else trained_codec


def test_english_text_splits_exactly_as_before(codec):
    for ref_len in (64, 128):
        for paragraph in _english_paragraphs():
            sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", paragraph)]
            assert max(len(codec.encode(s)) for s in sentences) <= ref_len  # ordinary sentences only
            assert split_document(paragraph, codec, ref_len) == _old_split_document(paragraph, codec, ref_len)


def test_english_reference_texts_and_ids_are_pinned(byte_codec):
    refs = list(build_references([("doc", ENGLISH[0])], byte_codec, 24))
    assert [r.text for r in refs] == ["One fact. Two facts!", "Three? Four.", "A fifth fact is here.", "Six."]
    assert refs[0].tokens == (49, 80, 71, 223, 72, 67, 69, 86, 16, 223, 54, 89, 81, 223, 72, 67, 69, 86, 85, 3)
    assert refs[0].id == reference_id("One fact. Two facts!")


def _check_pieces(refs, text, codec, ref_len):
    for ref_text, tokens in refs:
        assert "\ufffd" not in ref_text
        assert ref_text in text  # an exact substring: no character cut, lost or added
        assert tokens == codec.encode(ref_text) and len(tokens) <= ref_len


@pytest.mark.parametrize("ref_len", [128, 40])  # 40: shorter than a sentence, so sentences are cut too
def test_cjk_paragraph_is_split_at_sentence_ends_without_replacement_characters(codec, ref_len):
    chinese = "北京是中国的首都，也是全国的政治和文化中心。"
    japanese = "「今日はいい天気ですね。」と彼は言った！本当ですか？"  # 。 then a closing quote: one sentence end
    for sentence in [chinese, japanese]:
        text = sentence * 30
        refs = split_document(text, codec, ref_len)
        _check_pieces(refs, text, codec, ref_len)
        assert "".join(t for t, _ in refs) == text
        if len(codec.encode(sentence)) <= ref_len:  # whole sentences: every reference ends a sentence
            assert len(refs) > 1 and all(t.endswith(("。", "！", "？", "。」")) for t, _ in refs)


@pytest.mark.parametrize("ref_len", [128, 50])
def test_long_unpunctuated_line_is_cut_between_words(codec, ref_len):
    rng = random.Random(1)
    words = [*PLAIN_WORDS, "café", "naïve", "北京", "東京タワー", "😀", "Straße"]
    text = " ".join(rng.choice(words) for _ in range(3000))
    refs = split_document(text, codec, ref_len)
    assert len(refs) > 10
    _check_pieces(refs, text, codec, ref_len)
    assert " ".join(t for t, _ in refs) == text


def test_long_word_is_cut_at_character_boundaries(codec):
    text = "a😀é北" * 400  # no whitespace at all: cut between characters, never inside one
    refs = split_document(text, codec, 32)
    _check_pieces(refs, text, codec, 32)
    assert "".join(t for t, _ in refs) == text


def test_build_references_keep_whole_characters(codec):
    text = "北京是中国的首都，也是全国的政治和文化中心。" * 30 + "\n" + "word " * 500 + "😀" * 200
    refs = list(build_references([("doc", text)], codec, 50))
    assert refs and all("\ufffd" not in r.text and r.id == reference_id(r.text) and len(r.tokens) <= 50 for r in refs)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab .!?。！？」\n\té北😀", max_size=400), st.integers(8, 40))
def test_any_text_keeps_every_character(text, ref_len):
    codec = TextCodec(byte_level_tokenizer())
    refs = split_document(text, codec, ref_len)
    for ref_text, tokens in refs:
        assert "\ufffd" not in ref_text and tokens == codec.encode(ref_text) and len(tokens) <= ref_len
    # Only whitespace is dropped or replaced by a space where pieces are joined.
    assert re.sub(r"\s", "", "".join(t for t, _ in refs)) == re.sub(r"\s", "", text)


class _CountingTokenizer:
    """Counts the work a split does: characters encoded plus tokens decoded."""

    def __init__(self, inner):
        self.inner, self.work = inner, 0

    def encode(self, text, add_special_tokens=True):
        self.work += len(text)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=True):
        self.work += len(ids)
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.inner.token_to_id(token)


def test_splitting_a_long_line_is_linear():
    """A timing-free check: the tokenizer's work is a small multiple of the text's length (the old
    cut decoded the whole rest of the sentence for every piece: quadratic)."""
    codec = TextCodec(byte_level_tokenizer())
    codec.tokenizer = counting = _CountingTokenizer(codec.tokenizer)
    codec.text_tokenizer = _CountingTokenizer(codec.text_tokenizer)
    rng = random.Random(2)
    text = " ".join(rng.choice(PLAIN_WORDS) for _ in range(12_000))  # ~70 KB, one sentence
    refs = split_document(text, codec, 128)
    counting.work += codec.text_tokenizer.work
    assert len(refs) > 400 and " ".join(t for t, _ in refs) == text
    assert counting.work < 8 * len(text)
