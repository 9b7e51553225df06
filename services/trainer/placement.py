"""Where training runs: the device of each process and the collective backend between them.

`memory3 train --device auto` is the default so that the same command (and the chart's Job) trains
on a GPU where the machine has one and on the CPU elsewhere. Under torchrun each process takes the
GPU of its local rank, since torchrun starts one process per GPU; a fixed `cuda:N` would put them
all on one card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the CLI checks --device before it waits for torch's import
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class PlacementError(ValueError):
    """A --device this machine or this launch cannot honour; the message says what to pass."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    backend: str  # of torch.distributed between the processes: nccl between GPUs, gloo between CPUs


def check_device_name(name: str) -> str:
    if not _DEVICE.fullmatch(name):
        raise PlacementError(f"--device {name!r}: give {DEVICE_CHOICES}")
    return name


def training_placement(requested: str, *, world_size: int = 1, local_rank: int = 0,
                       cuda_devices: int | None = None) -> Placement:
    """The device of this process for `--device requested`.

    `cuda_devices` is how many GPUs this process sees (None: ask torch). With `world_size` above 1
    (torchrun), `cuda` and `auto` mean the GPU of `local_rank`.
    """
    import torch

    check_device_name(requested)
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "cpu" or (requested == "auto" and cuda_devices == 0):
        return Placement(torch.device("cpu"), "gloo")
    if cuda_devices == 0:
        raise PlacementError(f"--device {requested}: this machine has no CUDA device (or this torch build has no "
                             "CUDA); use --device cpu or auto")
    if requested.startswith("cuda:"):
        index = int(requested.split(":")[1])
        if world_size > 1:
            raise PlacementError(f"--device {requested} under torchrun would put all {world_size} processes on one "
                                 "GPU; pass --device cuda, and each process takes the GPU of its LOCAL_RANK")
        if index >= cuda_devices:
            raise PlacementError(f"--device {requested}: there is no CUDA device {index} here (this machine has "
                                 f"{cuda_devices}); use cuda:0 to cuda:{cuda_devices - 1}")
        return Placement(torch.device("cuda", index), "nccl")
    index = local_rank if world_size > 1 else 0
    if index >= cuda_devices:
        raise PlacementError(f"torchrun started process {local_rank} on this machine, which has {cuda_devices} "
                             f"CUDA device(s): start at most {cuda_devices} per machine (--nproc-per-node), one "
                             "per GPU, or use --device cpu")
    return Placement(torch.device("cuda", index), "nccl")


def make_current(placement: Placement) -> None:
    """The placement's GPU as the current CUDA device: NCCL's communicator, autocast's bf16 check and
    the caching allocator act on the current device, which is otherwise cuda:0 whatever --device says."""
    import torch

    if placement.device.type == "cuda":
        torch.cuda.set_device(placement.device)


def native_bf16_on(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware, where training under bf16 autocast is the faster
    choice: a CPU with AVX-512 BF16 or AMX, a GPU from Ampere on. Older GPUs (V100, T4) emulate it,
    slower than float32."""
    import torch

    from ..retrieval.embedder import native_bf16

    if device.type == "cuda":  # this device's, not the current one's (is_bf16_supported asks that)
        return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
    return native_bf16()


def describe(device: torch.device) -> str:
    """The device as a log line names it: cuda:0 (NVIDIA H100 80GB HBM3), or cpu."""
    import torch

    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"
