"""The paper's overlap filter (Eq. 6): overlap = LCS(reference, text) / |reference|.

The paper constrains the matched span of the text to at most 2|r| tokens. We evaluate the LCS of
the reference against windows of 2|r| tokens taken every |r| tokens and keep the best, which
enforces that constraint up to the window alignment. Training excludes references overlapping
the training sequence by more than 90%; evaluation drops retrieved references overlapping the
question by more than 2/3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TRAIN_MAX_OVERLAP = 0.9
EVAL_MAX_OVERLAP = 2 / 3


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Longest common subsequence, one numpy row per token of `a` (O(|a|·|b|) work)."""
    if not a or not b:
        return 0
    bb = np.asarray(b)
    prev = np.zeros(len(bb) + 1, dtype=np.int32)
    for token in a:
        match = np.concatenate([[0], np.where(bb == token, prev[:-1] + 1, 0)])
        row = np.maximum(match, prev)
        # row[j] = max(match[j], row[j-1]) needs a running maximum along the row.
        prev = np.maximum.accumulate(row)
    return int(prev[-1])


def overlap(reference: Sequence[int], text: Sequence[int]) -> float:
    """LCS(reference, best window of text of <= 2|r| tokens) / |reference|."""
    r = len(reference)
    if r == 0:
        return 0.0
    window, stride = 2 * r, r
    starts = range(0, max(1, len(text) - window + stride), stride)
    best = max(lcs_length(reference, text[s : s + window]) for s in starts)
    return best / r
