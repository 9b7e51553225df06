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


def test_a_span_that_straddles_two_windows_is_scored_close_to_eq_6():
    """20 of a 24-token reference's tokens over a span of 48 tokens (2|r|, as Eq. 6 allows) starting
    between two windows 24 apart: scored 0.625 and kept (the filter drops above 2/3); Eq. 6 gives 0.833."""
    reference = list(range(100, 124))
    span = [t for i, t in enumerate(reference) if i not in (3, 9, 15, 21)]  # 20 of the 24 tokens
    spread = [7] * 48  # 7: a token not in the reference
    for i, t in enumerate(span):  # first and last at the span's ends
        spread[round(i * 47 / 19)] = t
    text = [7] * 12 + spread + [7] * 4  # 64 tokens, the span at 12: between window starts 0 and 24
    exact = max(lcs_length(reference, text[s:s + 48]) for s in range(len(text) - 47)) / 24
    assert exact == 20 / 24
    assert exact - 1 / 8 <= overlap(reference, text) <= exact
    assert overlap(reference, text) > 2 / 3  # dropped, as the paper's filter drops it


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
