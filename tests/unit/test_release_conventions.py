"""A release's recorded conventions against the model that serves it: every one a publication records
is checked where the manifest has it (the position scheme, the score reduction and the prefix's tokens
were recorded and never compared)."""

import dataclasses

import pytest

from memory3.model.checkpoint import save_checkpoint
from memory3.model.codecs import codec_from_name
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.release.manifest import Manifest, ReleaseError
from memory3.services.release.publish import conventions
from memory3.services.release.reader import Release


@pytest.fixture
def opened(tmp_path, tiny_config):
    model = random_model(tiny_config)
    tokenizer = byte_level_tokenizer()
    save_checkpoint(model, tmp_path / "model", tokenizer)
    recorded = conventions(model, TextCodec(tokenizer), codec_from_name("bf16"))
    manifest = Manifest(name="r", created="2026-01-01T00:00:00+00:00", files={}, conventions=recorded,
                        memory_bank={"bank": "b", "count": 0, "bytes": 0, "codec": "bf16"},
                        index={"embedder": "e", "dim": 1, "type": "flat", "count": 0}, provenance={})
    return lambda **changes: Release(None, dataclasses.replace(manifest, conventions={**recorded, **changes}),
                                     tmp_path)


def test_a_release_of_this_build_loads(opened):
    assert opened().load_model().config.ref_len > 0


@pytest.mark.parametrize("changes", [
    {"position_scheme": "sequential: memory keys after the context"},
    {"score_reduction": "max"},
    {"reference_prefix_tokens": [1, 2, 3]},
    {"ref_len": 7},
])
def test_a_convention_this_build_does_not_share_is_refused(opened, changes):
    with pytest.raises(ReleaseError, match=f"disagrees with the manifest's conventions.*{next(iter(changes))}"):
        opened(**changes).load_model()


def test_a_release_that_recorded_fewer_conventions_still_loads(opened):
    release = opened()
    for key in ("position_scheme", "score_reduction", "reference_prefix_tokens"):
        del release.manifest.conventions[key]
    assert release.load_model() is not None
