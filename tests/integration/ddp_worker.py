"""Run by torchrun in test_training.py: a quick data-parallel training on gloo."""

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from memory3.services.trainer.pipeline import PipelineConfig, run_pipeline
from memory3.services.trainer.train import Distributed

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
out = Path(sys.argv[1])
result = run_pipeline(PipelineConfig.quick(), out / "run", dist=Distributed(rank, world), progress=False)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters())).hexdigest()
(out / f"rank{rank}.txt").write_text(f"{digest} {result.history[-1]['step']}\n")
dist.destroy_process_group()
