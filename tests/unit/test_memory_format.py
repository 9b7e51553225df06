"""The memory blob format: round trips for every codec, exact sizes, and clear rejection of bad blobs."""

from __future__ import annotations

import hashlib
import math
import struct

import pytest
import torch

from memory3.model.codecs import MemoryCodec, RawCodec, VQCodec, codec_from_name
from memory3.model.memory import ExplicitMemory
from memory3.model.memory_format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MemoryFormatError,
    MemoryHeader,
    decode_memory,
    encode_memory,
    memory_size,
    paper_bytes_per_memory,
    validate_memory,
)

HEAD = struct.Struct("<4sHBBHHHHHH8sI")  # the documented layout, written out independently of the module
FIELDS = ("magic", "version", "codec_id", "flags", "n_layers", "n_kv", "k", "head_dim", "ref_len", "n_valid",
          "fingerprint", "payload_len")
SHAPE = (2, 3, 4, 16)  # layers, kv heads, k, head_dim
VQ_PARAMS = {"opq_m": 4, "rq_levels": 2, "rq_bits": 5, "pq_m": 4, "pq_bits": 4, "niter": 5, "opq_niter": 4}


def make_memory(shape: tuple[int, int, int, int] = SHAPE, n_valid: int | None = None, ref_len: int = 32,
                seed: int = 0) -> ExplicitMemory:
    """Random K/V; per head n_valid sorted distinct positions then -1 padding (whose K/V are junk)."""
    n_layers, n_kv, k, d = shape
    n_valid = k if n_valid is None else n_valid
    g = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(ref_len, generator=g)[:n_valid].sort().values for _ in range(n_layers * n_kv)]
    valid = torch.stack(picks).reshape(n_layers, n_kv, n_valid)  # (L, H, n_valid)
    positions = torch.cat([valid, torch.full((n_layers, n_kv, k - n_valid), -1)], dim=-1)  # (L, H, k)
    return ExplicitMemory(torch.randn(shape, generator=g), torch.randn(shape, generator=g), positions)


@pytest.fixture(scope="module")
def vq() -> VQCodec:
    g = torch.Generator().manual_seed(7)
    data = torch.randn(600, 4, generator=g) @ torch.randn(4, 16, generator=g) + 0.1 * torch.randn(600, 16, generator=g)
    return VQCodec(16, seed=0, **VQ_PARAMS).train(data)


def all_codecs(vq: VQCodec) -> list[MemoryCodec]:
    return [codec_from_name(n) for n in ("fp32", "fp16", "bf16", "int8")] + [vq]


def reseal(blob: bytes, **changes: object) -> bytes:
    """Rewrite header fields and recompute the checksum: a well-formed blob that lies about itself."""
    fields = dict(zip(FIELDS, HEAD.unpack_from(blob), strict=True))
    fields.update(changes)
    head = HEAD.pack(*fields.values())
    payload = blob[HEADER_SIZE:]
    return head + hashlib.blake2b(head + payload, digest_size=16).digest() + payload


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_valid", [4, 3, 0])
def test_round_trip_every_codec(vq: VQCodec, n_valid: int) -> None:
    mem = make_memory(n_valid=n_valid)
    n_vec = SHAPE[0] * SHAPE[1] * n_valid
    for codec in all_codecs(vq):
        blob = encode_memory(mem, codec, ref_len=32)
        assert len(blob) == memory_size(SHAPE, codec, 32, n_valid)
        out = decode_memory(blob, codec, expected_shape=SHAPE)
        assert out.shape == SHAPE and out.keys.dtype == torch.float32
        assert torch.equal(out.positions, mem.positions)
        for got, want in ((out.keys, mem.keys), (out.values, mem.values)):
            valid = want[:, :, :n_valid].reshape(n_vec, 16)  # (L*H*n_valid, D)
            expected = codec.decode(codec.encode(valid), n_vec, 16).reshape(2, 3, n_valid, 16)
            assert torch.equal(got[:, :, :n_valid], expected), codec.name
            assert not got[:, :, n_valid:].any(), f"{codec.name}: padding slots must decode to zeros"


def test_fp32_round_trip_is_exact() -> None:
    mem = make_memory()
    out = decode_memory(encode_memory(mem, RawCodec("fp32"), 32), RawCodec("fp32"))
    assert torch.equal(out.keys, mem.keys) and torch.equal(out.values, mem.values)


def test_reference_shorter_than_k() -> None:
    shape = (2, 2, 8, 16)
    mem = make_memory(shape, n_valid=5, ref_len=5)  # a 5-token reference: every token kept, 3 padding slots
    codec = codec_from_name("bf16")
    blob = encode_memory(mem, codec, ref_len=128)
    assert len(blob) == memory_size(shape, codec, 128, n_valid=5) < memory_size(shape, codec, 128)
    out = decode_memory(blob, codec)
    assert torch.equal(out.positions, mem.positions)
    assert torch.equal(out.valid, mem.positions >= 0)
    assert not out.keys[:, :, 5:].any() and not out.values[:, :, 5:].any()


def test_one_token_window_needs_no_position_bits() -> None:
    mem = ExplicitMemory(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), torch.zeros(1, 1, 1, dtype=torch.int64))
    codec = codec_from_name("fp32")
    blob = encode_memory(mem, codec, ref_len=1)
    assert len(blob) == HEADER_SIZE + 2 * 16
    assert torch.equal(decode_memory(blob, codec).positions, mem.positions)


def test_decode_dtype() -> None:
    out = decode_memory(encode_memory(make_memory(), codec_from_name("int8"), 32), codec_from_name("int8"),
                        dtype=torch.bfloat16)
    assert out.keys.dtype == out.values.dtype == torch.bfloat16
    assert out.positions.dtype == torch.int64


def test_header_layout() -> None:
    codec = codec_from_name("fp16")
    blob = encode_memory(make_memory(n_valid=3), codec, ref_len=32)
    fields = dict(zip(FIELDS, HEAD.unpack_from(blob), strict=True))
    assert fields == {
        "magic": b"M3KV", "version": FORMAT_VERSION, "codec_id": codec.codec_id, "flags": 0, "n_layers": 2,
        "n_kv": 3, "k": 4, "head_dim": 16, "ref_len": 32, "n_valid": 3, "fingerprint": codec.fingerprint(),
        "payload_len": len(blob) - HEADER_SIZE,
    }
    assert HEAD.size + 16 == HEADER_SIZE
    assert reseal(blob) == blob  # the checksum is blake2b-128 over header-without-checksum + payload


# ---- sizes ---------------------------------------------------------------------------------
def test_paper_vq_blob_fits_the_paper_budget() -> None:
    codec = VQCodec(80, opq_m=20, rq_levels=2, rq_bits=14, pq_m=8, pq_bits=10)  # sizes need no training
    n_vectors = 22 * 8 * 8 * 2  # layers * kv heads * tokens, keys and values
    assert paper_bytes_per_memory(codec) == memory_size((22, 8, 8, 80), codec, 128)
    assert paper_bytes_per_memory(codec) <= n_vectors * 14  # the paper's 14 B per vector, header included


def test_paper_raw_size_is_kv_plus_overhead() -> None:
    codec = codec_from_name("bf16")
    n_slots = 22 * 8 * 8
    assert paper_bytes_per_memory(codec) == HEADER_SIZE + math.ceil(n_slots * 7 / 8) + 2 * n_slots * 80 * 2


def test_memory_size_validation() -> None:
    with pytest.raises(ValueError, match="n_valid=5 must be in 0..k=4"):
        memory_size(SHAPE, codec_from_name("fp16"), 32, n_valid=5)


# ---- rejected blobs ------------------------------------------------------------------------
@pytest.fixture
def blob() -> bytes:
    return encode_memory(make_memory(n_valid=3), codec_from_name("fp16"), ref_len=32)


def test_rejects_bad_magic(blob: bytes) -> None:
    with pytest.raises(MemoryFormatError, match=r"magic b'XXKV', expected b'M3KV'"):
        decode_memory(b"XX" + blob[2:], codec_from_name("fp16"))


def test_rejects_unsupported_version(blob: bytes) -> None:
    future = blob[:4] + struct.pack("<H", FORMAT_VERSION + 1) + blob[6:]
    with pytest.raises(MemoryFormatError, match=f"unsupported memory format version {FORMAT_VERSION + 1}"):
        decode_memory(future, codec_from_name("fp16"))
    with pytest.raises(MemoryFormatError, match="unsupported memory format version"):
        decode_memory(reseal(blob, version=0), codec_from_name("fp16"))


def test_rejects_wrong_shape(blob: bytes) -> None:
    with pytest.raises(MemoryFormatError, match=r"blob is \(2, 3, 4, 16\), expected \(2, 3, 8, 16\)"):
        decode_memory(blob, codec_from_name("fp16"), expected_shape=(2, 3, 8, 16))


def test_rejects_wrong_codec(blob: bytes) -> None:
    with pytest.raises(MemoryFormatError, match=r"encoded with codec 2 \(fp16\), decoding with 3 \(bf16\)"):
        decode_memory(blob, codec_from_name("bf16"))


def test_rejects_other_trained_codec(vq: VQCodec) -> None:
    other = VQCodec(16, seed=1, **VQ_PARAMS)
    other._set_tables(vq.rotation, vq.rq_centroids + 1e-3, vq.pq_centroids)  # same shape, different tables
    blob = encode_memory(make_memory(), vq, ref_len=32)
    with pytest.raises(MemoryFormatError, match="fingerprint mismatch"):
        decode_memory(blob, other)


@pytest.mark.parametrize("keep", [0, 20, HEADER_SIZE, -1])
def test_rejects_truncated_blob(blob: bytes, keep: int) -> None:
    with pytest.raises(MemoryFormatError, match="truncated"):
        decode_memory(blob[:keep], codec_from_name("fp16"))


def test_rejects_trailing_bytes(blob: bytes) -> None:
    with pytest.raises(MemoryFormatError, match="2 trailing bytes"):
        decode_memory(blob + b"\0\0", codec_from_name("fp16"))


@pytest.mark.parametrize("offset", [HEADER_SIZE, HEADER_SIZE + 30, -1, 9, 21, 40])  # payload, header, checksum
def test_rejects_flipped_byte(blob: bytes, offset: int) -> None:
    bad = bytearray(blob)
    bad[offset] ^= 0x10
    with pytest.raises(MemoryFormatError, match="checksum mismatch"):
        decode_memory(bytes(bad), codec_from_name("fp16"))


def test_rejects_payload_length_mismatch(blob: bytes) -> None:
    with pytest.raises(MemoryFormatError, match="payload length mismatch: header says"):
        decode_memory(reseal(blob, n_valid=4), codec_from_name("fp16"))


def test_rejects_reserved_flags(blob: bytes) -> None:
    with pytest.raises(MemoryFormatError, match="unsupported flags 0x01"):
        decode_memory(reseal(blob, flags=1), codec_from_name("fp16"))


def test_format_errors_are_value_errors() -> None:
    assert issubclass(MemoryFormatError, ValueError)


# ---- rejected memories ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ([[3, 5, -1, -1], [2, 4, 6, -1]], "same number of valid slots"),
        ([[-1, 3, 5, 7], [1, 2, 3, -1]], "padding slots must be the tail"),
        ([[5, 3, 9, -1], [1, 2, 3, -1]], "strictly ascending"),
        ([[3, 3, 9, -1], [1, 2, 3, -1]], "strictly ascending"),
        ([[3, 5, 32, -1], [1, 2, 3, -1]], "must be < ref_len=32"),
    ],
)
def test_encoder_rejects_bad_slot_layout(positions: list[list[int]], message: str) -> None:
    pos = torch.tensor(positions).reshape(1, 2, 4)
    mem = ExplicitMemory(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), pos)
    with pytest.raises(ValueError, match=message):
        encode_memory(mem, codec_from_name("fp16"), ref_len=32)


def test_encoder_rejects_oversized_dimensions() -> None:
    with pytest.raises(ValueError, match="ref_len=70000"):
        encode_memory(make_memory(), codec_from_name("fp16"), ref_len=70000)


# ---- validation without decoding -----------------------------------------------------------
def test_validate_returns_the_verified_header(blob: bytes) -> None:
    header = validate_memory(blob, codec_from_name("fp16"), expected_shape=SHAPE)
    assert header == MemoryHeader(version=FORMAT_VERSION, codec_id=codec_from_name("fp16").codec_id, shape=SHAPE,
                                  ref_len=32, n_valid=3, fingerprint=codec_from_name("fp16").fingerprint(),
                                  payload_len=len(blob) - HEADER_SIZE)
    assert validate_memory(memoryview(blob), codec_from_name("fp16")).shape == SHAPE


def test_validate_never_decodes_vectors(vq: VQCodec, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = encode_memory(make_memory(), vq, ref_len=32)

    def refuse(*args, **kwargs):
        raise AssertionError("validate_memory decoded the K/V payload")

    monkeypatch.setattr(vq, "decode", refuse)
    assert validate_memory(blob, vq, expected_shape=SHAPE).n_valid == SHAPE[2]


def _bad_blobs(blob: bytes) -> dict[str, tuple[bytes, str, tuple | None]]:
    flipped = bytearray(blob)
    flipped[HEADER_SIZE + 3] ^= 0x01
    return {
        "magic": (b"XX" + blob[2:], "not a memory blob", None),
        "version": (reseal(blob, version=FORMAT_VERSION + 1), "unsupported memory format version", None),
        "truncated": (blob[:-1], "truncated", None),
        "trailing": (blob + b"\0", "trailing bytes", None),
        "checksum": (bytes(flipped), "checksum mismatch", None),
        "flags": (reseal(blob, flags=1), "unsupported flags", None),
        "codec": (reseal(blob, codec_id=3), "codec mismatch", None),
        "fingerprint": (reseal(blob, fingerprint=b"\1" * 8), "fingerprint mismatch", None),
        "shape": (blob, "shape mismatch", (2, 3, 8, 16)),
        "payload length": (reseal(blob, n_valid=4), "payload length mismatch", None),
        "position": (reseal(blob, ref_len=17), "outside 0..16", None),  # same 5 position bits
    }


@pytest.mark.parametrize("case", ["magic", "version", "truncated", "trailing", "checksum", "flags", "codec",
                                  "fingerprint", "shape", "payload length", "position"])
def test_validate_and_decode_reject_the_same_blobs(blob: bytes, case: str) -> None:
    bad, message, shape = _bad_blobs(blob)[case]
    with pytest.raises(MemoryFormatError, match=message):
        validate_memory(bad, codec_from_name("fp16"), expected_shape=shape)
    with pytest.raises(MemoryFormatError, match=message):
        decode_memory(bad, codec_from_name("fp16"), expected_shape=shape)


# ---- non-finite payloads -----------------------------------------------------------------------
def _forged(blob: bytes, codec: MemoryCodec, part: str, value: float) -> bytes:
    """`blob` with its first stored key or value float (for int8, its first scale) set to `value`, resealed:
    a well-formed blob whose content encoding never writes."""
    n_layers, n_kv, _k, d = SHAPE
    fields = dict(zip(FIELDS, HEAD.unpack_from(blob), strict=True))
    n_vec = n_layers * n_kv * fields["n_valid"]
    start = HEADER_SIZE + math.ceil(n_vec * math.ceil(math.log2(fields["ref_len"])) / 8)
    if part == "values":
        start += codec.encoded_size(n_vec, d)
    fmt = {"fp32": "<f", "fp16": "<e", "int8": "<e"}.get(codec.name)
    word = struct.pack(fmt, value) if fmt else struct.pack("<f", value)[2:]  # bf16: the fp32's top half
    bad = blob[:start] + word + blob[start + len(word):]
    return reseal(bad)


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("part", ["keys", "values"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_stored_nan_or_infinity_is_refused(name: str, part: str, value: float) -> None:
    """Encoding refuses them; one in a forged or damaged blob turned every token of its row to NaN."""
    codec = codec_from_name(name)
    blob = encode_memory(make_memory(), codec, ref_len=32)
    assert validate_memory(_forged(blob, codec, part, 1.0), codec)  # the forging itself leaves a valid blob
    bad = _forged(blob, codec, part, value)
    for check in (validate_memory, decode_memory):
        with pytest.raises(MemoryFormatError, match=f"the {part} hold NaN or inf"):
            check(bad, codec)


def test_a_vq_codec_with_nan_tables_is_refused(vq: VQCodec) -> None:
    rotation = vq.rotation.clone()
    rotation[0, 0] = math.nan
    with pytest.raises(ValueError, match="rotation holds NaN or inf"):
        VQCodec(16, seed=0, **VQ_PARAMS)._set_tables(rotation, vq.rq_centroids, vq.pq_centroids)
    centroids = vq.pq_centroids.clone()
    centroids[1, 2, 0] = math.inf
    with pytest.raises(ValueError, match="pq_centroids holds NaN or inf"):
        VQCodec(16, seed=0, **VQ_PARAMS)._set_tables(vq.rotation, vq.rq_centroids, centroids)


@pytest.mark.parametrize("shape", [(2, 3, 4, 0), (0, 3, 4, 16), (65535, 65535, 65535, 65535)])
def test_a_header_of_an_empty_or_huge_shape_is_refused_before_allocating(blob: bytes, shape) -> None:
    """Without an expected shape, the header's was trusted: an allocator error, or a codec's ValueError."""
    n_layers, n_kv, k, head_dim = shape
    bad = reseal(blob, n_layers=n_layers, n_kv=n_kv, k=k, head_dim=head_dim, n_valid=0)
    with pytest.raises(MemoryFormatError, match="empty or larger than any model's memory"):
        decode_memory(bad, codec_from_name("fp16"))
