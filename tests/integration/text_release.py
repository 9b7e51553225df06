"""A small published release for the text service's tests: random tiny model, byte-level
tokenizer, a knowledge base of short invented facts, the real embedder and FAISS index."""

from __future__ import annotations

from memory3.model.config import Memory3Config
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.release.synthetic import publish_random_release
from memory3.services.retrieval.embedder import Embedder
from memory3.services.storage.object_store import ObjectStore
from memory3.services.trainer.kb import Reference, build_references

DOCUMENTS = [
    ("people", "Orvath Kellen was born in the harbour city of Lunmar and works there as a glassblower. "
               "Mira Sobel founded the Hollin Orchestra in 1987 and still conducts it every winter. "
               "Pell Andora teaches astronomy at the university of Corvinne, close to the northern coast."),
    ("places", "The city of Lunmar lies on the river Tessa and is famous for its seven copper bridges. "
               "Dastra is a mountain town whose annual cheese market draws visitors from three countries. "
               "Corvinne has a lighthouse that has guided fishing boats since the year 1702."),
    ("products", "Veltrix Industries makes the Quarn-7 water pump, sold to city water companies since 2011. "
                 "The Quarn-7 pump weighs forty kilograms and runs on a single phase electric motor. "
                 "Baltor Mills sells rye flour in paper sacks of twenty-five kilograms to bakeries."),
    ("music", "The Hollin Orchestra plays mostly baroque music in the old grain hall of Dastra. "
              "Its principal oboist, Tamsin Reel, joined the orchestra after studying in Lunmar."),
]


def build_text_release(store: ObjectStore, name: str, embedder: Embedder) -> list[Reference]:
    """Publish `name` (once per bucket) and return its references in table order."""
    config = Memory3Config.from_name("tiny")
    codec = TextCodec(byte_level_tokenizer())
    references = list(build_references(DOCUMENTS, codec, config.ref_len))
    publish_random_release(store, name, DOCUMENTS, embedder=embedder)
    return references
