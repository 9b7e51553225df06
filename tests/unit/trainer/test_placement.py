"""Where `memory3 train --device` puts each process, on machines with and without GPUs, alone and
under torchrun; and that a device the machine cannot give is refused with what to pass."""

import pytest

from memory3.services.cli.main import build_parser
from memory3.services.trainer.placement import PlacementError, training_placement


def where(requested: str, **kwargs) -> tuple[str, str]:
    placement = training_placement(requested, **kwargs)
    return str(placement.device), placement.backend


@pytest.mark.parametrize(("requested", "kwargs", "expected"), [
    ("auto", {"cuda_devices": 0}, ("cpu", "gloo")),
    ("auto", {"cuda_devices": 2}, ("cuda:0", "nccl")),
    ("cpu", {"cuda_devices": 2}, ("cpu", "gloo")),
    ("cuda", {"cuda_devices": 1}, ("cuda:0", "nccl")),
    ("cuda:1", {"cuda_devices": 2}, ("cuda:1", "nccl")),
    # torchrun: one process per GPU, each on its local rank's
    ("auto", {"cuda_devices": 4, "world_size": 8, "local_rank": 3}, ("cuda:3", "nccl")),
    ("cuda", {"cuda_devices": 4, "world_size": 4, "local_rank": 2}, ("cuda:2", "nccl")),
    ("auto", {"cuda_devices": 0, "world_size": 2, "local_rank": 1}, ("cpu", "gloo")),
    ("cpu", {"cuda_devices": 4, "world_size": 2, "local_rank": 1}, ("cpu", "gloo")),
])
def test_each_process_gets_its_device_and_backend(requested, kwargs, expected):
    assert where(requested, **kwargs) == expected


@pytest.mark.parametrize(("requested", "kwargs", "message"), [
    ("cuda", {"cuda_devices": 0}, "--device cuda: this machine has no CUDA device"),
    ("cuda:0", {"cuda_devices": 0}, "--device cuda:0: this machine has no CUDA device"),
    ("cuda:2", {"cuda_devices": 2}, r"no CUDA device 2 here \(this machine has 2\); use cuda:0 to cuda:1"),
    ("cuda:0", {"cuda_devices": 2, "world_size": 2, "local_rank": 0},
     "would put all 2 processes on one GPU; pass --device cuda"),
    ("auto", {"cuda_devices": 2, "world_size": 4, "local_rank": 2},
     r"process 2 on this machine, which has 2 CUDA device\(s\): start at most 2 per machine"),
    ("gpu", {"cuda_devices": 1}, "--device 'gpu': give auto, cpu, cuda or cuda:N"),
    ("cuda:", {"cuda_devices": 1}, "give auto, cpu, cuda or cuda:N"),
])
def test_a_device_this_launch_cannot_have_is_refused_with_what_to_pass(requested, kwargs, message):
    with pytest.raises(PlacementError, match=message):
        training_placement(requested, **kwargs)


def test_this_machine_is_asked_when_not_told():
    import torch

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert where("auto")[0] == expected


@pytest.mark.parametrize("command", [["train", "--release", "r1"], ["kb", "add", "f.txt", "--release", "r1"]])
def test_train_and_kb_add_take_a_device_and_default_to_auto(command, capsys):
    parser = build_parser()
    assert parser.parse_args(command).device == "auto"
    assert parser.parse_args([*command, "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--device", "tpu"])
    assert "--device 'tpu': give auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_a_gpu_process_binds_its_device_before_nccl_and_waits_long_for_rank_0(monkeypatch):
    """NCCL's communicator lives on the current device, so the device is set first and bound to the
    group; the others wait up to an hour while rank 0 writes a checkpoint (NCCL's default is 10 min)."""
    import datetime

    import torch
    import torch.distributed as dist

    from memory3.services.cli.commands import init_distributed
    from memory3.services.trainer.placement import Placement

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    distributed = init_distributed(Placement(torch.device("cuda", 1), "nccl"), 4)
    assert (distributed.rank, distributed.world_size) == (3, 4)
    assert calls == [("set_device", "cuda:1"),
                     ("init", "nccl", {"device_id": torch.device("cuda", 1),
                                       "timeout": datetime.timedelta(hours=1)})]
    calls.clear()
    assert init_distributed(Placement(torch.device("cuda", 1), "nccl"), 1).world_size == 1  # alone: no group
    assert calls == [("set_device", "cuda:1")]  # but its GPU is still the current one
