"""What a training run records per step, what a resume keeps of it, and the training plot drawn from it."""

import json
import shutil
from collections import deque
from pathlib import Path

import pytest

from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer import train
from memory3.services.trainer.data import TrainingData
from memory3.services.trainer.pipeline import loss_curves, plot_history, write_history
from memory3.services.trainer.train import HISTORY_FILE, StageConfig, TrainConfig, Trainer
from memory3.services.trainer.world import World


def tiny_run(out_dir: Path, steps: tuple[int, int, int], evaluate=None, **train) -> Trainer:
    """A Trainer of the tiny model over `steps` steps of stages 1, 2 and 3 (no warm-up, no decay)."""
    codec = TextCodec(byte_level_tokenizer())
    config = Memory3Config.from_name("tiny")
    (one, two, three) = steps
    train = TrainConfig(seq_len=128, batch_size=2, **train,
                        stage1=StageConfig(steps=one, lr=1e-3, warmup_steps=0),
                        stage2=StageConfig(steps=two, lr=1e-3, warmup_steps=0),
                        stage3=StageConfig(steps=three, lr=3e-4, warmup_steps=0, decay_fraction=0.0))
    data = TrainingData(World(1, n_train=30, n_heldout=6), codec, config, seq_len=train.seq_len, seed=0)
    return Trainer(random_model(config, seed=0), data, train, out_dir, prefix=codec.reference_prefix(config),
                   progress=False, evaluate=evaluate)


def test_steps_with_the_attention_loss_record_both_parts_and_the_plot_draws_every_stage(tmp_path):
    trainer = tiny_run(tmp_path, (1, 1, 3), eval_every=100, checkpoint_every=100, attention_weight=3.0)
    trainer.run()
    steps = [h for h in trainer.history() if "loss" in h]
    assert [h["stage"] for h in steps] == [1, 2, 3, 3, 3]
    split = [h for h in steps if "attention_loss" in h]
    assert split, "stage 3's distractor groups turn the attention loss on"
    assert all(h["stage"] > 1 for h in split) and "lm_loss" not in steps[0]
    for h in split:
        assert h["loss"] == pytest.approx(h["lm_loss"] + 3.0 * h["attention_loss"], abs=1e-4)

    curves = loss_curves(list(trainer.history()))
    assert list(curves) == ["stage 1", "stage 2", "stage 3", "memory attention loss"]
    assert [step for step, _ in curves["stage 3"]] == [3, 4, 5]
    by_step = {h["step"]: h for h in steps}
    assert all(value == by_step[step].get("lm_loss", by_step[step]["loss"]) for step, value in curves["stage 3"])
    plot_history(list(trainer.history()), tmp_path / "training.png")
    assert (tmp_path / "training.png").stat().st_size > 0


def test_a_history_without_the_attention_loss_plots_the_loss_of_each_stage():
    history = [{"step": 1, "stage": 1, "loss": 5.0}, {"step": 2, "stage": 2, "loss": 4.0},
               {"step": 2, "eval": {"heldout_acc_memory": 0.1}}, {"step": 3, "stage": 3, "loss": 3.5}]
    assert loss_curves(history) == {"stage 1": [(1, 5.0)], "stage 2": [(2, 4.0)], "stage 3": [(3, 3.5)]}
    assert loss_curves([]) == {}


def test_a_checkpoint_resumes_only_with_its_number_of_processes_and_unfinished_saves_go(tmp_path):
    """Resumed by one process, a run of two trained again on half the samples it had seen; a process
    killed while saving left its temporary checkpoint for ever (a model's size each)."""
    from memory3.services.trainer.train import Distributed

    codec = TextCodec(byte_level_tokenizer())
    config = Memory3Config.from_name("tiny")
    train = TrainConfig(seq_len=128, batch_size=2, eval_every=100, checkpoint_every=100,
                        stage1=StageConfig(steps=1, lr=1e-3, warmup_steps=0),
                        stage2=StageConfig(steps=0, lr=1e-3, warmup_steps=0),
                        stage3=StageConfig(steps=0, lr=3e-4, warmup_steps=0, decay_fraction=0.0))
    data = TrainingData(World(1, n_train=30, n_heldout=6), codec, config, seq_len=train.seq_len, seed=0)

    def trainer(world_size: int) -> Trainer:
        return Trainer(random_model(config, seed=0), data, train, tmp_path, prefix=codec.reference_prefix(config),
                       progress=False, dist=Distributed(0, world_size))

    orphan = tmp_path / "checkpoints" / ".tmp-step-0000001-99999"
    orphan.mkdir(parents=True)
    two = trainer(2)
    saved = two.save()
    assert not orphan.exists()
    trainer(2).load(saved)
    with pytest.raises(ValueError, match="a run of 2 processes; resume it with 2 \\(this one has 1\\)"):
        trainer(1).load(saved)


def tiny_trainer(out_dir: Path) -> Trainer:
    """Five steps in all, evaluated and checkpointed at steps 2, 4 and 5."""
    return tiny_run(out_dir, (2, 1, 2), evaluate=lambda model: {"heldout_acc_memory": 0.25}, eval_every=2,
                    checkpoint_every=2, keep_checkpoints=3)


def killed_after_its_last_checkpoint(out_dir: Path) -> tuple[Path, list[dict]]:
    """A run killed after it logged step 5 but before it checkpointed it: its last checkpoint, step
    4's, and the history it logged, that of a run that was not killed."""
    trainer = tiny_trainer(out_dir)
    trainer.run()
    shutil.rmtree(out_dir / "checkpoints" / "step-0000005")
    return out_dir / "checkpoints" / "step-0000004", list(trainer.history())


def resumed(out_dir: Path) -> Trainer:
    trainer = tiny_trainer(out_dir)
    trainer.load(trainer.latest_checkpoint())
    trainer.run()
    return trainer


def history_file(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / HISTORY_FILE).read_text().splitlines()]


def assert_same_history(got: list[dict], expected: list[dict]) -> None:
    """Entry for entry, but for the clock (and float noise in the losses)."""
    assert [sorted(h) for h in got] == [sorted(h) for h in expected]
    for a, b in zip(got, expected, strict=True):
        if "eval" in a:
            assert a == b
        else:
            assert without_clock(a) == pytest.approx(without_clock(b), rel=1e-4)


def without_clock(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "elapsed_s"}


def test_a_checkpoint_holds_the_length_of_the_history_not_the_history_and_a_resume_drops_later_entries(tmp_path):
    """Every checkpoint rewrote the whole history: ~140 MB at a million steps. Its entries are in
    the work directory's history file; a resumed run keeps those before its checkpoint."""
    checkpoint, straight = killed_after_its_last_checkpoint(tmp_path)
    assert history_file(tmp_path) == straight
    state = json.loads((checkpoint / "state.json").read_text())
    assert "history" not in state
    entries = state["history_entries"]
    assert [(h["step"], "eval" in h) for h in straight[:entries]][-2:] == [(4, False), (4, True)]
    assert len(straight) > entries  # step 5 was logged after it

    trainer = resumed(tmp_path)
    assert [h["step"] for h in trainer.history() if "loss" in h] == [1, 2, 3, 4, 5]  # step 5 once
    assert_same_history(list(trainer.history()), straight)
    assert history_file(tmp_path) == list(trainer.history())


def test_elapsed_time_carries_on_across_a_resume(tmp_path):
    checkpoint, _ = killed_after_its_last_checkpoint(tmp_path)
    trainer = resumed(tmp_path)
    elapsed = [h["elapsed_s"] for h in trainer.history() if "loss" in h]
    assert elapsed == sorted(elapsed)
    saved = json.loads((checkpoint / "state.json").read_text())["elapsed_s"]
    assert elapsed[-1] >= round(saved, 2) >= elapsed[-2]  # the checkpoint came after step 4 and its evaluation


def test_a_checkpoint_that_holds_its_history_still_resumes_and_starts_the_history_file(tmp_path):
    """As checkpoints were written before the history had its own file (nor the elapsed time)."""
    checkpoint, straight = killed_after_its_last_checkpoint(tmp_path)
    state = json.loads((checkpoint / "state.json").read_text())
    entries = state.pop("history_entries", None) or len(state["history"])
    state.pop("elapsed_s", None)
    (checkpoint / "state.json").write_text(json.dumps({**state, "history": straight[:entries]}))
    (tmp_path / HISTORY_FILE).unlink(missing_ok=True)

    trainer = resumed(tmp_path)
    assert_same_history(list(trainer.history()), straight)
    assert history_file(tmp_path) == list(trainer.history())
    elapsed = [h["elapsed_s"] for h in trainer.history() if "loss" in h]
    assert elapsed == sorted(elapsed)  # from the last elapsed time the history logged


def test_a_resume_without_the_history_file_says_what_to_do(tmp_path):
    checkpoint, _ = killed_after_its_last_checkpoint(tmp_path)
    (tmp_path / HISTORY_FILE).unlink()
    with pytest.raises(ValueError, match="holds 0 history entries, fewer than the 6 logged before the checkpoint: "
                                         "restore the file, or start a new run"):
        tiny_trainer(tmp_path).load(checkpoint)


def held_entries(trainer: Trainer) -> int:
    """History entries the trainer's state holds in memory."""
    return sum(len(v) for v in vars(trainer.state).values() if isinstance(v, list | deque))


def test_a_run_holds_only_its_last_entries_and_reports_its_whole_history(tmp_path, monkeypatch):
    """Every logged step stayed in memory for the whole run (about 1 KB a step: a gigabyte at a
    million steps), on top of the history file. The run holds its last entries; history.json and
    the plot, read back from the file, are what they were."""
    monkeypatch.setattr(train, "RECENT_ENTRIES", 3, raising=False)
    checkpoint, straight = killed_after_its_last_checkpoint(tmp_path)
    assert len(straight) == 8  # five steps and three evaluations
    trainer = tiny_trainer(tmp_path)
    trainer.load(checkpoint)
    assert held_entries(trainer) <= 3
    trainer.run()
    assert held_entries(trainer) <= 3
    assert list(trainer.state.recent) == history_file(tmp_path)[-3:]
    assert trainer.state.entries == 8

    assert_same_history(list(trainer.history()), straight)
    write_history(trainer.history(), tmp_path / "history.json")
    assert (tmp_path / "history.json").read_text() == json.dumps(history_file(tmp_path))
    plot_history(trainer.history(), tmp_path / "training.png")
    assert (tmp_path / "training.png").stat().st_size > 0


def test_past_ten_million_steps_the_latest_checkpoint_is_resumed_and_kept(tmp_path):
    """Checkpoint names are padded to 7 digits and were sorted as text: past step 9,999,999 the
    newest sorted first, so a resume went back to step 9,999,750 (training again everything
    after it) and each new checkpoint was pruned as the oldest."""
    trainer = tiny_run(tmp_path, (1, 0, 0), keep_checkpoints=2)
    for step in (9_999_750, 10_000_000):
        trainer.state.step = step
        trainer.save()
    trainer.state.step = 10_000_250
    saved = trainer.save()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-10000000", "step-10000250"]
    assert trainer.latest_checkpoint() == saved
    again = tiny_run(tmp_path, (1, 0, 0))
    again.load(again.latest_checkpoint())
    assert again.state.step == 10_000_250


def test_a_damaged_latest_checkpoint_is_passed_over_for_the_one_before_it(tmp_path):
    """A machine that crashed after a checkpoint's rename held files cut short: every restart failed
    on it, though the checkpoint before it was whole. A checkpoint of another run is still refused."""
    trainer = tiny_run(tmp_path, (2, 2, 0), eval_every=100, checkpoint_every=2, keep_checkpoints=3)
    trainer.run()
    names = [p.name for p in trainer.checkpoints()]
    assert names == ["step-0000002", "step-0000004"]
    weights = trainer.checkpoints()[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    said: list[str] = []
    again = tiny_run(tmp_path, (2, 2, 0), eval_every=100, checkpoint_every=2)
    assert again.resume(said.append).name == "step-0000002" and again.state.step == 2
    assert len(said) == 1 and said[0].startswith("checkpoint step-0000004 cannot be read (")
    assert said[0].endswith("); trying the one before it")
    first = trainer.checkpoints()[0] / "optimizer.safetensors"
    first.write_bytes(b"")
    with pytest.raises(Exception, match="."):  # none reads: the newest one's error, not a run from step 0
        tiny_run(tmp_path, (2, 2, 0), eval_every=100, checkpoint_every=2).resume(said.append)


def test_one_run_at_a_time_uses_a_work_directory(tmp_path):
    """A second `memory3 train` of a release, or a job resubmitted beside a stopped service's child, trained
    in the same directory: each removed the other's checkpoints as it saved."""
    import os

    from memory3.services.trainer.pipeline import WorkDirBusy, _work_dir_lock

    with _work_dir_lock(tmp_path, True):
        with pytest.raises(WorkDirBusy, match=rf"is in use by another run \(process {os.getpid()}\): wait for it"), \
                _work_dir_lock(tmp_path, True):
            pass
        with _work_dir_lock(tmp_path, False):  # another process of the same data-parallel run
            pass
    with _work_dir_lock(tmp_path, True):  # free again once the run ended
        pass
