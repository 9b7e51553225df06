import random

from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer.kb import build_references, reference_id, split_document
from memory3.services.trainer.overlap import lcs_length, overlap


def brute_lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(50):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 30))]
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        assert lcs_length(a, b) == brute_lcs(a, b)


def test_overlap_of_contained_and_unrelated_text():
    ref = list(range(100, 140))
    text = list(range(50)) + ref + list(range(60, 90))
    assert overlap(ref, text) == 1.0
    assert overlap(ref, list(range(0, 90))) == 0.0
    half = ref[::2]
    assert 0.45 < overlap(ref, list(range(50)) + half) <= 0.5
    # A match spread over far more than 2|r| tokens does not count as overlap.
    spread = [t for r in ref[:20] for t in (r, *range(1000, 1010))]
    assert overlap(ref, spread) < 0.5


def test_split_document_respects_ref_len_and_sentences():
    codec = TextCodec(byte_level_tokenizer())
    text = " ".join(f"Sentence number {i} says something." for i in range(40)) + " " + "x" * 500
    refs = split_document(text, codec, 64)
    assert all(len(tokens) <= 64 for _, tokens in refs)
    assert refs[0][0].startswith("Sentence number 0") and refs[0][0].endswith(".")
    assert "".join(t for t, _ in refs).replace(" ", "") == text.replace(" ", "")


def test_references_have_content_ids_and_no_duplicates():
    codec = TextCodec(byte_level_tokenizer())
    refs = list(build_references([("a", "One fact. Two facts."), ("b", "One fact. Two facts.")], codec, 128))
    assert len(refs) == 1 and refs[0].id == reference_id("One fact. Two facts.") and refs[0].source == "a"
    assert reference_id("x") != reference_id("y") and len(reference_id("x")) == 32
