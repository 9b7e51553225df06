"""Bit-packing: exact round trips, exact sizes, a known bit layout, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from memory3.model.bitpack import pack_uint, packed_size, unpack_uint


def _random_values(rng: np.random.Generator, n: int, widths: list[int]) -> np.ndarray:
    cols = [rng.integers(0, 1 << w, size=n, dtype=np.int64) if w else np.zeros(n, np.int64) for w in widths]
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0), np.int64)


@pytest.mark.parametrize("seed", range(8))
def test_round_trip_random_widths(seed: int) -> None:
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(0, 64, size=int(rng.integers(1, 12)))]
    n = int(rng.integers(0, 50))
    values = _random_values(rng, n, widths)
    buf = pack_uint(values, widths)
    assert len(buf) == packed_size(widths, n) == (n * sum(widths) + 7) // 8
    out = unpack_uint(buf, widths, n)
    assert out.dtype == np.int64 and out.shape == (n, len(widths))
    np.testing.assert_array_equal(out, values)


def test_paper_code_widths_are_contiguous() -> None:
    widths = [14, 14] + [10] * 8  # 108 bits: two vectors share a byte at the boundary
    rng = np.random.default_rng(0)
    values = _random_values(rng, 3, widths)
    buf = pack_uint(values, widths)
    assert len(buf) == 41  # ceil(3 * 108 / 8): padding only at the end
    np.testing.assert_array_equal(unpack_uint(buf, widths, 3), values)


def test_little_endian_bit_order() -> None:
    # fields 3 bits (value 0b101) then 6 bits (0b110011): stream bits 1,0,1, 1,1,0,0,1,1
    buf = pack_uint(np.array([[5, 51]]), [3, 6])
    assert buf == bytes([0b10011101, 0b00000001])


def test_extreme_values() -> None:
    widths = [1, 7, 8, 9, 31, 32, 33, 63]
    values = np.array([[(1 << w) - 1 for w in widths], [0] * len(widths)], dtype=np.int64)
    np.testing.assert_array_equal(unpack_uint(pack_uint(values, widths), widths, 2), values)


def test_overflow_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"value 16 at row 1, field 0 does not fit in 4 bits"):
        pack_uint(np.array([[15, 0], [16, 0]]), [4, 2])
    with pytest.raises(ValueError, match="non-negative"):
        pack_uint(np.array([[-1]]), [4])
    with pytest.raises(ValueError, match="does not fit in 0 bits"):
        pack_uint(np.array([[1, 0]]), [0, 3])


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="must be"):
        pack_uint(np.zeros((2, 3), np.int64), [4, 4])
    with pytest.raises(ValueError, match="integers"):
        pack_uint(np.zeros((2, 1), np.float32), [4])
    with pytest.raises(ValueError, match="widths"):
        pack_uint(np.zeros((2, 1), np.int64), [64])


def test_short_buffer_is_rejected() -> None:
    buf = pack_uint(np.ones((10, 2), np.int64), [7, 7])
    assert len(buf) == 18
    with pytest.raises(ValueError, match="buffer too short: 10 rows of 14 bits need 18 bytes, got 17"):
        unpack_uint(buf[:-1], [7, 7], 10)
    np.testing.assert_array_equal(unpack_uint(buf + b"\xff", [7, 7], 10), np.ones((10, 2)))  # extra bytes ignored


def test_empty() -> None:
    assert pack_uint(np.zeros((0, 2), np.int64), [3, 5]) == b""
    assert unpack_uint(b"", [3, 5], 0).shape == (0, 2)
    assert pack_uint(np.zeros((4, 1), np.int64), [0]) == b""
    np.testing.assert_array_equal(unpack_uint(b"", [0], 4), np.zeros((4, 1)))
