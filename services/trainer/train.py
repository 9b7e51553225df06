"""Two-stage training: warm-up without memory, then continual training with memory (paper §3.6).

Continual training is split in two: stage 2 as the paper describes it, and stage 3, the same
with each chunk's group filled up with same-kind neighbours from the batch (`batch_groups`),
because what retrieval returns beside the right reference is mostly documents of its kind.
Optionally (`attention_weight`, not in the paper) a second loss rewards the answer tokens for
attending to the slots of the memory that hold the answer (`memory_attention_loss`).

Gradients in stages 2 and 3 flow through memory encoding: references are encoded inside the training
step by the same weights, and the kept keys/values are differentiable, so the model learns both
to write memories and to read them ("the model learns to write and read explicit memories").
Only the choice of which tokens are kept (a top-k) has no gradient. Hidden states of references
are dropped after the last memory layer, as in the paper.

Data parallelism: run under `torchrun`; each rank builds its own samples (see data.py) and the
gradients are averaged with one all-reduce over a flat buffer per step. (DDP's wrapper is not
used because memory encoding calls the layers directly, outside the wrapper's forward.)

Resume: checkpoints are written atomically every `checkpoint_every` steps (model and optimizer
as safetensors, counters as JSON). The data position is the step counter, so a resumed run sees
exactly the samples an uninterrupted run would have seen, and the distractors are drawn from an
RNG seeded by the step. The run's history is appended to `history.jsonl` in the work directory as
it is logged (`HistoryLog`); a checkpoint records only how many of its entries came before it, so
its size does not grow with the run, and a resumed run keeps those and logs the rest again. The
process holds only the last `RECENT_ENTRIES` of them (`TrainState.recent`), so its memory does
not grow with the run either; `Trainer.history()` reads the whole history back from the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from memory3.model.checkpoint import save_checkpoint, write_safetensors
from memory3.model.config import Memory3Config
from memory3.model.encoder import encode_batch
from memory3.model.layout import chunk_groups, rope_positions
from memory3.model.memory import MemoryKV, gather_memories
from memory3.model.model import Transformer

from .data import MemorySample, TrainingData


@dataclass(frozen=True)
class StageConfig:
    steps: int
    lr: float
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # warmup-stable-decay: linear decay over the last fraction of the stage
    min_lr_ratio: float = 0.05


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 8
    # Stage 1 is kept short: on the small model, 100 warm-up steps already slowed the emergence
    # of memory reading (held-out exact match with the right memory and 4 random ones after 1200
    # single-chunk stage-2 steps: 35.8% without a stage 1, 10% after 100 steps of it). Stage-2
    # learning rates of 2e-3 and 3e-3 did worse than 1e-3.
    stage1: StageConfig = StageConfig(steps=100, lr=1e-3)
    stage2: StageConfig = StageConfig(steps=1150, lr=1e-3)
    # Stage 3 (stage 2 continued, with neighbours): every group that reads a memory is filled up
    # to mems_per_chunk with other samples' references in the batch, same kind first
    # (`batch_groups`), and, with `alternate_single_chunk`, steps alternate between single-chunk
    # and full-length samples. It starts from the end of stage 2, whose rate has decayed, with a
    # fresh AdamW (beta2 0.999) at a constant rate. It is where the model learns to tell the right
    # memory from four same-kind neighbours: with `attention_weight` 3, held-out exact match was
    # 0.09 after 150 of its steps, 0.39 after 500, 0.80 after 850 and 0.88 after 1200; with the
    # language-model loss alone it came abruptly after about 1000 steps in one run and not within
    # 1200 in five others (README, Training).
    stage3: StageConfig = StageConfig(steps=1200, lr=3e-4, warmup_steps=0, decay_fraction=0.0)
    # Stage-2 data (see data.py): the share of questions about fresh entities, which only memory
    # can answer, and the loss weight of answer tokens relative to the question template.
    fresh_fraction: float = 1.0
    answer_weight: float = 5.0
    # The share of stage-2 and stage-3 samples that are real text reading no memory, which keeps
    # the language of stage 1 (see data.py).
    stage2_real_fraction: float = 0.2
    # The first part of stage 2 trains on single-chunk samples that read only their own reference
    # (see data.py), seq_len / chunk_len times as many per step, so a step holds as many tokens.
    own_reference_fraction: float = 0.8
    distractors: bool = True
    # Weight of `memory_attention_loss` beside the language-model loss. It acts where a group
    # holds more than one memory, so mostly in stage 3's filled groups (README, Training).
    attention_weight: float = 3.0
    alternate_single_chunk: bool = True
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 350
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    # Autocast to bfloat16. `memory3 train` turns it on where the device computes bf16 natively
    # (`placement.native_bf16_on`): a CPU with AVX-512 BF16 or AMX, where it makes a step about 0.7x
    # as long, and a GPU from Ampere on.
    bf16: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.own_reference_fraction <= 1.0:
            raise ValueError(f"own_reference_fraction={self.own_reference_fraction} must lie in [0, 1]")
        if not 0.0 <= self.stage2_real_fraction <= 1.0:  # checked here too: before minutes of data preparation
            raise ValueError(f"stage2_real_fraction={self.stage2_real_fraction} must lie in [0, 1]")

    @property
    def total_steps(self) -> int:
        return self.stage1.steps + self.stage2.steps + self.stage3.steps

    @property
    def own_reference_steps(self) -> int:
        """Stage-2 steps on single-chunk samples, before those that read previous chunks too."""
        return int(self.own_reference_fraction * self.stage2.steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(stage: StageConfig, step_in_stage: int) -> float:
    """Warmup-stable-decay (MiniCPM): linear warmup, constant, linear decay over the last part."""
    if step_in_stage < stage.warmup_steps:
        return stage.lr * (step_in_stage + 1) / stage.warmup_steps
    decay_start = stage.steps * (1 - stage.decay_fraction)
    if step_in_stage < decay_start:
        return stage.lr
    frac = (step_in_stage - decay_start) / max(1.0, stage.steps - decay_start)
    return stage.lr * max(stage.min_lr_ratio, 1.0 - frac)


HISTORY_FILE = "history.jsonl"
# History entries a run holds in memory: an entry a step (about 1 KB as a dict) for a million
# steps is a gigabyte; the whole history is in HISTORY_FILE.
RECENT_ENTRIES = 100


def _recent() -> deque[dict]:
    return deque(maxlen=RECENT_ENTRIES)


@dataclass
class TrainState:
    step: int = 0
    entries: int = 0  # history entries logged (one per step, one per evaluation), resumed ones included
    recent: deque[dict] = field(default_factory=_recent)  # the last of them
    elapsed_s: float = 0.0  # training time up to `step`, a resumed run's added to its checkpoint's


class HistoryLog:
    """A run's history as JSON lines, appended by the main process as entries are logged.

    Kept out of checkpoints: a million steps of history is about 140 MB, which every checkpoint
    would rewrite. A checkpoint records how many entries came before it instead, and `sync` makes
    those entries durable before it is written, so a resumed run reads back exactly the entries
    logged before its checkpoint (`resume`). Those a killed run logged after it are dropped when
    the resumed run first writes (`_start`), and logged again as it repeats those steps.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None
        self._kept = 0  # entries of the file that the next `_start` keeps: those written so far
        self._given: list[dict] | None = None  # or the entries it writes instead (`resume_from`)

    def resume(self, entries: int) -> deque[dict]:
        """Keep the first `entries` entries (a checkpoint's); returns the last RECENT_ENTRIES of them."""
        recent, count = _recent(), 0
        if self.path.exists():
            with self.path.open() as lines:
                for line in itertools.islice(lines, entries):
                    recent.append(json.loads(line))
                    count += 1
        if count < entries:
            raise ValueError(f"{self.path} holds {count} history entries, fewer than the {entries} logged "
                             "before the checkpoint: restore the file, or start a new run in a new --work-dir")
        self.close()
        self._kept, self._given = entries, None
        return recent

    def resume_from(self, history: list[dict]) -> None:
        """Keep `history` (a checkpoint that held it) instead of what the file holds."""
        self.close()
        self._kept, self._given = len(history), history

    def append(self, entry: dict) -> None:
        if self._file is None:
            self._start()
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        self._kept += 1

    def sync(self) -> None:
        """Make the entries logged durable in the file, for a checkpoint that records their number."""
        if self._file is None:
            self._start()
        os.fsync(self._file.fileno())

    def entries(self) -> Iterator[dict]:
        """The entries kept and logged, read back from the file one at a time."""
        if self._given is not None:
            self._rewrite()
        if not self.path.exists():
            return
        with self.path.open() as lines:
            for line in itertools.islice(lines, self._kept):
                yield json.loads(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _start(self) -> None:
        self._rewrite()
        self._file = self.path.open("a")

    def _rewrite(self) -> None:
        """Replace the file with the entries kept (atomically: a process reading it sees the old or
        the new file, which agree on the entries before a checkpoint), copied a line at a time."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w") as out:
            if self._given is not None:
                out.writelines(json.dumps(entry) + "\n" for entry in self._given)
            elif self._kept and self.path.exists():
                with self.path.open() as lines:
                    out.writelines(line if line.endswith("\n") else line + "\n"
                                   for line in itertools.islice(lines, self._kept))
        tmp.replace(self.path)
        self._given = None


def elapsed_logged(history: Sequence[dict]) -> float:
    """The last `elapsed_s` a history logged: the elapsed time of a checkpoint written before
    checkpoints recorded their own."""
    return next((h["elapsed_s"] for h in reversed(history) if "elapsed_s" in h), 0.0)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Trainer:
    def __init__(self, model: Transformer, data: TrainingData, config: TrainConfig, out_dir: Path, *,
                 prefix: list[int], dist: Distributed = Distributed(),
                 evaluate: Callable[[Transformer], dict] | None = None, progress: bool = True,
                 on_event: Callable[[dict], None] | None = None) -> None:
        self.model, self.data, self.config, self.out_dir = model, data, config, out_dir
        self.prefix, self.dist, self.evaluate, self.progress = prefix, dist, evaluate, progress
        self.on_event = on_event if dist.is_main else None
        self.optimizer = self._new_optimizer(betas=(0.9, 0.95))
        self.state = TrainState()
        self.history_log = HistoryLog(out_dir / HISTORY_FILE)
        self.device = model.output.weight.device
        self.autocast = config.bf16

    def _new_optimizer(self, *, betas: tuple[float, float]) -> torch.optim.AdamW:
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.config.stage1.lr, betas=betas, eps=1e-8, fused=True,
        )

    # ---- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """The checkpoint directories, oldest first: by step number, not by name, since "step-10000000"
        sorts before "step-9999750" (names are padded to 7 digits, and stages may run 10^8 steps)."""
        found = self.checkpoint_dir.glob("step-*") if self.checkpoint_dir.exists() else ()
        steps = [(int(p.name[5:]), p) for p in found if p.name[5:].isdigit()]
        return [p for _, p in sorted(steps)]

    def resume(self, log: Callable[[str], None]) -> Path | None:
        """Load the newest checkpoint that reads back, and return it (None: there is none). One damaged by
        a crash of the machine (a file cut short) is passed over for the one before it, said in `log`:
        every restart failed on it. If none reads, the newest one's error is raised."""
        failed: Exception | None = None
        for path in reversed([p for p in self.checkpoints() if (p / "state.json").exists()]):
            try:
                self.load(path)
                return path
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors and JSON have errors of their own
                log(f"checkpoint {path.name} cannot be read ({type(e).__name__}: {e}); trying the one before it")
                failed = failed or e
        if failed is not None:
            raise failed
        return None

    def latest_checkpoint(self) -> Path | None:
        found = [p for p in self.checkpoints() if (p / "state.json").exists()]
        return found[-1] if found else None

    def save(self) -> Path:
        """Write to a temporary directory, then rename: a checkpoint is complete or absent."""
        target = self.checkpoint_dir / f"step-{self.state.step:07d}"
        tmp = self.checkpoint_dir / f".tmp-step-{self.state.step:07d}-{os.getpid()}"
        # Also those of processes killed while saving (one process saves): a model each, never read.
        for unfinished in self.checkpoint_dir.glob(".tmp-step-*"):
            shutil.rmtree(unfinished, ignore_errors=True)
        self.history_log.sync()
        save_checkpoint(self.model, tmp)
        tensors, meta = optimizer_to_flat(self.optimizer)
        write_safetensors(tmp / "optimizer.safetensors", tensors.items())
        (tmp / "state.json").write_text(json.dumps({
            "step": self.state.step, "history_entries": self.state.entries, "elapsed_s": self.state.elapsed_s,
            "optimizer": meta, "train_config": self.config.to_dict(), "world_size": self.dist.world_size,
        }))
        # On the disk before the rename is: a machine that crashed after it held a checkpoint of files cut
        # short, which every restart then failed to load.
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        _fsync(self.checkpoint_dir)
        for old in self.checkpoints()[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        saved = state.get("world_size")  # None: a checkpoint from before it was recorded
        if saved is not None and saved != self.dist.world_size:
            # The data position is the step times the processes: resumed by another number, the
            # run would train again on samples it has seen, or skip some, without a word.
            raise CheckpointMismatch(f"{path} is a checkpoint of a run of {saved} processes; resume it with {saved} "
                             f"(this one has {self.dist.world_size}), or start a new run in a new --work-dir")
        weights = load_file(str(path / "model.safetensors"), device=str(self.device))
        self.model.load_state_dict(weights)
        optimizer_from_flat(self.optimizer, load_file(str(path / "optimizer.safetensors"), device=str(self.device)),
                            state["optimizer"])
        if "history" in state:  # a checkpoint written before the history moved to its own file holds it whole
            history = state["history"]
            self.history_log.resume_from(history)
            self.state = TrainState(step=state["step"], entries=len(history), recent=_recent(),
                                    elapsed_s=state.get("elapsed_s", elapsed_logged(history)))
            self.state.recent.extend(history)
        else:
            recent = self.history_log.resume(state["history_entries"])
            self.state = TrainState(step=state["step"], entries=state["history_entries"], recent=recent,
                                    elapsed_s=state.get("elapsed_s", elapsed_logged(recent)))

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainState:
        from tqdm import tqdm

        config = self.config
        bar = tqdm(total=config.total_steps, initial=self.state.step, desc="training", unit="step",
                   disable=not (self.progress and self.dist.is_main), file=sys.stderr, dynamic_ncols=True)
        started = time.perf_counter() - self.state.elapsed_s  # the clock carries on across a resume
        self.model.train()
        while self.state.step < config.total_steps:
            step = self.state.step
            stage_no, stage, in_stage = self.stage_of(step)
            single_chunk, distract = self.sample_kind(stage_no, in_stage)
            if stage_no == 3 and in_stage == 0:
                self.optimizer = self._new_optimizer(betas=(0.9, 0.999))
            lr = lr_at(stage, in_stage)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            n = config.batch_size * (config.seq_len // self.data.config.chunk_len if single_chunk else 1)
            indices = [(step * self.dist.world_size + self.dist.rank) * n + i for i in range(n)]
            parts: dict[str, float] = {}
            if stage_no == 1:
                loss = self.stage1_loss(indices)
            else:
                # Seeded by (seed, step, rank): a resumed run draws the distractors it would have.
                rng = random.Random(f"{config.seed}-distractors-{step}-{self.dist.rank}") if distract else None
                loss = self.stage2_loss(indices, single_chunk=single_chunk, distractor_rng=rng, parts=parts)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.all_reduce_gradients()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            self.state.step += 1
            self.state.elapsed_s = time.perf_counter() - started
            loss_value = self.reduce_scalar(loss.detach())
            split = self.loss_parts(parts) if stage_no > 1 else {}  # the stage is every rank's: safe to reduce
            self._record({"step": self.state.step, "stage": stage_no, "loss": round(loss_value, 5), **split,
                          "lr": lr, "grad_norm": round(float(grad_norm), 4),
                          "elapsed_s": round(self.state.elapsed_s, 2)})
            bar.update(1)
            shown = {"lm": f"{split['lm_loss']:.3f}", "attn": f"{split['attention_loss']:.3f}"} if split else {}
            bar.set_postfix(stage=stage_no, loss=f"{loss_value:.3f}", **shown, lr=f"{lr:.1e}")
            done = self.state.step == config.total_steps
            if self.evaluate is not None and (self.state.step % config.eval_every == 0 or done):
                self.run_eval()
            if self.dist.is_main and (self.state.step % config.checkpoint_every == 0 or done):
                self.state.elapsed_s = time.perf_counter() - started  # evaluation time included
                self.save()
            self.barrier()
        bar.close()
        self.history_log.close()
        return self.state

    def stage_of(self, step: int):
        config = self.config
        if step < config.stage1.steps:
            return 1, config.stage1, step
        if step < config.stage1.steps + config.stage2.steps:
            return 2, config.stage2, step - config.stage1.steps
        return 3, config.stage3, step - config.stage1.steps - config.stage2.steps

    def sample_kind(self, stage_no: int, in_stage: int) -> tuple[bool, bool]:
        """(single-chunk samples, in-batch distractors) for a step of the given stage."""
        config = self.config
        if stage_no == 1:
            return False, False
        if stage_no == 2:
            return in_stage < config.own_reference_steps, False
        return config.alternate_single_chunk and in_stage % 2 == 0, config.distractors

    def run_eval(self) -> None:
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.model) if self.dist.is_main else {}
        self.model.train()
        if self.dist.is_main:
            self._record({"step": self.state.step, "eval": metrics})

    def history(self) -> Iterator[dict]:
        """The run's whole history, resumed entries included, read back from its file (the main
        process's: the others log none)."""
        return self.history_log.entries()

    def _record(self, entry: dict) -> None:
        if self.dist.is_main:
            self.history_log.append(entry)
        self.state.entries += 1
        self.state.recent.append(entry)
        if self.on_event is not None:
            self.on_event({**entry, "total_steps": self.config.total_steps})

    # ---- losses -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _autocast(self):
        """bf16 autocast when enabled; on a CPU then also the math attention kernel: at these
        lengths (69 to 421 keys) PyTorch's CPU flash kernel with a mask made a bf16 step 5-10% slower."""
        math = self.autocast and self.device.type == "cpu"
        kernel = sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), kernel:
            yield

    def stage1_loss(self, indices: list[int]) -> Tensor:
        batch = torch.tensor([self.data.stage1(i) for i in indices], device=self.device)  # (B, T+1)
        x, y = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(x.shape[1], device=self.device)[None].expand(x.shape[0], -1)
        with self._autocast():
            logits = self.model(x, positions)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def stage2_loss(self, indices: list[int], *, single_chunk: bool = False,
                    distractor_rng: random.Random | None = None, parts: dict[str, float] | None = None) -> Tensor:
        samples = [self.data.stage2(i, single_chunk=single_chunk) for i in indices]
        groups = batch_groups(samples, self.model.config.mems_per_chunk, distractor_rng)
        return memory_loss(self.model, samples, self.prefix, autocast=self._autocast(), groups=groups,
                           attention_weight=self.config.attention_weight, parts=parts)

    # ---- distributed ------------------------------------------------------------------------
    def all_reduce_gradients(self) -> None:
        if self.dist.world_size == 1:
            return
        import torch.distributed as torch_dist

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch_dist.all_reduce(flat)
        flat /= self.dist.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def loss_parts(self, parts: dict[str, float]) -> dict[str, float]:
        """lm_loss and attention_loss of a step where some rank had the attention loss on, else {}.
        With it on, `loss` is lm_loss + attention_weight * attention_loss. One all-reduce on every
        rank, whether its own batch had the attention loss or not (a collective that only some ranks
        call would hang the others); attention_loss is the mean over the ranks that had it."""
        local = torch.tensor([parts["lm"], parts.get("attention", 0.0), float("attention" in parts)])
        if self.dist.world_size > 1:
            import torch.distributed as torch_dist

            local = local.to(self.device)
            torch_dist.all_reduce(local)
        lm, attention, ranks = local.tolist()
        if ranks == 0:
            return {}
        return {"lm_loss": round(lm / self.dist.world_size, 5), "attention_loss": round(attention / ranks, 5)}

    def reduce_scalar(self, value: Tensor) -> float:
        if self.dist.world_size == 1:
            return float(value)
        import torch.distributed as torch_dist

        value = value.clone()
        torch_dist.all_reduce(value)
        return float(value) / self.dist.world_size

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            import torch.distributed as torch_dist

            torch_dist.barrier()


def batch_groups(samples: list[MemorySample], mems_per_chunk: int,
                 distractor_rng: random.Random | None = None) -> list[list[list[int]]]:
    """Per sample and chunk: the memories it reads, as indices into the batch's references.

    The batch's references are the samples' `references` concatenated in order. Without an RNG a
    chunk reads its own group. With one, every group that reads a memory is filled up to
    `mems_per_chunk` with references of *other* samples of the batch, those describing an entity
    of the group's first reference's kind first: serving retrieves 5 references for a question,
    mostly documents of the same kind, and a model trained only on its own references never has
    to tell the right one from its neighbours (its attention stayed at chance among them). The
    distractors cost no encoding: they are encoded for their own samples anyway. They describe
    other entities, so the overlap filter, which data.py applies to a sample's own references,
    has nothing to exclude.
    """
    bases = list(itertools.accumulate((len(s.references) for s in samples), initial=0))
    own = [[[bases[b] + i for i in group] for group in s.groups] for b, s in enumerate(samples)]
    if distractor_rng is None:
        return own
    for s in samples:
        if len(s.reference_ids) != len(s.references) or len(s.reference_kinds) != len(s.references):
            raise ValueError("distractors need every sample's reference_ids and reference_kinds")
    owner = [b for b, s in enumerate(samples) for _ in s.references]
    ids = [i for s in samples for i in s.reference_ids]
    kinds = [k for s in samples for k in s.reference_kinds]
    for b, rows in enumerate(own):
        for row in rows:
            if not row or len(row) >= mems_per_chunk:
                continue
            taken = {ids[j] for j in row}
            pool = [j for j in range(len(ids)) if owner[j] != b]
            distractor_rng.shuffle(pool)
            pool.sort(key=lambda j: kinds[j] != kinds[row[0]])  # stable: same kind first, shuffled within
            for j in pool:
                if len(row) == mems_per_chunk:
                    break
                if ids[j] not in taken:
                    taken.add(ids[j])
                    row.append(j)
    return own


def memory_loss(model: Transformer, samples: list[MemorySample], prefix: list[int], *, autocast=None,
                groups: list[list[list[int]]] | None = None, attention_weight: float = 0.0,
                parts: dict[str, float] | None = None) -> Tensor:
    """Next-token loss on the body tokens with each chunk reading a group of memories.

    `groups` (from `batch_groups`) index the batch's concatenated references; by default each
    chunk reads its own group. The mean over targets is weighted by the samples' `weights` when
    they carry them. With `attention_weight` > 0, `attention_weight` times
    `memory_attention_loss` at the answer tokens is added; `parts`, when given, receives both
    terms as floats.
    """
    device = model.output.weight.device
    config = model.config
    refs = [r for s in samples for r in s.references]
    index_rows = groups if groups is not None else batch_groups(samples, config.mems_per_chunk)
    n_groups = max(len(r) for r in index_rows)
    index = torch.full((len(samples), n_groups, config.mems_per_chunk), -1, dtype=torch.long)
    for b, row in enumerate(index_rows):
        for g, group in enumerate(row):
            index[b, g, : len(group)] = torch.tensor(group, dtype=torch.long)
    index = index.to(device)  # (B, G, M)
    batch = torch.tensor([s.tokens for s in samples], device=device)  # (B, T+1)
    x, y = batch[:, :-1], batch[:, 1:]
    p = len(prefix)
    tokens = torch.cat([torch.tensor(prefix, device=device)[None].expand(len(samples), -1), x], dim=1)
    slots = torch.arange(tokens.shape[1], device=device)[None].expand(len(samples), -1)
    with autocast if autocast is not None else contextlib.nullcontext():
        if refs:
            keys, values, positions = encode_batch(model, refs, prefix)
            memory = gather_memories(keys, values, positions, index)
            token_group = chunk_groups(slots, p, config.chunk_len)
        else:
            memory = token_group = None
        targets = answer_targets(samples, index_rows, config.chunk_len) if attention_weight > 0 and refs else None
        with capture_queries(model, supervised_layers(config) if targets else []) as queries:
            logits = model(tokens, rope_positions(slots, p, config.ref_len), memory=memory, token_group=token_group)
        attention = None
        if targets:
            slots_held = answer_slots(refs, positions, index, targets, y)
            attention = memory_attention_loss(queries, memory, targets, slots_held, p, config)
    logits = logits[:, p:].float()
    if all(s.weights is None for s in samples):
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    else:
        weights = torch.tensor([s.weights if s.weights is not None else [1.0] * y.shape[1] for s in samples],
                               dtype=logits.dtype, device=device).reshape(-1)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        loss = (losses * weights).sum() / weights.sum()
    if parts is not None:
        parts["lm"] = float(loss.detach())
        if attention is not None:
            parts["attention"] = float(attention.detach())
    return loss if attention is None else loss + attention_weight * attention.float()


def supervised_layers(config: Memory3Config) -> list[int]:
    """Positions in `config.memory_layers` whose memory attention is supervised: all but a memory
    layer 0. At layer 0 a query is its own token's embedding and a kept key is its own token's,
    so neither can carry which entity a question or a reference is about."""
    return [i for i, layer in enumerate(config.memory_layers) if layer > 0]


@dataclass(frozen=True)
class AnswerTargets:
    """Answer tokens whose memory is in their chunk's group beside others, as parallel (N,)
    index tensors: sample, body position of the query that predicts the token, its chunk, and the
    answer memory's place in that chunk's group."""

    sample: Tensor
    position: Tensor
    group: Tensor
    member: Tensor

    def __len__(self) -> int:
        return int(self.sample.numel())


def answer_targets(samples: list[MemorySample], groups: list[list[list[int]]], chunk_len: int) -> AnswerTargets | None:
    bases = list(itertools.accumulate((len(s.references) for s in samples), initial=0))
    rows: list[tuple[int, int, int, int]] = []
    for b, s in enumerate(samples):
        for t, r in enumerate(s.answer_references or []):
            if r < 0:
                continue
            g = t // chunk_len
            group = groups[b][g] if g < len(groups[b]) else []
            if len(group) > 1 and bases[b] + r in group:  # a memory alone takes all the attention
                rows.append((b, t, g, group.index(bases[b] + r)))
    if not rows:
        return None
    return AnswerTargets(*(torch.tensor(col, dtype=torch.long) for col in zip(*rows, strict=True)))


@contextlib.contextmanager
def capture_queries(model: Transformer, memory_indices: list[int]):
    """Collect the post-RoPE queries, (B, H, T, D), of the given memory layers during one forward."""
    layers = [layer for layer in model.layers if layer.is_memory_layer]
    queries: dict[int, Tensor] = {}
    handles = [layers[i].attention.query_probe.register_forward_hook(
        lambda _m, _a, out, i=i: queries.__setitem__(i, out)) for i in memory_indices]
    try:
        yield queries
    finally:
        for handle in handles:
            handle.remove()


def answer_slots(refs: list[list[int]], positions: Tensor, index: Tensor, targets: AnswerTargets,
                 next_tokens: Tensor) -> Tensor:
    """Which kept slots of each target's answer memory hold the very token the target predicts.

    A value is read by copying: the query attends to the key of the value's token in the memory and
    takes its value vector. So that is the slot the attention loss rewards.

    Args:
        refs: the batch's reference token lists, as encoded.
        positions: (N_refs, L_mem, H_kv, k) token index of each kept slot inside its reference, -1 padding.
        index: (B, G, M) reference index per sample, group and member.
        next_tokens: (B, T) the token each body position predicts.
    Returns:
        (N, L_mem, H_kv, k) bool, one row per target.
    """
    device = positions.device
    ref_tokens = torch.full((len(refs), max(len(r) for r in refs)), -1, dtype=torch.long, device=device)
    for i, r in enumerate(refs):
        ref_tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    b, t, g, j = (x.to(device) for x in (targets.sample, targets.position, targets.group, targets.member))
    ref = index[b, g, j]  # (N,)
    pos = positions[ref]  # (N, L_mem, H_kv, k)
    held = ref_tokens[ref[:, None, None, None], pos.clamp(min=0)]  # (N, L_mem, H_kv, k)
    return (held == next_tokens[b, t][:, None, None, None]) & (pos >= 0)


def memory_attention_loss(queries: dict[int, Tensor], memory: MemoryKV, targets: AnswerTargets, slots_held: Tensor,
                          prefix_len: int, config: Memory3Config) -> Tensor:
    """-log of the share of memory attention on the answer's own slots, at the answer tokens.

    The language-model loss alone teaches the small model to copy a value out of a memory, but its
    attention stays at chance among five memories of the same kind for over a thousand steps, so it
    answers with a blend of them. This term gives the query and key projections that signal
    directly. It rewards the slots of the answer's memory that hold the token being predicted
    (`answer_slots`), not the memory as a whole: rewarded for the whole memory, `small` learned to
    find the right entity's memory without reading the value out of it (README, Training). The
    share is taken over the chunk's memory slots only (not the context) and averaged, before the
    log, over the query heads whose kept slots hold that token, so other heads may attend
    elsewhere; it is averaged over `supervised_layers` and answer tokens. A target whose token no
    head kept adds nothing at that layer.
    """
    m, k = config.mems_per_chunk, config.mem_tokens_per_head
    device = memory.k.device
    b, t, g, j = (x.to(device) for x in (targets.sample, targets.position, targets.group, targets.member))
    bsz = memory.valid.shape[0]
    valid = memory.valid.view(bsz, -1, m * k)[b, g]  # (N, M*k)
    per_query_head = config.n_head // config.n_kv_head
    losses = []
    for i, q_all in sorted(queries.items()):
        q = q_all[b, :, prefix_len + t].float()  # (N, H, D)
        keys = memory.k[i].view(bsz, config.n_kv_head, -1, m * k, config.head_dim)[b, :, g].float()  # (N, H_kv, M*k, D)
        keys = keys.repeat_interleave(per_query_head, dim=1)  # (N, H, M*k, D)
        scores = (keys @ q[..., None])[..., 0] / math.sqrt(config.head_dim)  # (N, H, M*k)
        log_p = scores.masked_fill(~valid[:, None], float("-inf")).log_softmax(-1)
        own = log_p.view(*log_p.shape[:2], m, k)[torch.arange(len(j), device=device), :, j]  # (N, H, k)
        held = slots_held[:, i].repeat_interleave(per_query_head, dim=1)  # (N, H, k)
        log_share = torch.logsumexp(own.masked_fill(~held, float("-inf")), dim=-1)  # (N, H)
        heads = held.any(dim=-1)  # (N, H): heads whose kept slots hold the token
        n_heads = heads.sum(dim=-1)  # (N,)
        read = n_heads > 0
        if read.any():
            log_mean = torch.logsumexp(log_share.masked_fill(~heads, float("-inf")), dim=-1)[read] \
                - n_heads[read].float().log()  # log of the mean share over those heads
            losses.append(-log_mean.mean())
    return torch.stack(losses).mean() if losses else memory.k.new_zeros((), dtype=torch.float32)


class CheckpointMismatch(ValueError):
    """A checkpoint of another run: resuming it would be wrong, not merely damaged."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """AdamW state as named tensors (safetensors) + JSON-able scalars: checkpoints never pickle.

    The tensors are the optimizer's own, on its device: `write_safetensors` copies them to the host one
    at a time."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = float(value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        for name, value in values.items():
            state.setdefault(int(pid), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def model_config_for(preset: Memory3Config, vocab_size: int) -> Memory3Config:
    """The preset with its vocabulary sized to the tokenizer (rounded up to a multiple of 64)."""
    return dataclasses.replace(preset, vocab_size=int(math.ceil(vocab_size / 64) * 64))
