"""Codecs for the K/V vectors of explicit memories (paper §3.3, App. B).

A memory holds layers * kv_heads * k key vectors and as many value vectors, each head_dim floats.
The memory bank stores them compressed: raw half precision (the paper's uncompressed bank, bf16),
per-vector int8, or vector quantization in the spirit of the paper's FAISS index
`OPQ20x80-Residual2x14-PQ8x10` (13.5 bytes per 80-dim vector instead of 160).

Every codec maps a (N, head_dim) float tensor to bytes and back, with a byte count that is a pure
function of (N, head_dim), so the memory format can check sizes before decoding anything.
One codec (for VQ, one rotation and one set of codebooks) serves the keys and the values of every
memory layer and KV head: the paper does not say whether its index is shared so, and one per layer,
head and kind would multiply the codec's tables by 2 * 22 * 8 for the paper's model.
Byte formats are little-endian whatever the host is. Decoding never needs faiss: VQ decoding is a
sum of table lookups and one matmul, so a client that only decodes needs torch and numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .bitpack import pack_uint, packed_size, unpack_uint

# Stable ids written into memory blobs; never renumber, only append. 0 is reserved for "none".
CODEC_IDS: dict[str, int] = {"fp32": 1, "fp16": 2, "bf16": 3, "int8": 4, "vq": 5}
CODEC_NAMES: dict[int, str] = {v: k for k, v in CODEC_IDS.items()}

_CHUNK_ELEMS = 1 << 23  # distance-matrix elements per chunk when assigning to centroids (32 MiB fp32)


def _name_fingerprint(name: str) -> bytes:
    return hashlib.blake2b(f"memory3.codec:{name}".encode(), digest_size=8).digest()


class MemoryCodec(ABC):
    """Turns (N, head_dim) float vectors into bytes and back.

    Subclasses implement `_encode`/`_decode`; the public methods check shapes and sizes once here,
    so every codec fails the same way on bad input.
    """

    name: str
    codec_id: int

    @abstractmethod
    def fingerprint(self) -> bytes:
        """8 bytes that identify the codec's parameters: decoding needs the same fingerprint."""

    @abstractmethod
    def bytes_per_vector(self, head_dim: int) -> float:
        """Average encoded bytes per vector (fractional when codes are bit-packed)."""

    @abstractmethod
    def encoded_size(self, n_vectors: int, head_dim: int) -> int:
        """Exact len(encode(x)) for x of shape (n_vectors, head_dim)."""

    @abstractmethod
    def _encode(self, x: Tensor) -> bytes:
        """x: (N, D) float32, finite, on CPU."""

    @abstractmethod
    def _decode(self, buf: bytes, n: int, head_dim: int) -> Tensor:
        """buf has exactly encoded_size(n, head_dim) bytes; returns (n, head_dim) float32."""

    def encode(self, vectors: Tensor) -> bytes:
        """Encode (N, head_dim) float vectors; raises ValueError on a bad shape or non-finite values."""
        if vectors.dim() != 2:
            raise ValueError(f"{self.name}: vectors must be (N, head_dim), got shape {tuple(vectors.shape)}")
        if not vectors.is_floating_point():
            raise ValueError(f"{self.name}: vectors must be floating point, got {vectors.dtype}")
        x = vectors.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name}: vectors contain NaN or inf")
        return self._encode(x)

    def decode(self, buf: bytes, n: int, head_dim: int) -> Tensor:
        """Decode n vectors of head_dim floats; returns (n, head_dim) float32 on CPU."""
        if n < 0 or head_dim <= 0:
            raise ValueError(f"{self.name}: need n >= 0 and head_dim > 0, got n={n}, head_dim={head_dim}")
        need = self.encoded_size(n, head_dim)
        if len(buf) != need:
            raise ValueError(
                f"{self.name}: {n} vectors of dim {head_dim} take {need} bytes, got a buffer of {len(buf)}"
            )
        return self._decode(bytes(buf), n, head_dim)

    def stores_nonfinite(self, buf: bytes, n: int) -> bool:
        """Whether `buf` (the encoding of n vectors) stores a NaN or an infinity, read from the bits
        without decoding. Encoding refuses them, so only a damaged or forged blob holds one, and a
        single one turns every token of its row to NaN. None here: VQ codes index tables checked
        when the codec is loaded."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _nonfinite_floats(buf: bytes, dtype: str, offset: int = 0, count: int = -1) -> bool:
    """Whether the little-endian IEEE floats in `buf` hold a NaN or an infinity: all exponent bits set."""
    bits, exponent = {"<f4": ("<u4", 0x7F800000), "<f2": ("<u2", 0x7C00), "bf16": ("<u2", 0x7F80)}[dtype]
    words = np.frombuffer(buf, dtype=bits, offset=offset, count=count)
    return bool(((words & exponent) == exponent).any())


class RawCodec(MemoryCodec):
    """Uncompressed floats: fp32, fp16, or bf16 (the upper 16 bits of the fp32 bit pattern)."""

    _ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

    def __init__(self, name: str = "bf16") -> None:
        if name not in self._ITEMSIZE:
            raise ValueError(f"RawCodec supports {sorted(self._ITEMSIZE)}, got {name!r}")
        self.name = name
        self.codec_id = CODEC_IDS[name]

    def fingerprint(self) -> bytes:
        return _name_fingerprint(self.name)

    def bytes_per_vector(self, head_dim: int) -> float:
        return float(head_dim * self._ITEMSIZE[self.name])

    def encoded_size(self, n_vectors: int, head_dim: int) -> int:
        return n_vectors * head_dim * self._ITEMSIZE[self.name]

    def _encode(self, x: Tensor) -> bytes:
        if self.name == "fp32":
            return x.numpy().astype("<f4").tobytes()
        if self.name == "fp16":
            h = x.to(torch.float16)
            if not bool(torch.isfinite(h).all()):
                raise ValueError(f"fp16: values beyond the fp16 range (|x| > 65504), max |x| = {x.abs().max():.4g}")
            return h.view(torch.int16).numpy().astype("<i2").tobytes()
        # bf16: torch rounds to nearest even; the bit pattern is the top half of the fp32 one
        b = x.to(torch.bfloat16)
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"bf16: values beyond the bf16 range (|x| > 3.39e38), max |x| = {x.abs().max():.4g}")
        return b.view(torch.int16).numpy().astype("<i2").tobytes()

    def _decode(self, buf: bytes, n: int, head_dim: int) -> Tensor:
        if self.name == "fp32":
            arr = np.frombuffer(buf, dtype="<f4").astype(np.float32)
        elif self.name == "fp16":
            arr = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        else:
            top = np.frombuffer(buf, dtype="<u2").astype("<u4") << 16  # bf16 bits -> upper half of fp32
            arr = top.view("<f4").astype(np.float32)
        return torch.from_numpy(arr.reshape(n, head_dim))

    def stores_nonfinite(self, buf: bytes, n: int) -> bool:
        return _nonfinite_floats(buf, {"fp32": "<f4", "fp16": "<f2", "bf16": "bf16"}[self.name])


class Int8Codec(MemoryCodec):
    """Per-vector symmetric int8: scale = absmax / 127 stored as fp16, then round(x / scale).

    Layout: the N fp16 scales first, then the N * head_dim int8 values, so each block is a plain
    array. The fp16 scale is rounded *up* to the next representable value when needed, so no value
    is clipped and the error per element is at most scale / 2. fp16 cannot hold scales below 2**-24,
    so vectors with absmax below ~2e-6 keep only an absolute precision of 2**-25; vectors with
    absmax above 127 * 65504 are clipped (neither happens for sane K/V).
    """

    name = "int8"
    codec_id = CODEC_IDS["int8"]

    def fingerprint(self) -> bytes:
        return _name_fingerprint(self.name)

    def bytes_per_vector(self, head_dim: int) -> float:
        return float(head_dim + 2)

    def encoded_size(self, n_vectors: int, head_dim: int) -> int:
        return n_vectors * (head_dim + 2)

    def _encode(self, x: Tensor) -> bytes:
        absmax = x.abs().amax(dim=1) if x.shape[0] else x.new_zeros(0)  # (N,)
        scale = (absmax / 127).clamp(max=65504.0)
        s16 = scale.to(torch.float16)
        low = s16.to(torch.float32) < scale  # rounded down: step to the next fp16 up (bit pattern + 1)
        s16[low] = (s16[low].view(torch.int16) + 1).view(torch.float16)
        s = s16.to(torch.float32)[:, None]  # (N, 1)
        q = torch.where(s > 0, x / s.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(x))
        q = q.round().clamp(-127, 127).to(torch.int8)  # (N, D)
        return s16.view(torch.int16).numpy().astype("<i2").tobytes() + q.numpy().tobytes()

    def _decode(self, buf: bytes, n: int, head_dim: int) -> Tensor:
        scales = np.frombuffer(buf, dtype="<f2", count=n).astype(np.float32)  # (N,)
        q = np.frombuffer(buf, dtype=np.int8, offset=2 * n).astype(np.float32).reshape(n, head_dim)
        return torch.from_numpy(q * scales[:, None])

    def stores_nonfinite(self, buf: bytes, n: int) -> bool:
        return _nonfinite_floats(buf, "<f2", count=n)  # the scales; the values are integers


class VQCodec(MemoryCodec):
    """OPQ rotation, then a greedy residual quantizer, then a product quantizer on what is left.

    Mirrors the paper's `OPQ20x80-Residual2x14-PQ8x10`: rotate x by an orthogonal OPQ matrix R
    (y = x R^T), quantize y with `rq_levels` k-means codebooks of 2**rq_bits centroids each (level
    l+1 quantizes the residual of level l), and quantize the last residual with `pq_m` sub-space
    codebooks of 2**pq_bits centroids. A vector's code is rq_levels*rq_bits + pq_m*pq_bits bits
    (108 = 13.5 bytes for the paper's values), bit-packed back to back over all vectors.

    Training uses faiss (OPQMatrix, Kmeans, ProductQuantizer). Encoding (exact nearest centroid,
    greedy over the levels) and decoding (sum of centroids, then R^T's inverse R) are plain
    torch, so a decoder needs no faiss. The residual levels are greedy, unlike faiss's beam-search
    ResidualQuantizer, so errors are comparable to but not identical with the faiss index.
    """

    codec_id = CODEC_IDS["vq"]

    def __init__(
        self,
        head_dim: int,
        *,
        opq_m: int = 20,
        rq_levels: int = 2,
        rq_bits: int = 14,
        pq_m: int = 8,
        pq_bits: int = 10,
        niter: int = 25,
        opq_niter: int = 50,
        seed: int = 1234,
    ) -> None:
        params = {"head_dim": head_dim, "opq_m": opq_m, "pq_m": pq_m, "niter": niter, "opq_niter": opq_niter}
        bad = [f"{k}={v!r}" for k, v in params.items() if not isinstance(v, int) or v <= 0]
        if not isinstance(rq_levels, int) or rq_levels < 0:
            bad.append(f"rq_levels={rq_levels!r} (must be >= 0)")
        for k, v in (("rq_bits", rq_bits), ("pq_bits", pq_bits)):
            if not isinstance(v, int) or not 1 <= v <= 24:
                bad.append(f"{k}={v!r} (must be 1..24)")
        if bad:
            raise ValueError("VQCodec: invalid parameters: " + ", ".join(bad))
        if head_dim % opq_m:
            raise ValueError(f"VQCodec: head_dim={head_dim} must be divisible by opq_m={opq_m}")
        if head_dim % pq_m:
            raise ValueError(f"VQCodec: head_dim={head_dim} must be divisible by pq_m={pq_m}")
        self.head_dim, self.opq_m, self.pq_m = head_dim, opq_m, pq_m
        self.rq_levels, self.rq_bits, self.pq_bits = rq_levels, rq_bits, pq_bits
        self.niter, self.opq_niter, self.seed = niter, opq_niter, seed
        self.name = f"vq:OPQ{opq_m}x{head_dim}-Residual{rq_levels}x{rq_bits}-PQ{pq_m}x{pq_bits}"
        self.rotation: Tensor | None = None  # (D, D) orthogonal, y = x @ rotation.T
        self.rq_centroids: Tensor | None = None  # (rq_levels, 2**rq_bits, D)
        self.pq_centroids: Tensor | None = None  # (pq_m, 2**pq_bits, D / pq_m)
        self._fingerprint: bytes | None = None

    # ---- sizes: pure functions of the parameters -----------------------------------------
    @property
    def widths(self) -> list[int]:
        """Bit width of each code field of one vector: the RQ levels, then the PQ sub-spaces."""
        return [self.rq_bits] * self.rq_levels + [self.pq_bits] * self.pq_m

    @property
    def bits_per_vector(self) -> int:
        return self.rq_levels * self.rq_bits + self.pq_m * self.pq_bits

    @property
    def is_trained(self) -> bool:
        return self.rotation is not None

    @property
    def min_train(self) -> int:
        """Fewest training vectors: every k-means needs at least as many points as centroids."""
        return max(256, 2**self.pq_bits, 2**self.rq_bits if self.rq_levels else 0)  # 256: OPQ's inner 8-bit PQ

    def _check_dim(self, head_dim: int) -> None:
        if head_dim != self.head_dim:
            raise ValueError(f"{self.name}: built for head_dim={self.head_dim}, got head_dim={head_dim}")

    def bytes_per_vector(self, head_dim: int) -> float:
        self._check_dim(head_dim)
        return self.bits_per_vector / 8

    def encoded_size(self, n_vectors: int, head_dim: int) -> int:
        self._check_dim(head_dim)
        return packed_size(self.widths, n_vectors)

    def fingerprint(self) -> bytes:
        self._require_trained()
        assert self._fingerprint is not None
        return self._fingerprint

    def _params(self) -> dict[str, int]:
        """The parameters that define the byte format and decoding (training knobs excluded)."""
        return {"head_dim": self.head_dim, "opq_m": self.opq_m, "rq_levels": self.rq_levels,
                "rq_bits": self.rq_bits, "pq_m": self.pq_m, "pq_bits": self.pq_bits}

    def _compute_fingerprint(self) -> bytes:
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps(self._params(), sort_keys=True).encode())
        for t in (self.rotation, self.rq_centroids, self.pq_centroids):
            assert t is not None
            h.update(t.contiguous().numpy().astype("<f4").tobytes())
        return h.digest()

    def _require_trained(self) -> None:
        if not self.is_trained:
            raise ValueError(f"{self.name}: codec is not trained; call train() or VQCodec.load() first")

    def _set_tables(self, rotation: Tensor, rq: Tensor, pq: Tensor) -> None:
        d, dsub = self.head_dim, self.head_dim // self.pq_m
        want = {"rotation": (d, d), "rq_centroids": (self.rq_levels, 2**self.rq_bits, d),
                "pq_centroids": (self.pq_m, 2**self.pq_bits, dsub)}
        for key, t in (("rotation", rotation), ("rq_centroids", rq), ("pq_centroids", pq)):
            if tuple(t.shape) != want[key]:
                raise ValueError(f"{self.name}: {key} has shape {tuple(t.shape)}, expected {want[key]}")
        rotation, rq, pq = (t.to(torch.float32).contiguous() for t in (rotation, rq, pq))
        for key, t in (("rotation", rotation), ("rq_centroids", rq), ("pq_centroids", pq)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{self.name}: {key} holds NaN or inf")
        err = (rotation @ rotation.T - torch.eye(d)).abs().max().item()
        if err > 1e-3:
            raise ValueError(f"{self.name}: rotation is not orthogonal (max |R R^T - I| = {err:.3g})")
        self.rotation, self.rq_centroids, self.pq_centroids = rotation, rq, pq
        self._fingerprint = self._compute_fingerprint()

    # ---- training (faiss) ------------------------------------------------------------------
    def train(self, vectors: Tensor, max_train: int = 1 << 20, progress: bool = False) -> VQCodec:
        """Fit the rotation and codebooks on (N, head_dim) vectors; returns self.

        At most `max_train` vectors are used (a seeded random sample). Needs at least `min_train`
        vectors, since each k-means needs as many points as centroids (faiss wants ~39x that).
        """
        import faiss  # training only: decoding must not need faiss

        if vectors.dim() != 2 or vectors.shape[1] != self.head_dim:
            raise ValueError(f"{self.name}: training vectors must be (N, {self.head_dim}), got {tuple(vectors.shape)}")
        x = vectors.detach().to(device="cpu", dtype=torch.float32).numpy()
        if not np.isfinite(x).all():
            raise ValueError(f"{self.name}: training vectors contain NaN or inf")
        rng = np.random.default_rng(self.seed)
        if len(x) > max_train:
            x = x[np.sort(rng.choice(len(x), size=max_train, replace=False))]
        if len(x) < self.min_train:
            raise ValueError(f"{self.name}: need at least {self.min_train} training vectors, got {len(x)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        d = self.head_dim

        started = time.perf_counter()

        def log(msg: str) -> None:
            if progress:
                print(f"[{self.name}] {time.perf_counter() - started:6.1f}s {msg}", file=sys.stderr, flush=True)

        log(f"OPQ rotation on {len(x)} vectors")
        opq = faiss.OPQMatrix(d, self.opq_m)
        opq.niter = self.opq_niter
        opq.train(x)
        rotation = torch.from_numpy(faiss.vector_to_array(opq.A).reshape(d, d).copy())  # (D_out, D_in)
        residual = torch.from_numpy(x) @ rotation.T  # (N, D) rotated

        rq = torch.zeros(self.rq_levels, 2**self.rq_bits, d)
        for level in range(self.rq_levels):
            log(f"residual level {level + 1}/{self.rq_levels}: k-means with {2**self.rq_bits} centroids")
            km = faiss.Kmeans(d, 2**self.rq_bits, niter=self.niter, seed=self.seed + level)
            km.train(np.ascontiguousarray(residual.numpy()))
            rq[level] = torch.from_numpy(km.centroids.copy())
            residual = residual - rq[level][_nearest(residual, rq[level])]  # same greedy rule as encode

        log(f"product quantizer: {self.pq_m} x {2**self.pq_bits} centroids")
        pq = faiss.ProductQuantizer(d, self.pq_m, self.pq_bits)
        pq.cp.niter = self.niter
        pq.cp.seed = self.seed + self.rq_levels
        pq.train(np.ascontiguousarray(residual.numpy()))
        pq_c = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(self.pq_m, 2**self.pq_bits, -1).copy())
        self._set_tables(rotation, rq, pq_c)
        log("trained")
        return self

    # ---- encode / decode (torch only) -------------------------------------------------------
    def codes(self, x: Tensor) -> Tensor:
        """(N, D) float32 -> (N, rq_levels + pq_m) int64 centroid indices."""
        self._require_trained()
        assert self.rotation is not None and self.rq_centroids is not None and self.pq_centroids is not None
        n = x.shape[0]
        residual = x @ self.rotation.T  # (N, D)
        out = torch.empty(n, self.rq_levels + self.pq_m, dtype=torch.int64)
        for level in range(self.rq_levels):
            idx = _nearest(residual, self.rq_centroids[level])
            out[:, level] = idx
            residual = residual - self.rq_centroids[level][idx]
        sub = residual.reshape(n, self.pq_m, self.head_dim // self.pq_m).transpose(0, 1)  # (M, N, dsub)
        out[:, self.rq_levels:] = _nearest_batched(sub, self.pq_centroids).T  # (N, M)
        return out

    def reconstruct(self, codes: Tensor) -> Tensor:
        """(N, rq_levels + pq_m) int64 -> (N, D) float32."""
        self._require_trained()
        assert self.rotation is not None and self.rq_centroids is not None and self.pq_centroids is not None
        n = codes.shape[0]
        y = self.pq_centroids[torch.arange(self.pq_m)[None, :], codes[:, self.rq_levels:]]  # (N, M, dsub)
        y = y.reshape(n, self.head_dim)  # (N, D)
        for level in range(self.rq_levels):
            y = y + self.rq_centroids[level][codes[:, level]]
        return y @ self.rotation  # orthogonal: the inverse of y = x R^T is x = y R

    def _encode(self, x: Tensor) -> bytes:
        self._require_trained()
        self._check_dim(x.shape[1])
        return pack_uint(self.codes(x).numpy(), self.widths)

    def _decode(self, buf: bytes, n: int, head_dim: int) -> Tensor:
        self._require_trained()
        return self.reconstruct(torch.from_numpy(unpack_uint(buf, self.widths, n)))

    # ---- persistence (safetensors, never pickle) ---------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the trained tables and parameters to a safetensors file."""
        from safetensors.torch import save_file

        self._require_trained()
        meta = {"format": "memory3.vqcodec", "format_version": "1", "fingerprint": self.fingerprint().hex()}
        meta.update({k: str(v) for k, v in self._params().items()})
        meta.update(niter=str(self.niter), opq_niter=str(self.opq_niter), seed=str(self.seed))
        tensors = {"rotation": self.rotation, "rq_centroids": self.rq_centroids, "pq_centroids": self.pq_centroids}
        save_file({k: t.contiguous() for k, t in tensors.items() if t is not None}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> VQCodec:
        """Read a codec written by save(); checks the format, shapes and the stored fingerprint."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        if meta.get("format") != "memory3.vqcodec" or meta.get("format_version") != "1":
            raise ValueError(
                f"{path}: not a memory3 VQ codec file (format={meta.get('format')!r}, "
                f"version={meta.get('format_version')!r}; expected 'memory3.vqcodec' version '1')"
            )
        try:
            ints: dict[str, Any] = {k: int(meta[k]) for k in ("head_dim", "opq_m", "rq_levels", "rq_bits",
                                                              "pq_m", "pq_bits", "niter", "opq_niter", "seed")}
            head_dim = ints.pop("head_dim")
            codec = cls(head_dim, **ints)
            codec._set_tables(tensors["rotation"], tensors["rq_centroids"], tensors["pq_centroids"])
        except KeyError as e:
            raise ValueError(f"{path}: VQ codec file lacks {e.args[0]!r}") from e
        if codec.fingerprint().hex() != meta.get("fingerprint"):
            raise ValueError(
                f"{path}: fingerprint {codec.fingerprint().hex()} of the stored tables does not match the "
                f"recorded {meta.get('fingerprint')!r}; the file is corrupt"
            )
        return codec


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest centroid by squared L2: (N, D), (K, D) -> (N,) int64, in row chunks."""
    c_sq = (c * c).sum(dim=1)  # (K,); ||x||^2 is constant per row and does not change the argmin
    step = max(1, _CHUNK_ELEMS // c.shape[0])
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], step):
        scores = torch.addmm(c_sq, x[s:s + step], c.T, alpha=-2)  # (n, K) = ||c||^2 - 2 x.c
        out[s:s + step] = scores.argmin(dim=1)
    return out


def _nearest_batched(x: Tensor, c: Tensor) -> Tensor:
    """Per sub-space nearest centroid: (M, N, d), (M, K, d) -> (M, N) int64."""
    m, n, _ = x.shape
    c_sq = (c * c).sum(dim=2)[:, None, :]  # (M, 1, K)
    step = max(1, _CHUNK_ELEMS // (m * c.shape[1]))
    out = torch.empty(m, n, dtype=torch.int64)
    for s in range(0, n, step):
        scores = torch.baddbmm(c_sq, x[:, s:s + step], c.transpose(1, 2), alpha=-2)  # (M, n, K)
        out[:, s:s + step] = scores.argmin(dim=2)
    return out


def codec_from_name(name: str, **kw: Any) -> MemoryCodec:
    """"fp32", "fp16", "bf16", "int8", or "vq" (an untrained VQCodec(**kw), e.g. for sizes)."""
    if name == "vq":
        return VQCodec(**kw)
    if kw:
        raise ValueError(f"codec {name!r} takes no parameters, got {sorted(kw)}")
    if name == "int8":
        return Int8Codec()
    if name in ("fp32", "fp16", "bf16"):
        return RawCodec(name)
    raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODEC_IDS)}")


def reconstruction_error(codec: MemoryCodec, vectors: Tensor) -> dict[str, float]:
    """Encode and decode (N, D) vectors; report what the round trip loses.

    Returns:
        relative_mse: sum of squared errors / sum of squared norms (0 is lossless).
        mean_cosine: mean cosine similarity between each vector and its reconstruction.
        bytes_per_vector: encoded bytes / N.
    """
    x = vectors.detach().to(device="cpu", dtype=torch.float32)
    n, d = x.shape
    buf = codec.encode(x)
    x_hat = codec.decode(buf, n, d)
    norm = float((x * x).sum())
    return {
        "relative_mse": float(((x_hat - x) ** 2).sum()) / norm if norm > 0 else math.nan,
        "mean_cosine": float(F.cosine_similarity(x_hat, x, dim=1).mean()) if n else math.nan,
        "bytes_per_vector": len(buf) / n if n else math.nan,
    }
