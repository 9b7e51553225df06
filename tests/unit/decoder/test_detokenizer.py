from memory3.services.decoder.detokenizer import IncrementalDetokenizer


def test_deltas_are_whole_characters_and_join_to_the_text(text_codec):
    text = "naïve café → 東京 🚀 done"
    ids = text_codec.encode(text)  # byte-level: multi-byte characters span several tokens
    detok = IncrementalDetokenizer(text_codec.decode)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) + detok.add([], final=True) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens ended mid-character and were held back


def test_invalid_bytes_are_not_held_forever(text_codec):
    stray = text_codec.encode("é")[1]  # a continuation byte alone is invalid UTF-8
    detok = IncrementalDetokenizer(text_codec.decode)
    deltas = [detok.add([stray]) for _ in range(12)]
    assert sum(len(d) for d in deltas) >= 8  # emitted as replacement characters, not buffered to the end


def test_a_character_that_begins_in_the_last_token_of_invalid_bytes_is_kept(text_codec):
    """Forced out after 4 held tokens, the invalid bytes became U+FFFD, and so did the lead byte of a valid
    character that ended them: the next tokens completed it, but its text was never sent."""
    emoji = text_codec.encode("\U0001f600")  # 4 byte-level tokens
    ids = [*text_codec.encode("ok "), *emoji[:3], *emoji, *text_codec.encode(" end")]
    detok = IncrementalDetokenizer(text_codec.decode)
    streamed = "".join(detok.add([i]) for i in ids) + detok.add([], final=True)
    assert streamed == text_codec.decode(ids) == "ok \ufffd\U0001f600 end"
