"""How a publication writes a memory into a bank other releases share (the store is a stand-in: the
point is the choice; tests/integration/test_release.py publishes into a real S3 server)."""

import torch

from memory3.model.codecs import codec_from_name
from memory3.model.memory import ExplicitMemory
from memory3.model.memory_format import encode_memory
from memory3.services.release.publish import _store_memory
from memory3.services.storage.object_store import ObjectNotFound

SHAPE = (2, 2, 4, 8)
CODEC = codec_from_name("bf16")


def blob(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(4).expand(2, 2, 4).clone()
    return encode_memory(ExplicitMemory(torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), positions),
                         CODEC, ref_len=16)


class Bucket:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects, self.puts = dict(objects), []

    def get_bytes(self, key: str) -> bytes:
        if key not in self.objects:
            raise ObjectNotFound(f"get {key}: NoSuchKey")
        return self.objects[key]

    def put_bytes(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        self.objects[key] = data


def test_a_valid_memory_in_the_bank_is_kept_and_a_missing_or_corrupt_one_written():
    theirs, ours = blob(1), blob(2)
    corrupt = bytearray(theirs)
    corrupt[-1] ^= 0xFF
    bucket = Bucket({"held": theirs, "corrupt": bytes(corrupt)})
    assert _store_memory(bucket, "held", ours, CODEC, SHAPE) == theirs  # another release lists it: kept
    assert _store_memory(bucket, "missing", ours, CODEC, SHAPE) == ours
    assert _store_memory(bucket, "corrupt", ours, CODEC, SHAPE) == ours  # a repair
    assert bucket.puts == ["missing", "corrupt"] and bucket.objects["held"] == theirs


def test_reference_ids_a_release_cannot_hold_are_refused_before_anything_is_written():
    """A '/' made keys that gc read as other ids, and a trailing NUL one that numpy's byte strings drop."""
    import pytest

    from memory3.services.release.manifest import ReleaseError
    from memory3.services.release.publish import MAX_ID_CHARS, publish_release
    from memory3.services.trainer.kb import Reference

    class Untouched:
        def __getattr__(self, name):
            raise AssertionError(f"the store was used ({name}) before the ids were checked")

    def publish(ids, parent_ids=()):
        publish_release(Untouched(), "r", model=None, codec=None, references=[Reference(i, "t", (1,), "doc")
                                                                               for i in ids],
                        embed=None, embedder_name="e", memory_codec=CODEC, provenance={},
                        parent_references=[{"id": i} for i in parent_ids])

    for bad, says in (("a/b", "without '/'"), ("ab\0", "printable"), ("", "1 to"), ("x" * (MAX_ID_CHARS + 1), "1 to"),
                      ("tab\there", "printable")):
        with pytest.raises(ReleaseError, match=says):
            publish(["ok", bad])
    with pytest.raises(ReleaseError, match="reference id 'ab' .* is listed twice"):
        publish(["ab", "cd", "ab"])
    with pytest.raises(ReleaseError, match="reference id 'cd' .* is listed twice"):
        publish(["cd"], parent_ids=["ab", "cd"])
