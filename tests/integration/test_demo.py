"""The README's first command, `memory3 demo`, on its quick release: the whole local stack as
processes (S3 server, Redis, text, memory and decoder services), a streamed answer with its
references, the score of ten questions, and `memory3 down` stopping exactly what `up` started."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from memory3.services.stack import _alive

pytestmark = pytest.mark.integration


def memory3(*args, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "memory3.services.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"memory3 {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def score_table(stderr: str) -> list[str]:
    """The demo's table: a header, 10 rows and the score line."""
    table = stderr.split("10 knowledge-base-only questions, greedy, the first one above:\n")[1].splitlines()[:12]
    assert table[0].split() == ["question", "expected", "with", "memory", "without", "memory"]
    assert re.fullmatch(r"right with memory: \d+/10; without memory: \d+/10 \(.*\)", table[11])
    return table


@pytest.fixture
def home(tmp_path):
    """The stack's home; whatever a failing test left running there is stopped by PID."""
    yield tmp_path / "home"
    subprocess.run([sys.executable, "-m", "memory3.services.cli.main", "down", "--home", str(tmp_path / "home")],
                   capture_output=True, timeout=120)


def test_demo_starts_the_stack_answers_scores_and_down_stops_it(tmp_path, home):
    home = str(home)
    first = memory3("demo", "--quick", "--home", home)
    assert "stack up: decoder at 127.0.0.1:" in first.stderr
    expected = re.search(r"expected answer: (.+)\):\nQuestion: (.+)\n", first.stderr)
    assert expected, first.stderr[-2000:]
    cited = re.findall(r"^  ([0-9a-f]{32}): ", first.stderr, flags=re.M)
    assert 1 <= len(cited) <= 5
    first_row = score_table(first.stderr)[1]
    assert first_row.startswith(expected.group(2)[:47]) and expected.group(1) in first_row

    state = json.loads((tmp_path / "home" / "stack" / "state.json").read_text())
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    assert set(pids) == {"s3", "redis", "text", "memory", "decoder"} and all(map(_alive, pids.values()))

    other = subprocess.run([sys.executable, "-m", "memory3.services.cli.main", "demo", "--release", "small-v1",
                            "--home", home], capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "the running stack serves 'quick-v1'" in other.stderr

    again = memory3("demo", "--quick", "--home", home)  # the stack is up: asked again, nothing started
    assert "stack up" not in again.stderr and "training" not in again.stderr
    assert score_table(again.stderr) == score_table(first.stderr)  # greedy, one request at a time: the same

    os.kill(pids["decoder"], signal.SIGKILL)  # a stack partly down is stopped and started afresh
    restarted = memory3("demo", "--quick", "--home", home)
    assert "the last stack is partly down (decoder not running): stopping the rest" in restarted.stderr
    assert "stack up" in restarted.stderr and not any(map(_alive, pids.values()))
    state = json.loads((tmp_path / "home" / "stack" / "state.json").read_text())
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    assert all(map(_alive, pids.values()))

    # A user's commands find the stack's object store: a fact added to the demo's release.
    facts = tmp_path / "facts.txt"
    facts.write_text("Zorblat Quenmire (person): profession glassblower; birthplace Varkstad; born 1877.\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_S3")}
    added = memory3("kb", "add", str(facts), "--release", "quick-v1", "--name", "quick-v1-kb", "--home", home, env=env)
    assert "object store: the local stack's, at 127.0.0.1:" in added.stderr
    assert "release quick-v1-kb (from quick-v1): 501 memories" in added.stdout

    memory3("down", "--home", home)
    assert not any(map(_alive, pids.values()))
    assert not (tmp_path / "home" / "stack" / "state.json").exists()

    # A release asked for by name must exist: a typo does not start a training run.
    typo = subprocess.run([sys.executable, "-m", "memory3.services.cli.main", "up", "--release", "quick-v2",
                           "--home", home], capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2
    assert "release 'quick-v2' is not in bucket 'memory3' (releases there: quick-v1, quick-v1-kb)" in typo.stderr
    assert "training" not in typo.stderr and not (tmp_path / "home" / "stack" / "state.json").exists()


def test_a_sigterm_while_up_trains_stops_what_it_started(home):
    up = subprocess.Popen([sys.executable, "-m", "memory3.services.cli.main", "up", "--quick", "--home", str(home)],
                          stderr=subprocess.PIPE, text=True)
    try:
        for line in up.stderr:  # the stores run and the state is saved before training starts
            if "not in the bucket: training" in line:
                break
        state = json.loads((home / "stack" / "state.json").read_text())
        pids = [p["pid"] for p in state["processes"]]
        assert len(pids) == 2 and all(map(_alive, pids))  # S3 and Redis
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        up.kill()
        up.stderr.close()
    assert not any(map(_alive, pids)) and not (home / "stack" / "state.json").exists()
