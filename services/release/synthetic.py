"""A release with random weights over synthetic documents, for benchmarks and service tests.

Speed does not depend on the weights, and everything else a trained release has (tokenizer,
memory bank, index, conventions) is real; only the answers are meaningless.
"""

from __future__ import annotations

from collections.abc import Sequence

from memory3.model.codecs import codec_from_name
from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer

from ..storage.object_store import ObjectStore
from .manifest import Manifest, release_key
from .publish import MANIFEST_FILE, publish_release


def publish_random_release(store: ObjectStore, name: str, documents: Sequence[tuple[str, str]], *,
                           preset: str = "tiny", codec: str = "bf16", seed: int = 0, embedder=None,
                           progress: bool = False) -> Manifest:
    """Publish `name` unless the bucket has it (the same inputs give the same release)."""
    from ..trainer.kb import build_references

    key = release_key(name, MANIFEST_FILE)
    if not store.exists(key):
        config = Memory3Config.from_name(preset)
        text_codec = TextCodec(byte_level_tokenizer())
        references = list(build_references(documents, text_codec, config.ref_len))
        if embedder is None:
            from ..retrieval.embedder import Embedder
            embedder = Embedder()
        publish_release(store, name, model=random_model(config, seed=seed), codec=text_codec, references=references,
                        embed=embedder.embed, embedder_name=embedder.name, memory_codec=codec_from_name(codec),
                        provenance={"purpose": "random weights for benchmarks and tests", "seed": seed},
                        progress=progress, log=lambda _msg: None)
    return Manifest.from_json(store.get_bytes(key).decode())
