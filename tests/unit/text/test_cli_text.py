"""`memory3 serve text` flags: parsed once, turned into server options and engine settings."""

from pathlib import Path

from memory3.services.cli.main import SERVE_PORTS, build_parser, main, server_options


def test_serve_text_needs_a_release(capsys):
    assert main(["serve", "text"]) == 2
    assert "needs --release NAME" in capsys.readouterr().err


def test_server_options_from_flags_and_token_from_env(monkeypatch):
    monkeypatch.setenv("MEMORY3_AUTH_TOKEN", "s3cret")
    args = build_parser().parse_args(["serve", "text", "--release", "r1", "--metrics-port", "0",
                                      "--tls-cert", "c.pem", "--tls-key", "k.pem", "--max-overlap", "1"])
    options = server_options(args)
    assert options.port == SERVE_PORTS["text"] and options.metrics_port == 0
    assert options.tls_cert == Path("c.pem") and options.auth_token == "s3cret"
    assert args.release == "r1" and args.max_overlap == 1.0 and args.max_concurrency == 1


def test_tls_needs_both_halves(capsys, monkeypatch):
    monkeypatch.delenv("MEMORY3_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("MEMORY3_S3_ENDPOINT", "127.0.0.1:9")
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    assert main(["serve", "text", "--release", "r1", "--tls-cert", "c.pem"]) == 2
    assert "--tls-cert and --tls-key" in capsys.readouterr().err
