"""The stored byte format of one ExplicitMemory: versioned, little-endian, checksummed.

Blobs cross process and machine boundaries (trainer -> object store -> cache -> decoder), so a
reader must be able to tell, before any tensor reaches a model, that a blob is complete, uncorrupted,
of a format version it understands, encoded with the codec it holds, and of the shape it expects.

Layout (all integers little-endian):

    offset size  field
         0    4  magic b"M3KV"
         4    2  format version (u16) = FORMAT_VERSION
         6    1  codec id (u8), see codecs.CODEC_IDS
         7    1  flags, reserved: 0
         8    2  n_layers (u16)
        10    2  n_kv_heads (u16)
        12    2  k, slots per head (u16)
        14    2  head_dim (u16)
        16    2  ref_len (u16): positions lie in 0..ref_len-1
        18    2  n_valid (u16): valid slots per head, the same for every layer and head
        20    8  codec fingerprint
        28    4  payload length in bytes (u32)
        32   16  blake2b-128 of bytes 0..31 followed by the payload
        48       payload

Payload: the positions of the valid slots, ceil(log2(ref_len)) bits each, bit-packed in
(layer, head, slot) order and padded to a byte; then codec(keys of valid slots); then
codec(values of valid slots), each as (n_layers * n_kv_heads * n_valid, head_dim) vectors in the
same order. Padding slots (position -1) are not stored: they are always the tail slots of every
head, so n_valid says where they start, and they decode to zero K/V with position -1.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from .bitpack import pack_uint, packed_size, unpack_uint
from .codecs import CODEC_NAMES, MemoryCodec
from .memory import ExplicitMemory

MAGIC = b"M3KV"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sHBBHHHHHH8sI")  # header up to the checksum
_DIGEST_SIZE = 16
HEADER_SIZE = _HEAD.size + _DIGEST_SIZE  # 48
# Elements of a memory's (layers, kv heads, k, head_dim), past which a header is refused before anything
# is allocated for it: the paper's model has 22 * 8 * 8 * 128 = 180,224.
_MAX_ELEMENTS = 1 << 28
_U16_MAX = 0xFFFF


class MemoryFormatError(ValueError):
    """A memory blob that cannot be decoded: truncated, corrupt, or not what the reader expects."""


def position_bits(ref_len: int) -> int:
    """Bits per stored position: ceil(log2(ref_len)), 0 for a one-token window."""
    return (ref_len - 1).bit_length()


def memory_size(
    shape: tuple[int, int, int, int], codec: MemoryCodec, ref_len: int, n_valid: int | None = None
) -> int:
    """Exact blob size for a memory of shape (layers, kv_heads, k, head_dim) with n_valid (default k) valid slots."""
    n_layers, n_kv, k, head_dim = shape
    n_valid = k if n_valid is None else n_valid
    if ref_len < 1:
        raise ValueError(f"ref_len must be >= 1, got {ref_len}")
    if not 0 <= n_valid <= k:
        raise ValueError(f"n_valid={n_valid} must be in 0..k={k}")
    n_vec = n_layers * n_kv * n_valid
    return (HEADER_SIZE + packed_size([position_bits(ref_len)], n_vec)
            + 2 * codec.encoded_size(n_vec, head_dim))


def paper_bytes_per_memory(
    codec: MemoryCodec, n_layers: int = 22, n_kv: int = 8, k: int = 8, head_dim: int = 80, ref_len: int = 128
) -> int:
    """Blob size of one full memory at the paper's Memory3-2.4B configuration (paper §3.3)."""
    return memory_size((n_layers, n_kv, k, head_dim), codec, ref_len)


def _count_valid(positions: torch.Tensor, ref_len: int) -> int:
    """Check the slot layout the format relies on and return the valid slots per head.

    Every head must hold the same number of valid slots, first and in strictly ascending position
    order, then only padding (-1). The encoder guarantees this; anything else is a bug upstream.
    """
    valid = positions >= 0  # (L, H, k)
    counts = valid.sum(dim=-1)  # (L, H)
    n_valid = int(counts.flatten()[0]) if counts.numel() else 0
    if bool((counts != n_valid).any()):
        raise ValueError(
            f"every head must have the same number of valid slots, got counts from {int(counts.min())} "
            f"to {int(counts.max())}"
        )
    if bool((positions[..., n_valid:] != -1).any()):
        raise ValueError("padding slots must be the tail of every head and hold position -1")
    head = positions[..., :n_valid]  # (L, H, n_valid)
    if head.numel() and (int(head.max()) >= ref_len):
        raise ValueError(f"positions must be < ref_len={ref_len}, got {int(head.max())}")
    if n_valid > 1 and bool((head[..., 1:] <= head[..., :-1]).any()):
        raise ValueError("valid positions must be strictly ascending within each head")
    return n_valid


def _digest(head: bytes, payload: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    h.update(head)
    h.update(payload)
    return h.digest()


def encode_memory(mem: ExplicitMemory, codec: MemoryCodec, ref_len: int) -> bytes:
    """Serialize one memory.

    Args:
        mem: keys/values (L, H, k, D), positions (L, H, k) with -1 tail padding.
        codec: compresses the K and V vectors.
        ref_len: the reference window (positions lie in 0..ref_len-1), e.g. config.ref_len.
    Raises:
        ValueError: a dimension does not fit the header, or the slot layout is not the one
            described in `_count_valid`.
    """
    n_layers, n_kv, k, head_dim = mem.shape
    dims = {"n_layers": n_layers, "n_kv_heads": n_kv, "k": k, "head_dim": head_dim, "ref_len": ref_len}
    bad = [f"{name}={v}" for name, v in dims.items() if not 0 <= v <= _U16_MAX]
    if bad or ref_len < 1:
        raise ValueError(f"dimensions must fit in u16 and ref_len must be >= 1, got {', '.join(bad) or ref_len}")
    positions = mem.positions.detach().cpu().to(torch.int64)
    n_valid = _count_valid(positions, ref_len)
    n_vec = n_layers * n_kv * n_valid

    pos = positions[..., :n_valid].reshape(n_vec, 1).numpy()  # (L*H*n_valid, 1)
    keys = mem.keys[:, :, :n_valid].reshape(n_vec, head_dim)  # (L*H*n_valid, D)
    values = mem.values[:, :, :n_valid].reshape(n_vec, head_dim)
    payload = pack_uint(pos, [position_bits(ref_len)]) + codec.encode(keys) + codec.encode(values)
    if len(payload) > 0xFFFFFFFF:
        raise ValueError(f"payload of {len(payload)} bytes does not fit the u32 length field")
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, codec.codec_id, 0, n_layers, n_kv, k, head_dim, ref_len, n_valid,
                      codec.fingerprint(), len(payload))
    return head + _digest(head, payload) + payload


def _codec_label(codec_id: int) -> str:
    return f"{codec_id} ({CODEC_NAMES.get(codec_id, 'unknown')})"


@dataclass(frozen=True)
class MemoryHeader:
    """The verified header of a blob (what `validate_memory` checked)."""

    version: int
    codec_id: int
    shape: tuple[int, int, int, int]  # (n_layers, n_kv_heads, k, head_dim)
    ref_len: int
    n_valid: int
    fingerprint: bytes
    payload_len: int


def validate_memory(
    blob: bytes | bytearray | memoryview,
    codec: MemoryCodec,
    expected_shape: tuple[int, int, int, int] | None = None,
) -> MemoryHeader:
    """Verify a blob completely without decoding its K/V tensors.

    Caches and the memory service check every blob they return or store; decoding the K/V
    vectors (and, for VQ, reconstructing them) would cost far more than the checks. What is
    verified is everything `decode_memory` relies on: length, magic, format version, the
    checksum (before any other header field is trusted), flags, codec id and fingerprint, shape,
    the exact payload length for that shape and codec, that every stored position lies in
    the reference window, and that no stored float is NaN or inf (read from its bits).

    Raises:
        MemoryFormatError: with what is wrong and what was expected.
    """
    header, _ = _verify(bytes(blob), codec, expected_shape)
    return header


def _verify(
    blob: bytes, codec: MemoryCodec, expected_shape: tuple[int, int, int, int] | None
) -> tuple[MemoryHeader, torch.Tensor]:
    """The checks of `validate_memory`; also returns the unpacked positions (L*H*n_valid, 1).

    Checks run cheapest and most fundamental first: length, magic, version, payload length, then the
    checksum (before any header field is trusted further or the payload is touched), then the codec
    and the shape.
    """
    if len(blob) < HEADER_SIZE:
        raise MemoryFormatError(f"truncated memory blob: {len(blob)} bytes, shorter than the {HEADER_SIZE}-byte header")
    (magic, version, codec_id, flags, n_layers, n_kv, k, head_dim, ref_len, n_valid, fingerprint,
     payload_len) = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise MemoryFormatError(f"not a memory blob: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise MemoryFormatError(f"unsupported memory format version {version}; this reader supports {FORMAT_VERSION}")
    have = len(blob) - HEADER_SIZE
    if have < payload_len:
        raise MemoryFormatError(f"truncated memory blob: header announces {payload_len} payload bytes, got {have}")
    if have > payload_len:
        raise MemoryFormatError(
            f"memory blob has {have - payload_len} trailing bytes after the {payload_len}-byte payload"
        )
    head, stored = blob[:_HEAD.size], blob[_HEAD.size:HEADER_SIZE]
    payload = blob[HEADER_SIZE:]
    if _digest(head, payload) != stored:
        raise MemoryFormatError("memory blob checksum mismatch: the header or payload is corrupt")

    if flags != 0:
        raise MemoryFormatError(f"unsupported flags 0x{flags:02x} for format version {FORMAT_VERSION}; expected 0")
    if codec_id != codec.codec_id:
        raise MemoryFormatError(
            f"codec mismatch: blob was encoded with codec {_codec_label(codec_id)}, "
            f"decoding with {_codec_label(codec.codec_id)}"
        )
    if fingerprint != codec.fingerprint():
        raise MemoryFormatError(
            f"codec fingerprint mismatch for {codec.name}: blob has {fingerprint.hex()}, codec has "
            f"{codec.fingerprint().hex()} (a differently trained or parameterized codec)"
        )
    shape = (n_layers, n_kv, k, head_dim)
    if expected_shape is not None and tuple(expected_shape) != shape:
        raise MemoryFormatError(f"memory shape mismatch: blob is {shape}, expected {tuple(expected_shape)}")
    if 0 in shape or math.prod(shape) > _MAX_ELEMENTS:
        raise MemoryFormatError(f"bad header: shape {shape} is empty or larger than any model's memory "
                                f"(over {_MAX_ELEMENTS} elements)")
    if n_valid > k or ref_len < 1:
        raise MemoryFormatError(f"bad header: n_valid={n_valid} must be <= k={k} and ref_len={ref_len} >= 1")
    try:
        want = memory_size(shape, codec, ref_len, n_valid) - HEADER_SIZE
    except ValueError as e:  # e.g. a VQ codec built for another head_dim
        raise MemoryFormatError(f"memory of shape {shape} cannot be decoded with {codec.name}: {e}") from e
    if payload_len != want:
        raise MemoryFormatError(
            f"payload length mismatch: header says {payload_len} bytes, shape {shape} with {n_valid} valid "
            f"slots and codec {codec.name} need {want}"
        )
    n_vec = n_layers * n_kv * n_valid
    pbits = position_bits(ref_len)
    pos_end = packed_size([pbits], n_vec)
    pos = torch.from_numpy(unpack_uint(payload[:pos_end], [pbits], n_vec))  # (L*H*n_valid, 1)
    if n_vec and int(pos.max()) >= ref_len:
        raise MemoryFormatError(f"bad payload: position {int(pos.max())} is outside 0..{ref_len - 1}")
    kv_size = codec.encoded_size(n_vec, head_dim)
    view = memoryview(payload)  # slices without copies
    for part, start in (("keys", pos_end), ("values", pos_end + kv_size)):
        if codec.stores_nonfinite(view[start:start + kv_size], n_vec):
            raise MemoryFormatError(f"bad payload: the {part} hold NaN or inf (encoding never stores them)")
    header = MemoryHeader(version=version, codec_id=codec_id, shape=shape, ref_len=ref_len, n_valid=n_valid,
                          fingerprint=fingerprint, payload_len=payload_len)
    return header, pos


def decode_memory(
    blob: bytes,
    codec: MemoryCodec,
    *,
    expected_shape: tuple[int, int, int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> ExplicitMemory:
    """Parse and verify a blob (every check of `validate_memory`), then decode it.

    Raises:
        MemoryFormatError: with what is wrong and what was expected.
    """
    blob = bytes(blob)
    header, pos = _verify(blob, codec, expected_shape)
    n_layers, n_kv, k, head_dim = header.shape
    n_valid = header.n_valid
    n_vec = n_layers * n_kv * n_valid
    pos_end = HEADER_SIZE + packed_size([position_bits(header.ref_len)], n_vec)
    kv_size = codec.encoded_size(n_vec, head_dim)
    keys_v = codec.decode(blob[pos_end:pos_end + kv_size], n_vec, head_dim)  # (L*H*n_valid, D)
    values_v = codec.decode(blob[pos_end + kv_size:], n_vec, head_dim)

    positions = torch.full((n_layers, n_kv, k), -1, dtype=torch.int64)
    keys = torch.zeros(n_layers, n_kv, k, head_dim, dtype=dtype)
    values = torch.zeros_like(keys)
    positions[:, :, :n_valid] = pos.reshape(n_layers, n_kv, n_valid)
    keys[:, :, :n_valid] = keys_v.reshape(n_layers, n_kv, n_valid, head_dim).to(dtype)
    values[:, :, :n_valid] = values_v.reshape(n_layers, n_kv, n_valid, head_dim).to(dtype)
    return ExplicitMemory(keys=keys, values=values, positions=positions)
