"""The `memory3` console script, run as a user would."""

import dataclasses
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


def test_generate_takes_openais_penalties(checkpoint):
    """A strong frequency penalty keeps a greedy answer from repeating a token as often."""
    args = ("generate", "--checkpoint", str(checkpoint), "Who keeps the lighthouse?", "--max-new-tokens", "40")
    plain = memory3(*args).stdout
    penalized = memory3(*args, "--frequency-penalty", "2", "--presence-penalty", "2").stdout
    assert penalized != plain
    assert max(penalized.count(c) for c in set(penalized)) <= max(plain.count(c) for c in set(plain))
    proc = memory3(*args, "--presence-penalty", "3", check=False)
    assert proc.returncode == 2 and "presence_penalty must be in [-2.0, 2.0]" in proc.stderr


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


def _interrupted_kb_merge(tmp_path, signum):
    """`kb merge` waiting for an object store that does not answer, stopped by `signum` once it waits."""
    import os
    import signal

    env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": "k", "MEMORY3_S3_SECRET_KEY": "s"}
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so: as a terminal would,
    # the child gets the default handling back (Python then raises KeyboardInterrupt).
    proc = subprocess.Popen([sys.executable, "-m", "memory3.services.cli.main", "kb", "merge", "shard",
                             "--release", "base", "--wait", "120", "--s3-endpoint", "127.0.0.1:1",
                             "--cache-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "the store does not answer" in line:
                break
        proc.send_signal(signum)
        lines += proc.stderr.readlines()
        return proc.wait(timeout=60), lines
    finally:
        proc.kill()
        proc.stderr.close()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_an_interrupted_kb_command_says_so_in_one_line_and_exits_128_plus_the_signal(tmp_path, name):
    """SIGTERM (a Job's pod stopped) killed it where it was, past its clean-up; Ctrl-C printed a traceback."""
    import signal

    signum = getattr(signal, name)
    code, lines = _interrupted_kb_merge(tmp_path, signum)
    assert code == 128 + signum, lines
    assert not any("Traceback" in line for line in lines), "".join(lines)
    assert lines[-1].startswith(f"memory3 kb: interrupted ({name}); any release it had not finished publishing")


def test_a_file_that_cannot_be_written_or_read_is_one_line_and_exit_2(checkpoint, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    proc = memory3("init", "--preset", "tiny", "--out", str(a_file), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"memory3 init: error: {a_file}: File exists"
    proc = memory3("generate", "hi", "--checkpoint", str(checkpoint), "--reference-file", str(tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"memory3 generate: error: {tmp_path}: Is a directory"


def test_ports_and_numbers_out_of_range_are_refused_before_anything_runs():
    from memory3.services.cli.main import parse_args

    for argv, said in ((["up", "--decoder-port", "70000"], "70000 is not a port: give 0-65535"),
                       (["up", "--decoder-port", "-1"], "-1 is not a port"),
                       (["serve", "text", "--port", "65536"], "65536 is not a port: give 0-65535"),
                       (["serve", "kserve", "--http-port", "0"], "0 is not a port: give 1-65535"),
                       (["serve", "decoder", "--metrics-port", "65536"], "65536 is not a port"),
                       (["kb", "merge", "a", "--release", "b", "--wait", "nan"], "'nan': give a finite number"),
                       (["generate", "hi", "--timeout", "inf"], "'inf': give a finite number"),
                       (["serve", "memory", "--ram-cache-mb", "nan"], "'nan': give a finite number"),
                       (["serve", "text", "--grace", "-5"], "'-5': give 0 or more seconds"),
                       (["serve", "text", "--wait-for-release", "-1"], "'-1': give 0 or more seconds"),
                       (["kb", "merge", "a", "--release", "b", "--wait", "-2"], "'-2': give 0 or more seconds")):
        proc = memory3(*argv, check=False)
        assert proc.returncode == 2 and said in proc.stderr, (argv, proc.stderr)
    assert parse_args(["up", "--decoder-port", "0"]).decoder_port == 0  # a free port, as without it
    assert parse_args(["serve", "text", "--port", "65535"]).port == 65535
    assert parse_args(["serve", "decoder", "--port", "0"]).port == 0  # a free port, as the tests start them
    assert parse_args(["serve", "text", "--grace", "0"]).grace == 0  # cut at once


@pytest.mark.parametrize(("argv", "said"), [
    (["--max-tokens", "0"], "argument --max-new-tokens/--max-tokens: 0: give 1 or more"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens/--max-tokens: -3: give 1 or more"),
    (["--max-tokens", "many"], "argument --max-new-tokens/--max-tokens: 'many' is not a whole number"),
    (["--timeout", "0"], "argument --timeout: '0': give a number above 0"),
    (["--timeout", "-1.5"], "argument --timeout: '-1.5': give a number above 0"),
])
def test_generate_refuses_no_tokens_or_no_time(argv, said, capsys):
    """--max-tokens 0 was sent as "unset" and got the server's 128 tokens; --timeout 0 failed every request."""
    from memory3.services.cli.main import parse_args

    with pytest.raises(SystemExit) as refused:
        parse_args(["generate", "hi", *argv])
    assert refused.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {said}")
    assert parse_args(["generate", "hi", "--max-tokens", "1", "--timeout", "0.5"]).max_new_tokens == 1


def test_kb_merge_refuses_a_wait_that_is_not_a_number(tmp_path):
    from memory3.services.cli.commands import cmd_kb_merge

    with pytest.raises(ValueError, match="--wait must be a finite number of seconds, 0 or more, got nan"):
        cmd_kb_merge(None, parent="base", derived=["shard"], name=None, cache_dir=tmp_path, dry_run=False,
                     wait_s=float("nan"))


def test_release_show_of_an_invalid_name_says_what_names_may_be(tmp_path, monkeypatch):
    """It called the name's manifest unreadable and advised `release delete` of it, which refuses that name too."""
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    proc = memory3("release", "show", "Bad/name", "--s3-endpoint", "127.0.0.1:1", "--home", str(tmp_path),
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("memory3 release: error: invalid release name 'Bad/name': use 1-63 of a-z, 0-9, "
                                   "'.', '_', '-' starting with a letter or digit")


@pytest.mark.parametrize(("argv", "said"), [
    (["--release", "../x"], "invalid release name '../x'"),
    (["--max-batch", "0", "--release", "absent"], "--max-batch must be 1 or more, got 0"),
])
def test_up_refuses_a_bad_release_name_or_batch_before_it_starts_anything(tmp_path, argv, said):
    """They were refused by the object store, or by the decoder, once S3, Redis and the services ran."""
    proc = memory3("up", "--home", str(tmp_path / "home"), *argv, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"memory3 up: error: {said}")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()


def test_a_service_that_fails_to_start_shows_the_lines_of_this_run_only(tmp_path):
    """Logs are appended to, run after run: the tail showed an earlier run's errors before this one's."""
    from memory3.services.stack import StackOptions, StackState, spawn_service, wait_serving
    from memory3.services.storage.object_store import S3Config

    home = tmp_path / "home"
    (home / "stack").mkdir(parents=True)
    (home / "stack" / "text.log").write_text("an earlier run's error\n" * 30)
    options = StackOptions(home=home, release="r", extra_args={"text": ("--no-such-option",)})
    state = StackState(str(home), "r", dataclasses.asdict(S3Config("127.0.0.1:1", "k")), None)
    process = spawn_service(options, state, "text")
    assert process.started is not None  # recorded at once: a PID alone may be another process's later
    with pytest.raises(RuntimeError, match="exited during startup") as failed:
        wait_serving(process, 120)
    assert "unrecognized arguments: --no-such-option" in str(failed.value)
    assert "earlier run" not in str(failed.value)
    assert "an earlier run's error" in (home / "stack" / "text.log").read_text()  # kept


def test_a_cuda_device_on_a_machine_without_cuda_is_said_so(checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = memory3("generate", "hi", "--checkpoint", str(checkpoint), "--device", "cuda", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "memory3 generate: error: CUDA is not available on this machine; use --device cpu"


def test_training_on_a_gpu_this_machine_lacks_is_refused_before_the_store_is_asked(monkeypatch, tmp_path):
    """Nothing listens at the endpoint: the device is checked first, so the error names it."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    store = ["--s3-endpoint", "127.0.0.1:9"]
    train = memory3("train", "--release", "r1", "--device", "cuda", "--work-dir", str(tmp_path), *store, check=False)
    document = tmp_path / "doc.txt"
    document.write_text("A fact.\n")
    add = memory3("kb", "add", str(document), "--release", "r1", "--device", "cuda:0", *store, check=False)
    # The trainer service hands its --device to every job: it refuses one it cannot have as it starts.
    service = memory3("serve", "trainer", "--port", "0", "--device", "cuda", "--work-dir", str(tmp_path), *store,
                      check=False)
    for proc, command, device in ((train, "train", "cuda"), (add, "kb", "cuda:0"), (service, "serve", "cuda")):
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"memory3 {command}: error: --device {device}: this machine has no CUDA device "
                                       "(or this torch build has no CUDA); use --device cpu or auto")


def test_the_maximum_connection_age_reaches_the_server_and_zero_turns_it_off():
    from memory3.services.cli.main import parse_args, server_options

    def age(*flags):
        return server_options(parse_args(["serve", "text", "--release", "r", *flags])).max_connection_age_s

    assert (age(), age("--max-connection-age", "15"), age("--max-connection-age", "0")) == (60.0, 15.0, None)


def test_a_negative_maximum_connection_age_is_refused_naming_its_option(capsys):
    """It reached the server's settings, whose error ("the maximum connection age must be > 0
    seconds") named no option."""
    from memory3.services.cli.main import parse_args

    with pytest.raises(SystemExit):
        parse_args(["serve", "text", "--release", "r", "--max-connection-age", "-1"])
    assert capsys.readouterr().err.strip().endswith("argument --max-connection-age: '-1': give 0 or more seconds")
