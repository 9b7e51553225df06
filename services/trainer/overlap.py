"""The paper's overlap filter (Eq. 6): overlap = LCS(reference, text) / |reference|.

The paper constrains the matched span of the text to at most 2|r| tokens. We evaluate the LCS of
the reference against windows of 2|r| tokens taken every |r|/4 tokens and keep the best, which
enforces that constraint up to the window alignment: a span that straddles two windows loses at
most |r|/8 of its tokens in the better one (an error of at most 1/8 in the overlap; windows every
|r| lost up to a quarter, and a reference overlapping 0.83 was scored 0.63 and kept). A text no
longer than 2|r| (a 64-token chunk against references of 32 tokens or more) is one window: exact.
Training keeps windows every |r| (`stride=len(reference)` in data.py): it judges each reference
against a whole training sequence, for every sample, where finer windows cost four times as much,
and the trained releases' scores were measured with it. Training excludes references overlapping
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


def overlap(reference: Sequence[int], text: Sequence[int], *, stride: int | None = None) -> float:
    """LCS(reference, best window of text of <= 2|r| tokens) / |reference|; windows every `stride`
    tokens, by default |r|/4."""
    r = len(reference)
    if r == 0:
        return 0.0
    window, stride = 2 * r, stride or max(1, r // 4)
    starts = range(0, max(1, len(text) - window + stride), stride)
    best = max(lcs_length(reference, text[s : s + window]) for s in starts)
    return best / r
