"""What a training run records per step, and the training plot drawn from it."""

import pytest

from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer.data import TrainingData
from memory3.services.trainer.pipeline import loss_curves, plot_history
from memory3.services.trainer.train import StageConfig, TrainConfig, Trainer
from memory3.services.trainer.world import World


def test_steps_with_the_attention_loss_record_both_parts_and_the_plot_draws_every_stage(tmp_path):
    codec = TextCodec(byte_level_tokenizer())
    config = Memory3Config.from_name("tiny")
    train = TrainConfig(seq_len=128, batch_size=2, eval_every=100, checkpoint_every=100, attention_weight=3.0,
                        stage1=StageConfig(steps=1, lr=1e-3, warmup_steps=0),
                        stage2=StageConfig(steps=1, lr=1e-3, warmup_steps=0),
                        stage3=StageConfig(steps=3, lr=3e-4, warmup_steps=0, decay_fraction=0.0))
    data = TrainingData(World(1, n_train=30, n_heldout=6), codec, config, seq_len=train.seq_len, seed=0)
    trainer = Trainer(random_model(config, seed=0), data, train, tmp_path, prefix=codec.reference_prefix(config),
                      progress=False)
    trainer.run()
    steps = [h for h in trainer.state.history if "loss" in h]
    assert [h["stage"] for h in steps] == [1, 2, 3, 3, 3]
    split = [h for h in steps if "attention_loss" in h]
    assert split, "stage 3's distractor groups turn the attention loss on"
    assert all(h["stage"] > 1 for h in split) and "lm_loss" not in steps[0]
    for h in split:
        assert h["loss"] == pytest.approx(h["lm_loss"] + 3.0 * h["attention_loss"], abs=1e-4)

    curves = loss_curves(trainer.state.history)
    assert list(curves) == ["stage 1", "stage 2", "stage 3", "memory attention loss"]
    assert [step for step, _ in curves["stage 3"]] == [3, 4, 5]
    by_step = {h["step"]: h for h in steps}
    assert all(value == by_step[step].get("lm_loss", by_step[step]["loss"]) for step, value in curves["stage 3"])
    plot_history(trainer.state.history, tmp_path / "training.png")
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
