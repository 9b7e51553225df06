"""`memory3 serve memory`: its flags parse, and a missing release is a clear usage error."""

import pytest

from memory3.services.cli.main import build_parser, main


def test_memory_flags_parse():
    args = build_parser().parse_args(["serve", "memory", "--release", "r1", "--redis-url", "redis://h:6379/0",
                                      "--redis-ttl", "60", "--ram-cache-mb", "0.5", "--s3-workers", "4",
                                      "--redis-timeout", "1.5"])
    assert (args.service, args.release, args.redis_url, args.redis_ttl, args.ram_cache_mb, args.s3_workers,
            args.redis_timeout) == ("memory", "r1", "redis://h:6379/0", 60, 0.5, 4, 1.5)
    assert build_parser().parse_args(["serve", "memory"]).redis_timeout == 0.2


def test_serve_memory_needs_a_release(capsys):
    assert main(["serve", "memory"]) == 2
    assert "serve memory needs --release NAME" in capsys.readouterr().err


def test_bad_cache_sizes_are_usage_errors(capsys, monkeypatch):
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    assert main(["serve", "memory", "--release", "r1", "--s3-endpoint", "127.0.0.1:9", "--ram-cache-mb", "-1"]) == 2
    assert "--ram-cache-mb must be >= 0" in capsys.readouterr().err


def test_a_redis_url_it_cannot_use_is_a_usage_error_that_names_no_password(capsys, monkeypatch):
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_REDIS_URL", "redis+sentinel://:hunter2@s1:26379")
    assert main(["serve", "memory", "--release", "r1", "--s3-endpoint", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "name the Sentinel service" in err and "hunter2" not in err


@pytest.mark.parametrize("timeout", ["0.01", "61"])
def test_a_redis_timeout_out_of_bounds_is_a_usage_error(capsys, monkeypatch, timeout):
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    assert main(["serve", "memory", "--release", "r1", "--s3-endpoint", "127.0.0.1:9",
                 "--redis-timeout", timeout]) == 2
    assert f"--redis-timeout must be between 0.05 and 60 seconds, got {float(timeout):g}" in capsys.readouterr().err

