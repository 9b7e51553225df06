"""`memory3 generate --checkpoint`: in-process generation's length check counts what the context holds."""

import pytest

from memory3.services.local import LocalGenerator


def generator(model, codec, prefix) -> LocalGenerator:
    local = LocalGenerator.__new__(LocalGenerator)  # the checkpoint's parts, without a checkpoint on disk
    local.model, local.codec, local.prefix = model, codec, prefix
    return local


def test_the_reference_prefix_counts_only_when_references_are_given(tiny_model, text_codec, prefix):
    """Without references the context has no prefix, yet its length was counted: a prompt that fits was refused
    with a message that gave the lengths of one that does."""
    local = generator(tiny_model, text_codec, prefix)
    prompt = "Question: where was Orvath Kellen born?"
    body = len(text_codec.body(prompt))
    room = tiny_model.config.max_seq_len - body
    first = next(local.stream(prompt, max_new_tokens=room))
    assert len(first.token_ids) == 1
    with pytest.raises(ValueError) as refused:
        next(local.stream(prompt, references=["Orvath Kellen was born in Lunmar."], max_new_tokens=room))
    assert str(refused.value) == (f"prompt of {body} tokens + {len(prefix)} of the reference prefix + {room} new "
                                  f"tokens exceeds max_seq_len={tiny_model.config.max_seq_len}")
    next(local.stream(prompt, references=["Orvath Kellen was born in Lunmar."], max_new_tokens=room - len(prefix)))
