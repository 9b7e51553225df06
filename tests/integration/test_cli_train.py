"""`memory3 train --quick` and `memory3 bench quality` as a user runs them, against a real S3 server."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def memory3(*args, env, check=True, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "memory3.services.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"memory3 {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def s3_env(local_s3):
    cfg = local_s3.config
    return {**os.environ, "MEMORY3_S3_ENDPOINT": cfg.endpoint, "MEMORY3_S3_ACCESS_KEY": cfg.access_key,
            "MEMORY3_S3_SECRET_KEY": cfg.secret_key, "MEMORY3_S3_BUCKET": "cli-tests"}


def test_train_quick_then_bench_quality(tmp_path, s3_env):
    proc = memory3("train", "--quick", "--release", "cli-quick", "--work-dir", str(tmp_path / "run"), env=s3_env)
    assert "release cli-quick:" in proc.stdout
    assert (tmp_path / "run" / "training.png").stat().st_size > 0

    again = memory3("train", "--quick", "--release", "cli-quick", "--work-dir", str(tmp_path / "run2"),
                    env=s3_env, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr and "--exist-ok" in again.stderr
    assert not (tmp_path / "run2").exists()  # refused before training
    # A Job run again does nothing; one asking for other training is refused, before training too.
    rerun = memory3("train", "--quick", "--release", "cli-quick", "--exist-ok", "--bf16", "--work-dir",
                    str(tmp_path / "run3"), env=s3_env)  # autocast is how it runs, not what it learns
    assert "already published from this training configuration: nothing to do" in rerun.stdout
    other = memory3("train", "--quick", "--release", "cli-quick", "--exist-ok", "--seed", "1", "--work-dir",
                    str(tmp_path / "run4"), env=s3_env, check=False)
    assert other.returncode == 2
    assert "made from other inputs (seed 0 there, 1 asked; train.seed 0 there, 1 asked)" in other.stderr
    assert not (tmp_path / "run3").exists() and not (tmp_path / "run4").exists()
    hnsw = memory3("train", "--quick", "--release", "cli-quick", "--exist-ok", "--index-kind", "hnsw", "--work-dir",
                   str(tmp_path / "run5"), env=s3_env, check=False)
    assert hnsw.returncode == 2 and "(index kind 'auto' there, 'hnsw' asked)" in hnsw.stderr
    # An index the knowledge base is too small for fails once the references are known, before training.
    pq = memory3("train", "--quick", "--release", "cli-pq", "--index-kind", "ivfpq", "--work-dir",
                 str(tmp_path / "run6"), env=s3_env, check=False)
    assert pq.returncode == 2 and "would hold 500: choose flat or hnsw" in pq.stderr
    assert not list((tmp_path / "run6").glob("checkpoint*")) and not (tmp_path / "run6" / "model").exists()

    out = tmp_path / "quality.json"
    memory3("bench", "quality", "--release", "cli-quick", "--questions", "24", "--json", str(out),
            "--cache-dir", str(tmp_path / "cache"), env=s3_env)
    result = json.loads(out.read_text())
    for key in ("acc_no_memory", "acc_memory", "acc_rag"):
        assert 0.0 <= result[key] <= 1.0
    assert result["n_questions"] == 24
    assert result["setup"]["device"] == "cpu"  # --device auto on a machine without CUDA
    assert set(result["first_hit_only"]) >= {"acc_memory", "acc_rag"}
    assert set(result["tokens_per_head_ablation"]["acc_memory"]) == {"4", "8", "16", "32", "all"}
    assert result["perplexity"]["memory"] > 1 and result["perplexity"]["no_memory"] > 1
    attention = result["attention_on_the_right_memory"]
    assert attention["n_questions"] > 0 and attention["chance"] == 0.2
    assert attention["by_memory_layer"] and all(0.0 <= v <= 1.0 for v in attention["by_memory_layer"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_train_without_a_store_fails_before_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_S3")}
    proc = memory3("train", "--quick", "--release", "x", "--work-dir", str(tmp_path), "--home", str(tmp_path / "home"),
                   env=env, check=False)  # no stack runs from that home either
    assert proc.returncode == 2 and "no object store" in proc.stderr
    assert f"`memory3 up --home {tmp_path / 'home'}`" in proc.stderr  # the hint acts on the home given
    env.update({"MEMORY3_S3_ENDPOINT": "127.0.0.1:9", "MEMORY3_S3_ACCESS_KEY": "a", "MEMORY3_S3_SECRET_KEY": "b"})
    proc = memory3("train", "--quick", "--release", "x", "--work-dir", str(tmp_path), env=env, check=False)
    assert proc.returncode == 2 and "cannot reach the object store" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
    proc = memory3("train", "--quick", "--release", "x", "--stage3-steps", "-1", "--work-dir", str(tmp_path), env=env,
                   check=False)
    assert proc.returncode == 2 and "--stage3-steps -1: give a number of steps >= 0" in proc.stderr
    proc = memory3("train", "--quick", "--release", "x", "--attention-weight", "-1", "--work-dir", str(tmp_path),
                   env=env, check=False)
    assert proc.returncode == 2 and "--attention-weight -1.0: give a finite number >= 0" in proc.stderr
