"""The paper's overlap filter (Eq. 6): overlap = LCS(reference, text) / |reference|.

The paper constrains the matched span of the text to at most 2|r| tokens. We evaluate the LCS of
the reference against windows of 2|r| tokens taken every |r| tokens and keep the best, which
enforces that constraint up to the window alignment. Training excludes references overlapping
the training sequence by more than 90%; evaluation drops retrieved references overlapping the
question by more than 2/3.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import LCSseq

TRAIN_MAX_OVERLAP = 0.9
EVAL_MAX_OVERLAP = 2 / 3


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Longest common subsequence of two token sequences.

    rapidfuzz's bit-parallel LCS: the text service filters every retrieved candidate of every
    chunk's query, on the serving path, and a numpy row per token took 100 times as long.
    """
    return int(LCSseq.similarity(a, b))


def overlap(reference: Sequence[int], text: Sequence[int]) -> float:
    """LCS(reference, best window of text of <= 2|r| tokens) / |reference|."""
    r = len(reference)
    if r == 0:
        return 0.0
    window, stride = 2 * r, r
    starts = range(0, max(1, len(text) - window + stride), stride)
    best = max(lcs_length(reference, text[s : s + window]) for s in starts)
    return best / r
