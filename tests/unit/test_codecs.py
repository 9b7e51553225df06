"""K/V codecs: exact sizes, little-endian layouts, error bounds, and a VQ codec that beats a trivial baseline."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memory3.model.codecs import (
    Int8Codec,
    MemoryCodec,
    RawCodec,
    VQCodec,
    codec_from_name,
    reconstruction_error,
)

FIXED = ("fp32", "fp16", "bf16", "int8")
SMALL_VQ = {"opq_m": 4, "rq_levels": 2, "rq_bits": 6, "pq_m": 4, "pq_bits": 4, "niter": 10, "opq_niter": 8, "seed": 0}


def _gaussian(n: int = 64, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.logspace(-2, 1, d)  # magnitudes over three decades


def _structured(n: int, seed: int, d: int = 16) -> torch.Tensor:
    """Clustered vectors on a low-rank subspace plus noise; the structure is fixed, the samples vary."""
    s = torch.Generator().manual_seed(1000)
    offset = torch.randn(d, generator=s) * 2
    centers = torch.randn(12, d, generator=s) * 2
    basis = torch.randn(3, d, generator=s)
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, len(centers), (n,), generator=g)
    return offset + centers[which] + torch.randn(n, 3, generator=g) @ basis + 0.05 * torch.randn(n, d, generator=g)


@pytest.fixture(scope="module")
def vq() -> VQCodec:
    return VQCodec(16, **SMALL_VQ).train(_structured(3000, seed=1))


# ---- all codecs ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXED)
def test_sizes_are_exact(name: str) -> None:
    codec = codec_from_name(name)
    for n in (0, 1, 7):
        buf = codec.encode(_gaussian(n))
        assert len(buf) == codec.encoded_size(n, 16) == n * codec.bytes_per_vector(16)
        assert codec.decode(buf, n, 16).shape == (n, 16)


@pytest.mark.parametrize("name", FIXED)
def test_decode_rejects_wrong_length(name: str) -> None:
    codec = codec_from_name(name)
    buf = codec.encode(_gaussian(4))
    with pytest.raises(ValueError, match=f"4 vectors of dim 16 take {len(buf)} bytes, got a buffer of {len(buf) - 1}"):
        codec.decode(buf[:-1], 4, 16)


@pytest.mark.parametrize("name", FIXED)
def test_encode_rejects_bad_input(name: str) -> None:
    codec = codec_from_name(name)
    with pytest.raises(ValueError, match="NaN or inf"):
        codec.encode(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\(N, head_dim\)"):
        codec.encode(torch.zeros(2, 3, 4))


def test_fingerprints_identify_codecs(vq: VQCodec) -> None:
    codecs: list[MemoryCodec] = [codec_from_name(n) for n in FIXED] + [vq]
    prints = [c.fingerprint() for c in codecs]
    assert all(len(p) == 8 for p in prints)
    assert len(set(prints)) == len(prints)
    assert len({c.codec_id for c in codecs}) == len(codecs)
    assert RawCodec("fp16").fingerprint() == codec_from_name("fp16").fingerprint()


def test_codec_from_name() -> None:
    assert isinstance(codec_from_name("int8"), Int8Codec)
    assert codec_from_name("bf16").name == "bf16"
    assert isinstance(codec_from_name("vq", head_dim=80), VQCodec)
    with pytest.raises(ValueError, match="unknown codec 'int4'"):
        codec_from_name("int4")
    with pytest.raises(ValueError, match="takes no parameters"):
        codec_from_name("fp16", head_dim=80)


# ---- raw -----------------------------------------------------------------------------------
def test_fp32_is_exact() -> None:
    x = _gaussian()
    assert torch.equal(RawCodec("fp32").decode(RawCodec("fp32").encode(x), 64, 16), x)
    assert reconstruction_error(RawCodec("fp32"), x)["relative_mse"] == 0.0


def test_fp16_relative_error() -> None:
    x = _gaussian()
    err = (RawCodec("fp16").decode(RawCodec("fp16").encode(x), 64, 16) - x).abs()
    assert bool((err <= 2**-11 * x.abs() + 2**-25).all())  # half an ulp; 2**-25 covers fp16 subnormals
    assert reconstruction_error(RawCodec("fp16"), x)["relative_mse"] < 2**-22


def test_bf16_is_the_top_half_of_fp32() -> None:
    x = _gaussian()
    out = RawCodec("bf16").decode(RawCodec("bf16").encode(x), 64, 16)
    assert torch.equal(out, x.to(torch.bfloat16).float())
    assert bool(((out - x).abs() <= 2**-8 * x.abs()).all())


@pytest.mark.parametrize(("name", "expected"), [("fp32", "0000803f"), ("fp16", "003c"), ("bf16", "803f")])
def test_raw_layouts_are_little_endian(name: str, expected: str) -> None:
    assert RawCodec(name).encode(torch.tensor([[1.0]])).hex() == expected


def test_fp16_overflow_is_rejected() -> None:
    with pytest.raises(ValueError, match="fp16 range"):
        RawCodec("fp16").encode(torch.tensor([[1e6]]))


# ---- int8 ----------------------------------------------------------------------------------
def test_int8_error_bound() -> None:
    x = torch.cat([_gaussian(), 1e-6 * _gaussian(4, seed=1), torch.zeros(1, 16)])  # tiny rows: subnormal scales
    out = Int8Codec().decode(Int8Codec().encode(x), len(x), 16)
    # half a step: the fp16 scale rounds up, by at most one ulp (2**-24 among fp16 subnormals)
    bound = x.abs().amax(dim=1, keepdim=True) / 254 * (1 + 2**-9) + 2**-25
    assert bool(((out - x).abs() <= bound).all())
    assert torch.equal(out[-1], torch.zeros(16))
    assert reconstruction_error(Int8Codec(), x)["relative_mse"] < 1e-4


def test_int8_layout() -> None:
    buf = Int8Codec().encode(torch.tensor([[127.0, -63.5], [0.0, 0.0]]))
    assert buf == bytes.fromhex("003c" "0000" "7fc0" "0000")  # fp16 scales 1.0 and 0.0, then int8 127, -64


# ---- VQ ------------------------------------------------------------------------------------
def test_vq_beats_the_mean_vector(vq: VQCodec) -> None:
    train_mean = _structured(3000, seed=1).mean(dim=0)
    x = _structured(500, seed=2)  # held out
    baseline = float(((x - train_mean) ** 2).sum() / (x**2).sum())
    err = reconstruction_error(vq, x)
    assert err["relative_mse"] < 0.05 * baseline
    assert err["mean_cosine"] > 0.99
    assert err["bytes_per_vector"] == pytest.approx((2 * 6 + 4 * 4) / 8, abs=1 / 500)


def test_vq_decode_matches_codes(vq: VQCodec) -> None:
    x = _structured(33, seed=3)
    buf = vq.encode(x)
    assert len(buf) == vq.encoded_size(33, 16) == math.ceil(33 * 28 / 8)
    codes = vq.codes(x)
    assert codes.shape == (33, 6)
    assert int(codes[:, :2].max()) < 2**6 and int(codes[:, 2:].max()) < 2**4
    assert torch.allclose(vq.decode(buf, 33, 16), vq.reconstruct(codes), atol=1e-6)
    assert vq.encode(torch.zeros(0, 16)) == b""
    assert vq.decode(b"", 0, 16).shape == (0, 16)


def test_vq_rotation_is_orthogonal(vq: VQCodec) -> None:
    assert vq.rotation is not None
    assert torch.allclose(vq.rotation @ vq.rotation.T, torch.eye(16), atol=1e-4)
    assert not torch.allclose(vq.rotation, torch.eye(16))  # OPQ really rotated


def test_vq_save_load_round_trip(vq: VQCodec, tmp_path: Path) -> None:
    path = tmp_path / "vq.safetensors"
    vq.save(path)
    loaded = VQCodec.load(path)
    x = _structured(100, seed=4)
    assert loaded.encode(x) == vq.encode(x)
    assert loaded.fingerprint() == vq.fingerprint()
    assert loaded.name == vq.name


def test_vq_load_rejects_tampered_file(vq: VQCodec, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "vq.safetensors"
    vq.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["pq_centroids"] = tensors["pq_centroids"] + 1e-3
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="fingerprint .* does not match"):
        VQCodec.load(path)
    save_file(tensors, str(path), metadata={**meta, "format": "other"})
    with pytest.raises(ValueError, match="not a memory3 VQ codec file"):
        VQCodec.load(path)


def test_vq_untrained_is_rejected() -> None:
    codec = VQCodec(16, **SMALL_VQ)
    for call in (lambda: codec.encode(torch.zeros(2, 16)), lambda: codec.decode(b"\0" * 7, 2, 16), codec.fingerprint):
        with pytest.raises(ValueError, match="not trained"):
            call()


def test_vq_parameter_validation() -> None:
    with pytest.raises(ValueError, match="head_dim=80 must be divisible by pq_m=6"):
        VQCodec(80, pq_m=6)
    with pytest.raises(ValueError, match="head_dim=80 must be divisible by opq_m=3"):
        VQCodec(80, opq_m=3)
    with pytest.raises(ValueError, match="rq_bits"):
        VQCodec(80, rq_bits=0)
    with pytest.raises(ValueError, match="built for head_dim=16"):
        VQCodec(16, **SMALL_VQ).encoded_size(4, 80)


def test_vq_training_validation() -> None:
    codec = VQCodec(16, **SMALL_VQ)
    with pytest.raises(ValueError, match="need at least 256 training vectors, got 100"):
        codec.train(_structured(100, seed=0))
    with pytest.raises(ValueError, match=r"must be \(N, 16\)"):
        codec.train(torch.zeros(1000, 8))


def test_vq_paper_size_needs_no_training() -> None:
    codec = VQCodec(80, opq_m=20, rq_levels=2, rq_bits=14, pq_m=8, pq_bits=10)
    assert codec.bytes_per_vector(80) == (2 * 14 + 8 * 10) / 8
    assert codec.encoded_size(2, 80) == 2 * (2 * 14 + 8 * 10) // 8
    assert not codec.is_trained


def test_decoding_needs_no_faiss(vq: VQCodec, tmp_path: Path) -> None:
    path = tmp_path / "vq.safetensors"
    vq.save(path)
    x = _structured(8, seed=5)
    blob = vq.encode(x).hex()
    script = (
        "import sys; sys.modules['faiss'] = None\n"  # any `import faiss` now raises ImportError
        "from memory3.model.codecs import VQCodec\n"
        f"c = VQCodec.load({str(path)!r})\n"
        f"print(c.decode(bytes.fromhex({blob!r}), 8, 16).sum().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert float(out) == pytest.approx(float(vq.decode(bytes.fromhex(blob), 8, 16).sum()), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("name, big", [("fp16", 7e4), ("bf16", 3.4e38)])
def test_encode_refuses_what_its_precision_would_store_as_infinity(name: str, big: float) -> None:
    """Finite floats past the half type's range round to inf, which validation then refuses on every read."""
    with pytest.raises(ValueError, match=f"beyond the {name} range"):
        codec_from_name(name).encode(torch.tensor([[1.0, big]]))
