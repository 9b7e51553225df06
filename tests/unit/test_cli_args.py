"""What the `memory3` command refuses before it starts any work, and how it says so: text that is
not UTF-8, numbers past what their wire field holds, counts of zero, unknown presets, an output
that cannot be written, and a port that another server already listens on."""

from concurrent import futures

import grpc
import pytest

from memory3.services.cli.main import main, parse_args
from memory3.services.stack import StackOptions, start_stack, state_path
from memory3.services.storage.object_store import S3Config


def refused(argv: list[str], capsys) -> str:
    """The one-line usage error argparse ends `argv` with."""
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("argv", "said"), [
    (["generate", "caf\udce9"], "argument prompt: not UTF-8 text (byte b'\\xe9' at character 3)"),
    (["generate", "hi", "--stop", "\udcff"], "argument --stop: not UTF-8 text (byte b'\\xff' at character 0)"),
    (["generate", "hi", "--checkpoint", "ck", "--reference", "x\udcff"], "argument --reference: not UTF-8 text"),
    (["kb", "remove", "--release", "r", "--match", "\udcff"], "argument --match: not UTF-8 text"),
])
def test_text_that_is_not_utf8_is_refused_naming_its_argument(argv, said, capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates: the prompt failed once sent, with
    "'utf-8' codec can't encode characters in position 0-1", which named no argument."""
    assert said in refused(argv, capsys)


@pytest.mark.parametrize(("argv", "said"), [
    (["--max-new-tokens", "3000000000"], "argument --max-new-tokens/--max-tokens: 3000000000: give 2147483647 at most"),
    (["--top-k", "2147483648"], "argument --top-k: 2147483648: give 2147483647 at most"),
    (["--top-k", "-1"], "argument --top-k: -1: give 0 or more (0 disables it)"),
    (["--seed", str(2**63)], f"argument --seed: {2**63}: give {2**63 - 1} at most"),
])
def test_numbers_past_their_wire_field_are_refused_naming_the_option(argv, said, capsys):
    """They failed the request with protobuf's "Value out of range: 3000000000"."""
    assert refused(["generate", "hi", *argv], capsys).endswith(f"error: {said}")
    assert parse_args(["generate", "hi", "--seed", str(-(2**63)), "--top-k", "0"]).seed == -(2**63)


@pytest.mark.parametrize(("argv", "said"), [
    (["decode", "--batch", "0"], "argument --batch: 0: give 1 or more"),
    (["decode", "--repeats", "0"], "argument --repeats: 0: give 1 or more"),
    (["storage", "--references", "0"], "argument --references: 0: give 1 or more"),
    (["index", "--shards", "0"], "argument --shards: 0: give 1 or more"),
    (["serving", "--concurrency", "1,a"], "argument --concurrency: 'a' is not a whole number"),
    (["serving", "--concurrency", "8,0"], "argument --concurrency: 0: give 1 or more"),
    (["decode", "--preset", "huge"], "argument --preset: unknown preset 'huge': choose one of paper-2.4b, small, tiny"),
])
def test_bench_counts_and_presets_are_checked_before_it_runs(argv, said, capsys, tmp_path):
    """--batch 0 ended in "no references to encode", --repeats 0 in "no median for empty data",
    --concurrency a in "invalid literal for int() with base 10"."""
    assert said in refused(["bench", *argv, "--json", str(tmp_path / "x.json")], capsys)
    assert parse_args(["bench", "serving", "--concurrency", "1, 8", "--json", "x"]).concurrency == (1, 8)


@pytest.mark.parametrize("command", [["train", "--release", "r"], ["init", "--out", "ck"]])
def test_an_unknown_preset_is_refused_before_anything_runs(command, capsys):
    """`train` built the synthetic world and trained a tokenizer before it read the preset."""
    said = refused([*command, "--preset", "huge"], capsys)
    assert "argument --preset: unknown preset 'huge': choose one of paper-2.4b, small, tiny" in said


def test_the_command_starts_without_torch():
    """`status`, `down`, `generate` over gRPC need no model: torch alone takes seconds to import."""
    import subprocess
    import sys

    probe = "import sys, memory3.services.cli.main as m; m.parse_args(['status']); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          check=True).stdout.strip() == "False"


def test_a_bench_output_that_cannot_be_written_is_refused_before_the_bench_runs(tmp_path, monkeypatch, capsys):
    """The result was written at the end: minutes of benchmark, then "No such file or directory"."""
    def ran(**_kwargs):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr("memory3.bench.decode.run_decode_bench", ran)
    (tmp_path / "a-file").write_text("x")
    assert main(["bench", "decode", "--preset", "tiny", "--json", str(tmp_path / "a-file" / "decode.json")]) == 2
    assert capsys.readouterr().err.strip() == f"memory3 bench: error: {tmp_path / 'a-file'}: File exists"


@pytest.fixture
def grpc_port():
    """A port a gRPC server listens on, as a running service's does."""
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def test_serve_on_a_port_another_server_listens_on_is_refused(grpc_port, capsys, monkeypatch):
    """gRPC binds with SO_REUSEPORT: a second service on the port started, and the kernel split the
    first one's clients between the two."""
    monkeypatch.delenv("MEMORY3_AUTH_TOKEN", raising=False)
    for name, value in (("ENDPOINT", "127.0.0.1:9"), ("ACCESS_KEY", "k"), ("SECRET_KEY", "s")):
        monkeypatch.setenv(f"MEMORY3_S3_{name}", value)
    assert main(["serve", "text", "--release", "r", "--port", str(grpc_port)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"memory3 serve: error: --port {grpc_port}: another server listens on 127.0.0.1:{grpc_port}; stop it, or "
        "pass --port with another port (0: any free port)")
    assert main(["serve", "decoder", "--release", "r", "--port", "0", "--health-port", str(grpc_port)]) == 2
    assert f"--health-port {grpc_port}: another server listens" in capsys.readouterr().err
    assert main(["serve", "kserve", "--release", "r", "--grpc-port", str(grpc_port)]) == 2
    assert f"--grpc-port {grpc_port}: another server listens on 0.0.0.0:{grpc_port}" in capsys.readouterr().err


def test_up_on_a_decoder_port_another_server_listens_on_starts_nothing(grpc_port, tmp_path, monkeypatch):
    class Unreachable:  # what `up` would start next: the test must end before it
        def __init__(self, _config):
            raise AssertionError("the stack started")
    monkeypatch.setattr("memory3.services.storage.object_store.ObjectStore", Unreachable)
    options = StackOptions(home=tmp_path / "home", release="r", redis=False, s3=S3Config("127.0.0.1:9", "k"),
                           decoder_port=grpc_port)
    with pytest.raises(RuntimeError, match=f"--decoder-port {grpc_port}: another server listens on 127.0.0.1:"):
        start_stack(options)
    assert not state_path(tmp_path / "home").exists()


def test_a_service_gives_its_jobs_the_whole_object_store(tmp_path, monkeypatch):
    """The trainer passed its jobs the endpoint and bucket alone: a service on HTTPS (or in another region,
    or behind a private CA) ran its jobs against plain HTTP and us-east-1."""
    from memory3.services.cli.main import s3_config
    from memory3.services.storage.object_store import s3_arguments

    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    for name in ("ENDPOINT", "BUCKET", "REGION", "CA_BUNDLE"):
        monkeypatch.delenv(f"MEMORY3_S3_{name}", raising=False)
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    store = S3Config(endpoint="s3.example.com:443", access_key="k", secret_key="s", bucket="b", secure=True,
                     region="eu-west-3", ca_bundle=bundle)
    assert s3_config(parse_args(["train", "--release", "r", *s3_arguments(store)])) == store


@pytest.mark.parametrize(("argv", "env", "said"), [
    (["--s3-ca-bundle", "{bundle}"], {}, "is for HTTPS: add --s3-secure"),
    (["--s3-secure", "--s3-ca-bundle", "{missing}"], {}, "no such file"),
    (["--s3-secure"], {"MEMORY3_S3_CA_BUNDLE": "{missing}"}, "no such file"),
])
def test_a_ca_bundle_that_cannot_work_is_refused(argv, env, said, tmp_path, monkeypatch):
    from memory3.services.cli.main import s3_config

    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    paths = {"bundle": bundle, "missing": tmp_path / "nope.pem"}
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**paths))
    args = parse_args(["train", "--release", "r", "--s3-endpoint", "h:1", *(a.format(**paths) for a in argv)])
    with pytest.raises(ValueError, match=said):
        s3_config(args)


def test_cuda_graphs_follow_the_device_and_are_refused_without_one(monkeypatch):
    from memory3.services.cli.main import _decoder_settings

    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    base = ["serve", "decoder", "--release", "r", "--s3-endpoint", "h:1"]
    assert _decoder_settings(parse_args(base)).engine.cuda_graphs is None  # the engine decides: on with CUDA
    assert _decoder_settings(parse_args([*base, "--device", "cuda", "--no-cuda-graphs"])).engine.cuda_graphs is False
    assert _decoder_settings(parse_args([*base, "--device", "cuda:1", "--cuda-graphs"])).engine.cuda_graphs is True
    with pytest.raises(ValueError, match="--cuda-graphs needs --device cuda"):
        _decoder_settings(parse_args([*base, "--cuda-graphs"]))


def test_the_decoder_runs_where_it_is_told_and_auto_is_the_trainers(monkeypatch):
    """`serve --device` is one option for every service: the decoder's default stays the CPU, and
    auto, which only training resolves, is refused instead of reaching torch as a device name."""
    from memory3.services.cli.main import _decoder_settings

    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    base = ["serve", "decoder", "--release", "r", "--s3-endpoint", "h:1"]
    assert _decoder_settings(parse_args(base)).device == "cpu"
    assert _decoder_settings(parse_args([*base, "--device", "cuda:1"])).device == "cuda:1"
    with pytest.raises(ValueError, match=r"serve decoder --device auto: give cpu or cuda\[:N\]"):
        _decoder_settings(parse_args([*base, "--device", "auto"]))
    assert parse_args(["serve", "trainer"]).device is None  # its jobs' own default: auto


def test_release_gc_takes_the_shard_counts_served_or_none(capsys):
    assert parse_args(["release", "gc"]).shard_counts is None  # every count stays
    assert parse_args(["release", "gc", "--shard-counts", "8,4"]).shard_counts == (8, 4)
    assert parse_args(["release", "gc", "--shard-counts", "none"]).shard_counts == ()
    for bad in ("1", "0", "x", "none,4", "4,,8"):
        with pytest.raises(SystemExit):
            parse_args(["release", "gc", "--shard-counts", bad])
        assert "give counts of 2 or more, comma-separated, or none" in capsys.readouterr().err


def s3_env(monkeypatch) -> None:
    """An object store that is given but never reached: the refusals below come first."""
    for name, value in (("ENDPOINT", "127.0.0.1:9"), ("ACCESS_KEY", "k"), ("SECRET_KEY", "s")):
        monkeypatch.setenv(f"MEMORY3_S3_{name}", value)
    for name in ("MEMORY3_AUTH_TOKEN", "MEMORY3_DEPENDENCY_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("service", ["decoder", "kserve"])
def test_a_dependency_token_without_its_ca_is_refused_before_the_weights_load(service, monkeypatch, tmp_path):
    """It was refused once the weights had loaded, by a check that named `--tls-ca`, which `serve` lacks."""
    from memory3.services.cli.main import _decoder_settings

    s3_env(monkeypatch)
    monkeypatch.setenv("MEMORY3_DEPENDENCY_TOKEN", "t0ken")
    base = ["serve", service, "--release", "r", "--text-address", "t:1", "--memory-address", "m:1"]
    with pytest.raises(ValueError, match="^MEMORY3_DEPENDENCY_TOKEN is only sent over TLS: add --dependency-tls-ca"):
        _decoder_settings(parse_args(base))
    settings = _decoder_settings(parse_args([*base, "--dependency-tls-ca", str(tmp_path / "ca.pem")]))
    assert settings.dependencies.auth_token == "t0ken"


def test_a_kserve_port_taken_is_not_told_to_take_port_0(grpc_port, capsys, monkeypatch):
    """The hint offered "0: any free port", which --http-port and --grpc-port refuse."""
    s3_env(monkeypatch)
    assert main(["serve", "kserve", "--release", "r", "--http-port", str(grpc_port)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"another server listens on 0.0.0.0:{grpc_port}; stop it, or pass --http-port with another port")


def test_a_negative_ram_cache_is_reported_in_mib(capsys, monkeypatch):
    """It was reported in bytes: --ram-cache-mb -1 said "got -1048576"."""
    s3_env(monkeypatch)
    assert main(["serve", "memory", "--release", "r", "--ram-cache-mb", "-1"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--ram-cache-mb must be >= 0 (0 disables the RAM tier), got -1")


def test_a_token_is_not_dropped_when_generate_has_no_tls(capsys, monkeypatch):
    """Over plaintext the token was left out unsaid, and the decoder answered UNAUTHENTICATED."""
    monkeypatch.setenv("MEMORY3_AUTH_TOKEN", "t0ken")
    assert main(["generate", "hi", "--address", "127.0.0.1:9", "--timeout", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "memory3 generate: error: MEMORY3_AUTH_TOKEN is only sent over TLS: add --tls-ca (the PEM CA of the "
        "decoder's certificate), or unset it")


@pytest.mark.parametrize(("argv", "said"), [
    (["--checkpoint", "ck", "--stop", "."], "--stop: only for generating from the decoder"),
    (["--checkpoint", "ck", "--no-memory", "--timeout", "9"], "--no-memory, --timeout: only for generating from"),
    (["--checkpoint", "ck", "--address", "h:1", "--home", "h", "--tls-ca", "ca.pem"],
     "--address, --home, --tls-ca: only for generating from the decoder, and --checkpoint generates in-process"),
    (["--address", "h:1", "--device", "cuda"], "--device is for --checkpoint"),
])
def test_generate_refuses_options_its_chosen_form_ignores(argv, said, capsys):
    """With --checkpoint, --stop, --no-memory, --timeout and the decoder's address were ignored unsaid."""
    assert main(["generate", "hi", *argv]) == 2
    assert said in capsys.readouterr().err


def test_generate_device_is_checked_as_it_is_parsed(capsys):
    """--device auto reached torch, which listed its device types; a typo too."""
    assert parse_args(["generate", "hi", "--checkpoint", "ck"]).device == "cpu"
    assert "argument --device: auto is for training: give cpu or cuda[:N]" in refused(
        ["generate", "hi", "--checkpoint", "ck", "--device", "auto"], capsys)
    assert "argument --device: --device 'gpu'" in refused(["generate", "hi", "--device", "gpu"], capsys)


def test_train_names_no_preset_unless_one_is_given():
    """The default `small` could not be told from `--preset small`, which --quick then trained as tiny."""
    assert parse_args(["train", "--release", "r"]).preset is None
    assert parse_args(["train", "--release", "r", "--preset", "small"]).preset == "small"


@pytest.mark.parametrize(("argv", "said"), [
    (["release", "shard-index", "r", "--shards", "1"], "argument --shards: 1: give 2 or more (a text service"),
    (["up", "--text-shards", "65"], "argument --text-shards: 65: give 64 at most"),
    (["serve", "decoder", "--max-batch", "0"], "argument --max-batch: 0: give 1 or more"),
    (["serve", "decoder", "--max-waiting", "-1"], "argument --max-waiting: -1: give 0 or more"),
    (["serve", "kserve", "--max-streams-per-client", "-1"], "argument --max-streams-per-client: -1: give 0 or more"),
    (["serve", "decoder", "--prefill-tokens", "-1"], "argument --prefill-tokens: -1: give 0 or more"),
    (["serve", "decoder", "--retrieval-lead-tokens", "-1"], "argument --retrieval-lead-tokens: -1: give 0 or more"),
])
def test_counts_are_refused_naming_their_option_before_anything_runs(argv, said, capsys):
    """--shards 1 was refused once the object store was reached; the decoder's counts by the engine's
    settings, as "max_batch must be >= 1", naming no option."""
    assert said in refused(argv, capsys)


def test_a_retrieval_lead_too_long_for_the_chunks_names_its_option(tiny_model, text_codec):
    from memory3.services.decoder.engine import EngineConfig, GenerationEngine

    with pytest.raises(ValueError, match="give --retrieval-lead-tokens 62 or less$"):
        GenerationEngine(tiny_model, text_codec, None, EngineConfig(retrieval_lead_tokens=63))


def test_release_delete_of_the_served_release_says_how_to_stop_that_stack(tmp_path, capsys, monkeypatch):
    """The hint said `memory3 down` without the --home given: followed, it stopped another stack, or none."""
    from types import SimpleNamespace

    s3_env(monkeypatch)
    served = SimpleNamespace(release="r", s3_config=S3Config("127.0.0.1:9", "k"))
    monkeypatch.setattr("memory3.services.stack.stack_is_up", lambda _home: served)
    home = tmp_path / "home"
    assert main(["release", "delete", "r", "--home", str(home)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"stop it first (`memory3 down --home {home}`)")


@pytest.mark.parametrize(("command", "options"), [
    ("up", ["--max-batch", "--retrieval-policy"]),
    ("generate", ["--temperature", "--top-k", "--top-p", "--seed"]),
    ("serve", ["--dtype"]),
])
def test_options_say_what_they_do(command, options):
    from memory3.services.cli.main import build_parser

    parser = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    helps = {flag: action.help for action in parser._actions for flag in action.option_strings}
    assert all(helps[option] for option in options), helps
    if command == "serve":  # float32 also on a GPU, where the chart passes bfloat16
        assert "default float32" in helps["--dtype"] and "bfloat16" in helps["--dtype"]
