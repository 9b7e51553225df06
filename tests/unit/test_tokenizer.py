"""Tokenizer conventions: control tokens come from the code, never from text."""

from memory3.model.config import Memory3Config
from memory3.model.tokenizer import BOS, EOS, PAD, TextCodec, byte_level_tokenizer


def test_the_spellings_of_control_tokens_in_text_stay_text():
    """A prompt holding `</s>` got an end of sequence inside it, and a document holding
    `<s>Reference:` a reference's layout inside its memory; decoding then dropped them."""
    codec = TextCodec(byte_level_tokenizer())
    text = f"a{EOS}b {BOS}Reference: c {PAD}"
    ids = codec.encode(text)
    assert not {codec.bos_id, codec.eos_id, codec.pad_id} & set(ids)
    assert codec.decode(ids) == text
    assert codec.body(text) == [codec.bos_id, *ids]


def test_the_reference_prefix_holds_its_control_token():
    codec = TextCodec(byte_level_tokenizer())
    config = Memory3Config.from_name("tiny")
    assert config.reference_prefix.startswith(BOS)
    prefix = codec.reference_prefix(config)
    assert prefix == [codec.bos_id, *codec.encode(config.reference_prefix.removeprefix(BOS))]
    assert codec.encode("plain words, as before.") == byte_level_tokenizer().encode(
        "plain words, as before.", add_special_tokens=False).ids


def test_bodies_are_the_bodies_of_each_text():
    codec = TextCodec(byte_level_tokenizer())
    texts = ["plain text", f"a {EOS} and a {BOS}Reference: in it", "", "\U0001f600 caf\u00e9"]
    assert codec.bodies(texts) == [codec.body(text) for text in texts]


def test_each_tokens_bytes_spell_its_share_of_the_text():
    """Logprobs show tokens one at a time; a merged token and one byte of a character alike, which is
    named by its bytes."""
    from tokenizers import pre_tokenizers

    from memory3.model.tokenizer import BYTE_OF_SYMBOL
    from memory3.services.trainer.tokenizer_train import train_tokenizer

    assert set(BYTE_OF_SYMBOL) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(BYTE_OF_SYMBOL.values()) == list(range(256))
    text = "Yelbury lies in Norland, née Ørby — 日本 ✓"
    trained = TextCodec(train_tokenizer([text, "Yelbury lies in the north. Yelbury lies"] * 20, 300))
    for codec in (TextCodec(byte_level_tokenizer()), trained):
        ids = codec.encode(text)
        assert b"".join(codec.token_bytes(i) for i in ids) == text.encode()
        assert codec.token_label(codec.eos_id) == EOS
    assert any(len(trained.token_bytes(i)) > 2 for i in trained.encode(text))  # merged tokens were read too
    plain = TextCodec(byte_level_tokenizer())
    assert [plain.token_label(i) for i in plain.encode("aé")] == ["a", "bytes:\\xc3", "bytes:\\xa9"]
