"""A small real release, published in seconds, for tests of the services that serve releases.

Random-init `tiny` model, byte-level tokenizer, a dozen references of invented facts, the real
embedder and FAISS index, the real publication path (manifest last). Nothing is trained, so
generated text is meaningless; everything else (bank keys, blobs, index, conventions) is what a
trained release has. Use the session fixture `random_release` (tests/integration/conftest.py), or
call `build_random_release` for a release of your own (another name, codec or documents).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memory3.model.codecs import MemoryCodec, codec_from_name
from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.model import Transformer
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.release.manifest import Manifest, memory_key
from memory3.services.release.synthetic import publish_random_release
from memory3.services.storage.object_store import ObjectStore
from memory3.services.trainer.kb import Reference, build_references

RANDOM_RELEASE = "random-tiny"
DOCUMENTS: list[tuple[str, str]] = [
    ("people", "Ilsa Varrow repairs clocks in the river town of Pemberlyn."),
    ("people", "Tomas Quell has kept the lighthouse at Skarn Point since 1994."),
    ("people", "Oriel Dunmere wrote three books about the salt marshes of Hallowmere."),
    ("places", "Pemberlyn is built on both banks of the river Aske and has nine bridges."),
    ("places", "Skarn Point is a rocky cape where the ferry to the Gull Islands leaves every morning."),
    ("places", "Hallowmere is a marsh village famous for its smoked eel and its reed boats."),
    ("products", "The Brantley K4 kettle boils a litre of water in ninety seconds."),
    ("products", "Corrin Looms sells wool blankets dyed with walnut shells and madder root."),
    ("products", "The Vessa bicycle has a bamboo frame and weighs eleven kilograms."),
    ("events", "The Aske river festival ends with a race of paper boats at midnight."),
    ("events", "Every spring the Gull Islands hold a count of nesting puffins."),
    ("events", "The Hallowmere reed fair was first held in the year 1821."),
]


@dataclass(frozen=True)
class RandomRelease:
    name: str
    manifest: Manifest
    references: list[Reference]  # in reference-table order
    model: Transformer  # the published weights
    text_codec: TextCodec
    memory_codec: MemoryCodec

    def memory_key(self, reference_id: str) -> str:
        """The bank key of a reference's memory (as in references.jsonl)."""
        return memory_key(self.manifest.memory_bank["bank"], reference_id)


def build_random_release(store: ObjectStore, name: str = RANDOM_RELEASE, *,
                         documents: Sequence[tuple[str, str]] = DOCUMENTS, codec: str = "bf16", preset: str = "tiny",
                         seed: int = 0, embedder=None) -> RandomRelease:
    """Publish `name` unless the bucket has it already (same inputs give the same release).

    `embedder` defaults to the real all-MiniLM-L6-v2 (services/retrieval/embedder.py).
    """
    config = Memory3Config.from_name(preset)
    text_codec = TextCodec(byte_level_tokenizer())
    references = list(build_references(documents, text_codec, config.ref_len))
    model = random_model(config, seed=seed)
    memory_codec = codec_from_name(codec)
    manifest = publish_random_release(store, name, documents, preset=preset, codec=codec, seed=seed, embedder=embedder)
    return RandomRelease(name, manifest, references, model, text_codec, memory_codec)
