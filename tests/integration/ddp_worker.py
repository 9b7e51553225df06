"""Run by torchrun in test_training.py (on the CPUs, gloo) and test_gpu.py (`cuda` as its second argument:
one GPU per process, NCCL): a quick data-parallel training, set up and closed as `memory3 train` does it."""

import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from memory3.services.cli.commands import close_distributed, init_distributed, torchrun_ranks
from memory3.services.trainer.pipeline import PipelineConfig, run_pipeline
from memory3.services.trainer.placement import training_placement

world_size, local_rank = torchrun_ranks()
placement = training_placement(sys.argv[2] if len(sys.argv) > 2 else "cpu", world_size=world_size,
                               local_rank=local_rank)
distributed = init_distributed(placement, world_size)
assert (distributed.world_size, dist.get_backend()) == (2, placement.backend)
torch.set_num_threads(1)
out = Path(sys.argv[1])
result = run_pipeline(PipelineConfig.quick(), out / "run", dist=distributed, device=placement.device, progress=False)
digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in result.model.parameters())).hexdigest()
(out / f"rank{distributed.rank}.txt").write_text(f"{digest} {result.history[-1]['step']}\n")
close_distributed(distributed)
assert not dist.is_initialized()
if distributed.is_main:  # torchrun gave each process one thread; the one that publishes takes them back
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
