"""What `memory3 train` runs when a flag is left out, and that a given flag wins."""

import dataclasses

import pytest

from memory3.services.cli.commands import train_pipeline_config
from memory3.services.retrieval.embedder import native_bf16
from memory3.services.trainer.train import TrainConfig


def test_left_out_flags_take_the_presets_recipe():
    train = train_pipeline_config(preset="small", quick=False, seed=0).train
    assert train == dataclasses.replace(TrainConfig(), bf16=native_bf16())


def test_bf16_follows_the_device_unless_given(monkeypatch):
    """A GPU from Ampere on computes bf16 natively; an older one (V100, T4) emulates it, slower than
    float32: autocast follows what the device trained on does (not the current device, as torch's
    is_bf16_supported asks), and a given flag wins either way."""
    import torch

    capability = {0: (7, 5), 1: (8, 0)}  # a T4 beside an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[torch.device(device).index])
    monkeypatch.setattr(torch.version, "hip", None)
    for index, native in ((0, False), (1, True)):
        cuda = torch.device("cuda", index)
        assert train_pipeline_config(preset="small", quick=False, seed=0, device=cuda).train.bf16 is native
        for given in (True, False):
            assert train_pipeline_config(preset="small", quick=False, seed=0, device=cuda, bf16=given).train.bf16 \
                is given
    assert train_pipeline_config(preset="small", quick=False, seed=0,
                                 device=torch.device("cpu")).train.bf16 is native_bf16()


def test_bf16_follows_the_cpu_unless_given():
    for given in (True, False):
        assert train_pipeline_config(preset="small", quick=False, seed=0, bf16=given).train.bf16 is given
        assert train_pipeline_config(preset="small", quick=True, seed=0, bf16=given).train.bf16 is given


def test_given_flags_win_over_the_defaults():
    """The seed reaches the training loop too, which draws the distractors from it."""
    train = train_pipeline_config(preset="small", quick=False, seed=3, bf16=True, stage3_steps=40,
                                  attention_weight=2.5).train
    assert (train.bf16, train.stage3.steps, train.attention_weight, train.seed) == (True, 40, 2.5, 3)
    assert train.stage3.lr == TrainConfig().stage3.lr  # only the steps change


def test_quick_keeps_its_short_stages_and_trains_the_preset_it_is_given():
    """`--preset small --quick` trained tiny, as the chart's Job does that renders `--preset small`."""
    quick = train_pipeline_config(preset=None, quick=True, seed=0)
    assert quick.preset == "tiny" and quick.train.total_steps < 100
    assert train_pipeline_config(preset=None, quick=False, seed=0).preset == "small"
    named = train_pipeline_config(preset="small", quick=True, seed=0)
    assert named.preset == "small" and named.train.total_steps == quick.train.total_steps


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"stage3_steps": -1}, "--stage3-steps -1: give a number of steps >= 0"),
    ({"attention_weight": float("nan")}, "--attention-weight nan: give a finite number >= 0"),
    ({"attention_weight": -0.5}, "--attention-weight -0.5: give a finite number >= 0"),
])
def test_bad_values_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_pipeline_config(preset="small", quick=False, seed=0, **kwargs)


def test_a_work_dir_resumes_under_another_autocast_but_not_another_training(tmp_path):
    """A Job rescheduled on a CPU whose native bf16 differs was told its work dir held another
    configuration, and could not resume; another seed must still be refused."""
    import dataclasses

    from memory3.services.trainer.pipeline import PipelineConfig, _check_same_config

    config = PipelineConfig.quick()
    _check_same_config(tmp_path, config)
    other_autocast = dataclasses.replace(config, train=dataclasses.replace(config.train, bf16=not config.train.bf16))
    _check_same_config(tmp_path, other_autocast)
    other_seed = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=config.train.seed + 1))
    with pytest.raises(ValueError, match=r"another configuration \(train.seed 0 there, 1 now\)"):
        _check_same_config(tmp_path, other_seed)


def test_a_run_resumed_on_other_real_text_is_refused(tmp_path):
    """The real text comes from the image's Debian packages: resumed in an image of other versions, a run
    drew other documents at the same steps, and published a knowledge base it did not train against."""
    from memory3.services.trainer.pipeline import WorkDirTaken, _check_same_text

    _check_same_text(tmp_path, ["a manual page", "a dictionary entry"])
    _check_same_text(tmp_path, ["a manual page", "a dictionary entry"])  # the same: it resumes
    with pytest.raises(WorkDirTaken, match=r"the real text it trains on, 2 documents of this machine's Debian "
                                           r"packages, differs from the run's"):
        _check_same_text(tmp_path, ["a manual page", "a dictionary entry, revised"])
