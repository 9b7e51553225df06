"""Which samples each training step reads: stage 1, stage 2 (single-chunk, then full-length), stage 3."""

import pytest

from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer.data import TrainingData
from memory3.services.trainer.train import StageConfig, TrainConfig, Trainer
from memory3.services.trainer.world import World


class RecordingData(TrainingData):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def stage1(self, index):
        self.calls.append((1, index))
        return super().stage1(index)

    def stage2(self, index, *, single_chunk=False):
        self.calls.append(("single" if single_chunk else "full", index))
        return super().stage2(index, single_chunk=single_chunk)


@pytest.mark.parametrize("alternate", [False, True])
def test_stage2_starts_with_single_chunk_samples_holding_as_many_tokens(tmp_path, alternate):
    codec = TextCodec(byte_level_tokenizer())
    config = Memory3Config.from_name("tiny")
    world = World(1, n_train=30, n_heldout=6)
    train = TrainConfig(seq_len=128, batch_size=2, own_reference_fraction=0.5, eval_every=100, checkpoint_every=100,
                        alternate_single_chunk=alternate,
                        stage1=StageConfig(steps=2, lr=1e-3, warmup_steps=1),
                        stage2=StageConfig(steps=4, lr=1e-3, warmup_steps=1),
                        stage3=StageConfig(steps=2, lr=3e-4, warmup_steps=0, decay_fraction=0.0))
    data = RecordingData(world, codec, config, seq_len=train.seq_len, seed=0)
    trainer = Trainer(random_model(config, seed=0), data, train, tmp_path, prefix=codec.reference_prefix(config),
                      progress=False)
    trainer.run()
    per_step = [data.calls[0:2], data.calls[2:4], data.calls[4:8], data.calls[8:12]]
    assert per_step[0] == [(1, 0), (1, 1)] and per_step[1] == [(1, 2), (1, 3)]
    # Steps 2 and 3 (the first half of stage 2): 128 / 64 = 2 times as many one-chunk samples.
    assert per_step[2] == [("single", i) for i in range(8, 12)]
    assert per_step[3] == [("single", i) for i in range(12, 16)]
    assert data.calls[12:16] == [("full", 8), ("full", 9), ("full", 10), ("full", 11)]  # the rest of stage 2
    stage3 = data.calls[16:]
    if alternate:  # single-chunk and full-length steps alternate
        assert stage3 == [("single", i) for i in range(24, 28)] + [("full", 14), ("full", 15)]
    else:
        assert stage3 == [("full", 12), ("full", 13), ("full", 14), ("full", 15)]
    # Stage 3 restarts AdamW (beta2 0.999) at its own constant rate; only it reads distractors.
    lrs = [h["lr"] for h in trainer.history() if h.get("stage") in (2, 3)]
    assert lrs == pytest.approx([1e-3] * 4 + [3e-4] * 2)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert [trainer.sample_kind(2, i)[1] for i in range(4)] == [False] * 4
    assert trainer.sample_kind(3, 0)[1] and trainer.sample_kind(3, 1) == (False, True)
    assert trainer.sample_kind(1, 0) == (False, False)
