"""Bit-packing of fixed-width unsigned integer fields.

Compressed memories store codebook indices of odd widths (14 and 10 bits for the paper's VQ) and
token positions (7 bits for 128-token references). Rounding each field up to whole bytes would
cost more than a quarter of the blob, so fields are packed back to back.

Layout: row after row, and inside a row field after field, each field's `width` bits least
significant bit first (little-endian bit order). Only the very end of the stream is padded with
zero bits to a whole byte, so N rows of B bits take exactly ceil(N * B / 8) bytes. The work is
vectorized with np.packbits/np.unpackbits; there is no Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_WIDTH = 63  # fields come back as int64, which must hold every value


def _check_widths(widths: Sequence[int]) -> np.ndarray:
    w = np.asarray([int(x) for x in widths], dtype=np.int64)
    bad = [int(x) for x in w if not 0 <= x <= MAX_WIDTH]
    if bad:
        raise ValueError(f"field widths must be in 0..{MAX_WIDTH} bits, got {bad}")
    return w


def packed_size(widths: Sequence[int], count: int) -> int:
    """Exact byte count of pack_uint() for `count` rows of fields of these widths."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * int(_check_widths(widths).sum()) + 7) // 8


def _field_mask(w: np.ndarray, nbytes: int) -> np.ndarray:
    """(F, 8*nbytes) bool: which bits of each field's little-endian word belong to the field."""
    return np.arange(8 * nbytes)[None, :] < w[:, None]


def pack_uint(values: np.ndarray, widths: Sequence[int]) -> bytes:
    """Pack rows of non-negative integers into a little-endian bit stream.

    Args:
        values: (N, F) non-negative integers; column f must fit in widths[f] bits.
        widths: F field widths in bits (0..63; a 0-bit field must hold 0).
    Returns:
        ceil(N * sum(widths) / 8) bytes.
    Raises:
        ValueError: wrong shape or dtype, a negative value, or a value too wide for its field.
    """
    w = _check_widths(widths)
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != len(w):
        raise ValueError(f"values must be (N, {len(w)}) to match {len(w)} widths, got shape {values.shape}")
    if values.dtype != np.bool_ and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"values must be integers, got dtype {values.dtype}")
    n, f = values.shape
    total = int(w.sum())
    if n == 0 or total == 0:
        if n and values.size and values.any():
            raise ValueError("values do not fit in 0-bit fields: all must be 0")
        return b""
    if np.issubdtype(values.dtype, np.signedinteger) and values.size and values.min() < 0:
        raise ValueError(f"values must be non-negative, got minimum {int(values.min())}")
    v = values.astype(np.uint64)
    limits = np.asarray([1 << int(x) for x in w], dtype=np.uint64)  # (F,) 1 << 63 still fits in uint64
    too_big = v >= limits[None, :]
    if too_big.any():
        row, col = (int(i) for i in np.argwhere(too_big)[0])
        raise ValueError(
            f"value {int(v[row, col])} at row {row}, field {col} does not fit in {int(w[col])} bits "
            f"(maximum {int(limits[col]) - 1}); {int(too_big.sum())} value(s) too wide in total"
        )
    nbytes = (int(w.max()) + 7) // 8  # only the low bytes of each 64-bit word can hold field bits
    words = v.astype("<u8").view(np.uint8).reshape(n, f, 8)[:, :, :nbytes]  # (N, F, nbytes)
    bits = np.unpackbits(words, axis=-1, bitorder="little")  # (N, F, 8*nbytes)
    stream = bits[:, _field_mask(w, nbytes)]  # (N, total): boolean mask keeps row-major field order
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack_uint(buf: bytes, widths: Sequence[int], count: int) -> np.ndarray:
    """Inverse of pack_uint.

    Args:
        buf: the packed stream; only its first packed_size(widths, count) bytes are read.
        widths: the same field widths the stream was packed with.
        count: number of rows to read.
    Returns:
        (count, F) int64.
    Raises:
        ValueError: bad widths or count, or `buf` shorter than the rows need.
    """
    w = _check_widths(widths)
    f = len(w)
    need = packed_size(w.tolist(), count)
    if len(buf) < need:
        raise ValueError(
            f"buffer too short: {count} rows of {int(w.sum())} bits need {need} bytes, got {len(buf)}"
        )
    total = int(w.sum())
    if count == 0 or total == 0:
        return np.zeros((count, f), dtype=np.int64)
    raw = np.frombuffer(buf, dtype=np.uint8, count=need)
    stream = np.unpackbits(raw, count=count * total, bitorder="little").reshape(count, total)  # (N, total)
    nbytes = (int(w.max()) + 7) // 8
    bits = np.zeros((count, f, 8 * nbytes), dtype=np.uint8)
    bits[:, _field_mask(w, nbytes)] = stream  # (N, F, 8*nbytes), the high bits stay zero
    words = np.zeros((count, f, 8), dtype=np.uint8)
    words[:, :, :nbytes] = np.packbits(bits, axis=-1, bitorder="little")  # (N, F, nbytes)
    return words.view("<u8").reshape(count, f).astype(np.int64)
