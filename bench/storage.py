"""Storage benchmark: bytes per memory for each codec, and what each codec loses.

Sizes are exact blob sizes of our byte format (header and positions included) at the paper's
Memory3-2.4B layout (22 layers x 8 KV heads x 8 tokens x 80 dims, K and V); they depend only on
the codec's parameters. Reconstruction error is measured on K/V that a real model wrote for real
text: references cut from the Python standard library's source files, encoded by the `small`
model (or a given checkpoint). Codecs are trained on 80% of the references and scored on the rest.
"""

from __future__ import annotations

import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from memory3.model.checkpoint import load_checkpoint, load_tokenizer
from memory3.model.codecs import Int8Codec, MemoryCodec, RawCodec, VQCodec, reconstruction_error
from memory3.model.config import Memory3Config
from memory3.model.encoder import encode_batch
from memory3.model.init import random_model
from memory3.model.memory_format import paper_bytes_per_memory
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer

from .machine import machine_info

PAPER_VQ = {"opq_m": 20, "rq_levels": 2, "rq_bits": 14, "pq_m": 8, "pq_bits": 10}
PAPER_VQ_BYTES = 39_424  # 2816 vectors x 14 B (paper §3.3 / App. B)


def stdlib_texts() -> Iterator[str]:
    """Real English and code, present on every Python install, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def reference_tokens(codec: TextCodec, ref_len: int, count: int) -> list[list[int]]:
    refs: list[list[int]] = []
    for text in stdlib_texts():
        ids = codec.encode(text)
        refs.extend(ids[i : i + ref_len] for i in range(0, len(ids) - ref_len + 1, ref_len))
        if len(refs) >= count:
            return refs[:count]
    raise ValueError(f"only {len(refs)} references of {ref_len} tokens found in the standard library")


def encoded_vectors(model, refs, prefix, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of all kept tokens: (N_refs, vectors per memory, head_dim) each."""
    keys, values = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(refs), batch_size), desc="encoding references", unit="batch",
                          file=sys.stderr):
            k, v, _ = encode_batch(model, refs[start : start + batch_size], prefix)
            keys.append(k.flatten(1, 3).float())  # (n, L_mem*H_kv*k, D)
            values.append(v.flatten(1, 3).float())
    return torch.cat(keys), torch.cat(values)


def run_storage_bench(
    *, preset: str = "small", checkpoint: Path | None = None, n_references: int = 2048,
    rq_bits: int = PAPER_VQ["rq_bits"], pq_bits: int = PAPER_VQ["pq_bits"], niter: int = 10, seed: int = 0,
) -> dict:
    if checkpoint is not None:
        model = load_checkpoint(checkpoint)
        text_codec = TextCodec(load_tokenizer(checkpoint))
        weights = f"checkpoint {checkpoint}"
    else:
        model = random_model(Memory3Config.from_name(preset), seed=seed)
        text_codec = TextCodec(byte_level_tokenizer())
        weights = "random init"
    config = model.config
    refs = reference_tokens(text_codec, config.ref_len, n_references)
    keys, values = encoded_vectors(model, refs, text_codec.reference_prefix(config))
    n_train = int(0.8 * len(refs))
    train = torch.cat([keys[:n_train], values[:n_train]]).flatten(0, 1)  # (n_vectors, D)

    head_dim = config.head_dim
    vq_shape = {**PAPER_VQ, "rq_bits": rq_bits, "pq_bits": pq_bits, "opq_m": head_dim // 4}
    vq = VQCodec(head_dim, niter=niter, opq_niter=niter, seed=seed, **vq_shape)
    started = time.perf_counter()
    vq.train(train, progress=True)
    vq_train_s = time.perf_counter() - started

    measured: dict[str, MemoryCodec] = {"fp16": RawCodec("fp16"), "bf16": RawCodec("bf16"), "int8": Int8Codec(),
                                        "vq": vq}
    paper_codecs: dict[str, MemoryCodec] = {
        "fp16": RawCodec("fp16"), "bf16": RawCodec("bf16"), "int8": Int8Codec(),
        "vq": VQCodec(80, **{**PAPER_VQ, "rq_bits": rq_bits, "pq_bits": pq_bits}),
    }
    sizes = {name: paper_bytes_per_memory(codec) for name, codec in paper_codecs.items()}
    test_k, test_v = keys[n_train:].flatten(0, 1), values[n_train:].flatten(0, 1)
    reconstruction = {}
    for name, codec in measured.items():
        k_err, v_err = reconstruction_error(codec, test_k), reconstruction_error(codec, test_v)
        reconstruction[name] = {
            "rel_mse": round((k_err["relative_mse"] + v_err["relative_mse"]) / 2, 8),
            "keys_rel_mse": round(k_err["relative_mse"], 8), "values_rel_mse": round(v_err["relative_mse"], 8),
            "keys_cosine": round(k_err["mean_cosine"], 6), "values_cosine": round(v_err["mean_cosine"], 6),
        }
    best = min(sizes, key=sizes.get)
    summary = {
        "paper_config_bytes_per_memory": sizes,
        "best_codec": best,
        "best_bytes_per_memory": sizes[best],
        "best_codec_rel_mse": reconstruction[best]["rel_mse"],
        "paper_sparse_bf16_bytes": 450_560,
        "paper_vq_bytes": PAPER_VQ_BYTES,
    }
    return {
        "benchmark": "storage",
        "summary": summary,
        **summary,
        "reconstruction": reconstruction,
        "setup": {
            "preset": config.name, "weights": weights, "references": len(refs), "train_references": n_train,
            "text": "Python standard library sources", "vq": vq.name, "vq_paper_layout": paper_codecs["vq"].name,
            "vq_niter": niter, "vq_train_seconds": round(vq_train_s, 1), "train_vectors": len(train),
            "bytes_include": "48-byte header + bit-packed positions + K and V codes",
        },
        "machine": machine_info(),
    }
