"""The `memory3` console script, run as a user would."""

import json
import subprocess
import sys

import pytest


def memory3(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "memory3.services.cli.main", *args],
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"memory3 {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "tiny"
    memory3("init", "--preset", "tiny", "--out", str(out))
    return out


def test_generate_streams_text_and_lists_the_references_used(checkpoint):
    proc = memory3("generate", "--checkpoint", str(checkpoint), "Who keeps the lighthouse?",
                   "--reference", "The lighthouse keeper is Odile.", "--reference", "Ferries leave on Tuesday.",
                   "--max-new-tokens", "12")
    assert "references used: [" in proc.stderr
    assert proc.stdout.strip()  # some text came out
    plain = memory3("generate", "--checkpoint", str(checkpoint), "Who keeps the lighthouse?",
                    "--max-new-tokens", "12")
    assert "references used: none" in plain.stderr


def test_bad_input_gets_a_clear_error_and_exit_code_2(checkpoint, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 \xff\xfe")
    proc = memory3("generate", "--checkpoint", str(checkpoint), "hi", "--reference-file", str(bad), check=False)
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr
    proc = memory3("generate", "--checkpoint", str(tmp_path / "missing"), "hi", check=False)
    assert proc.returncode == 2 and "config.json not found" in proc.stderr
    proc = memory3("generate", "--checkpoint", str(checkpoint), "hi", "--max-new-tokens", "100000", check=False)
    assert proc.returncode == 2 and "exceeds max_seq_len" in proc.stderr
    proc = memory3("init", "--preset", "tiny", "--out", str(checkpoint), check=False)
    assert proc.returncode == 2 and "already holds a checkpoint" in proc.stderr


def test_bench_decode_writes_json_and_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    out = tmp_path / "results" / "decode.json"
    memory3("bench", "decode", "--preset", "tiny", "--batch", "2", "--prompt-tokens", "70", "--new-tokens", "70",
            "--repeats", "1", "--json", str(out), "--readme", str(readme))
    result = json.loads(out.read_text())
    for key in ("no_memory_tok_s", "memory_tok_s", "rag_tok_s", "memory_over_no_memory", "memory_over_rag"):
        assert result[key] > 0
    assert result["protocol"]["retrievals_per_sequence"] == 3
    text = readme.read_text()
    assert "old" not in text and "memory / no memory" in text and text.endswith("tail\n")


def test_demo_scores_mark_each_answer_and_count_the_right_ones():
    from memory3.services.cli.stack_commands import demo_scores

    long_question = "Which organisation does Pluzeast Shiosho work for, and since when?"
    asked = [("Question: Who?\nAnswer: name", "Ann"), (f"Question: {long_question}\nAnswer: employer", "Bob")]
    table = demo_scores(asked, with_memory=[" Ann\n", "Carl"], without=["", " Bob"]).lstrip("\n").splitlines()
    assert table[0] == "2 knowledge-base-only questions, greedy, the first one above:"
    assert table[2].split() == ["Who?", "Ann", "✓", "Ann", "✗", "(nothing)"]
    assert table[3].startswith(long_question[:47] + "…  ")
    assert table[3].split()[-4:] == ["✗", "Carl", "✓", "Bob"]
    assert table[4].startswith("right with memory: 1/2; without memory: 1/2")


def test_local_copies_of_releases_go_under_the_home_the_command_is_given(tmp_path):
    """A user's commands keep their caches beside the stack they talk to; a service keeps its default."""
    from memory3.services.cli.main import DEFAULT_HOME, parse_args

    home = tmp_path / "home"
    for argv in (["kb", "add", "f.txt", "--release", "r"], ["kb", "remove", "--release", "r", "--match", "x"],
                 ["release", "delete", "r"], ["bench", "quality", "--release", "r", "--json", "q.json"]):
        assert parse_args([*argv, "--home", str(home)]).cache_dir == home / "releases", argv
        assert parse_args(argv).cache_dir == DEFAULT_HOME / "releases", argv
        assert parse_args([*argv, "--home", str(home), "--cache-dir", str(tmp_path / "c")]).cache_dir == tmp_path / "c"
    assert parse_args(["serve", "text", "--release", "r"]).cache_dir == DEFAULT_HOME / "releases"
    assert not hasattr(parse_args(["down", "--home", str(home)]), "cache_dir")


def test_generate_takes_max_tokens_as_openai_names_it():
    from memory3.services.cli.main import parse_args

    assert parse_args(["generate", "hi", "--max-tokens", "5"]).max_new_tokens == 5
    assert parse_args(["generate", "hi", "--max-new-tokens", "6"]).max_new_tokens == 6
