import itertools
import json
import re

import pytest

from memory3.services.trainer.corpus import CorpusError, debian_documents, read_corpus_file, read_selection_file


def test_corpus_file_documents_are_split_by_blank_lines(tmp_path):
    f = tmp_path / "docs.txt"
    f.write_text("First document.\nStill first.\n\n\n  \nSecond document.\n", encoding="utf-8")
    assert [d for _, d in read_corpus_file(f)] == ["First document.\nStill first.", "Second document."]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no text"),
        (b"  \n\n \t\n", "no text"),
        (b"ok\n\nbad \xe9t\xe9\n", "not UTF-8 text .*line 3"),
        (b"text\x00more", "NUL bytes"),
    ],
)
def test_bad_corpus_files_are_rejected_with_what_to_fix(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_corpus_file(f)


def test_json_lines_documents_keep_their_sources_and_blank_lines(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "A first.\\n\\nStill the first.", "source": "wiki/First"}\n\n'
                 '{"text": "  A second.  "}\n', encoding="utf-8")
    assert read_corpus_file(f) == [("wiki/First", "A first.\n\nStill the first."), (f"{f}:3", "A second.")]


def test_json_lines_end_at_newlines_only(tmp_path):
    """JSON (and json.dumps with ensure_ascii=False) leaves U+2028 and U+2029 unescaped."""
    f = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "before\u2028after\u2029end"}, ensure_ascii=False), '{"text": "next"}']
    assert "\u2028" in lines[0]  # as written, not escaped
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [text for _, text in read_corpus_file(f)] == ["before\u2028after\u2029end", "next"]


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "line 2 is not JSON"),
    ('["a list"]', 'line 2 must be an object with a non-empty string "text"'),
    ('{"text": "  "}', 'line 2 must be an object with a non-empty string "text"'),
    ('{"text": "ok", "source": 3}', 'line 2: "source" must be a string'),
    # JSON escapes can spell what UTF-8 cannot hold: it failed after encoding, naming neither file nor line.
    ('{"text": "ok", "source": "\\ud800"}', r'line 2: "source" holds a lone surrogate \(\'\\ud800\' at character 0\)'),
    ('{"text": "ok \\udfff then"}', 'line 2: "text" holds a lone surrogate'),
])
def test_bad_json_lines_say_which_line(tmp_path, line, message):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        read_corpus_file(f)


def test_oversize_documents_and_missing_files(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("small\n\n" + "x" * 2000, encoding="utf-8")
    with pytest.raises(CorpusError, match="document 2 is 2000 bytes"):
        read_corpus_file(f, max_document_bytes=1000)
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus_file(tmp_path / "missing.txt")


def test_debian_sources_stream_interleaved():
    docs = list(itertools.islice(debian_documents(), 30))
    assert {source for source, _ in docs} == {"wordnet", "gcide", "python-docs"}
    assert all(text.strip() for _, text in docs)


def test_a_selection_file_lists_ids_and_matches_and_says_which_line_is_wrong(tmp_path):
    path = tmp_path / "remove.jsonl"
    path.write_text('{"id": "abc"}\n\n{"match": "-year-old"}\n{"match": "a\\u0000b\\nc"}\n', encoding="utf-8")
    assert read_selection_file(path) == (["abc"], ["-year-old", "a\x00b\nc"])
    for line, said in (('{"id": ""}', "line 1 must be"), ('{"id": "a", "match": "b"}', "line 1 must be"),
                       ('{"ids": "a"}', "line 1 must be"), ("not json", "line 1 is not JSON"),
                       ('{"id": "\\ud800"}', "lone surrogate"), ("", "no references to remove")):
        path.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(CorpusError, match=said):
            read_selection_file(path)


BOM = b"\xef\xbb\xbf"


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path):
    """Kept, it started the first document: the same fact got another reference id."""
    plain, jsonl, selection = tmp_path / "notepad.txt", tmp_path / "docs.jsonl", tmp_path / "remove.jsonl"
    plain.write_bytes(BOM + b"Ilsa Varrow repairs clocks.\r\n\r\nSecond.\r\n")
    jsonl.write_bytes(BOM + b'{"text": "First.", "source": "s"}\n')
    selection.write_bytes(BOM + b'{"match": "clocks"}\n')
    assert [d for _, d in read_corpus_file(plain)] == ["Ilsa Varrow repairs clocks.", "Second."]
    assert read_corpus_file(jsonl) == [("s", "First.")]
    assert read_selection_file(selection) == ([], ["clocks"])
    # Positions are the file's, the mark counted.
    plain.write_bytes(BOM + b"ok\n\nbad \xe9t\xe9\n")
    with pytest.raises(CorpusError, match=r"not UTF-8 text \(byte 11, line 3"):
        read_corpus_file(plain)


@pytest.mark.parametrize("name", ["docs.JSONL", "docs.ndjson", "docs.NDJSON", "docs.Jsonl"])
def test_json_lines_files_are_known_by_their_suffix_in_any_case(tmp_path, name):
    f = tmp_path / name
    f.write_text('{"text": "Alpha fact one.", "source": "s1"}\n{"text": "Beta fact two.", "source": "s2"}\n',
                 encoding="utf-8")
    assert read_corpus_file(f) == [("s1", "Alpha fact one."), ("s2", "Beta fact two.")]


def test_a_directory_is_said_to_be_one_with_what_to_give_instead(tmp_path):
    said = f"{tmp_path}: is a directory, not a file; name the files in it (e.g. {tmp_path}/*.txt)"
    with pytest.raises(CorpusError, match=re.escape(said)):
        read_corpus_file(tmp_path)
    with pytest.raises(CorpusError, match="is a directory, not a file; name the JSON Lines file"):
        read_selection_file(tmp_path)
