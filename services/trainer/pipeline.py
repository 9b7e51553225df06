"""The whole training run: world -> tokenizer -> knowledge base and index -> three stages -> model.

`run_pipeline` is what `memory3 train` and the TrainerService both call. Everything it writes
lives under one work directory, so a killed run resumes from its last checkpoint with
`--resume` (the default when the directory holds a checkpoint of the same configuration).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from memory3.model.checkpoint import save_checkpoint
from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec

from .corpus import debian_documents
from .data import TrainingData
from .evaluate import Question, accuracy, answer_questions, first_token_accuracy
from .kb import Reference, build_references
from .placement import describe
from .tokenizer_train import train_tokenizer
from .train import Distributed, StageConfig, TrainConfig, Trainer, model_config_for
from .world import World, qa_prompt, qa_text


@dataclass(frozen=True)
class PipelineConfig:
    preset: str = "small"
    seed: int = 0
    vocab_size: int = 2048
    world_train: int = 3000
    world_heldout: int = 300
    real_documents: int = 2000  # Debian documents for language and for the real-text knowledge base
    eval_questions: int = 64  # held-out questions scored at each evaluation during training
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def quick(cls, preset: str = "tiny", seed: int = 0) -> PipelineConfig:
        """Exercises every step in about a minute on 2 CPU cores (learns little)."""
        return cls(preset=preset, seed=seed, vocab_size=512, world_train=200, world_heldout=40, real_documents=200,
                   eval_questions=16, train=TrainConfig(
                       seed=seed, seq_len=128, batch_size=4, eval_every=10, checkpoint_every=10,
                       stage1=StageConfig(steps=20, lr=2e-3, warmup_steps=5),
                       stage2=StageConfig(steps=10, lr=1e-3, warmup_steps=5),
                       stage3=StageConfig(steps=10, lr=3e-4, warmup_steps=0, decay_fraction=0.0)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PipelineResult:
    model_dir: Path
    model: torch.nn.Module
    codec: TextCodec
    world: World
    references: list[Reference]
    history: list[dict]  # the last entries logged (`RECENT_ENTRIES`); all of them are in work_dir/history.json
    seconds: float  # this process's time, and a resumed run's earlier training (`TrainState.elapsed_s`)
    steps: int  # training steps of the run, resumed ones included


def run_pipeline(config: PipelineConfig, work_dir: Path, *, dist: Distributed = Distributed(),
                 device: torch.device | str = "cpu", progress: bool = True, log: Callable[[str], None] | None = None,
                 on_event: Callable[[dict], None] | None = None,
                 check_references: Callable[[list[Reference]], None] | None = None) -> PipelineResult:
    """Train (or resume) the run `config` describes in `work_dir`, on `device`. `check_references`
    sees the knowledge base before training starts, so that what publishing would refuse fails first.

    The device is not part of the run: the initial weights are drawn on the CPU whatever it is, and a
    checkpoint resumes on another device (a run started on a GPU can finish on a CPU). One run at a
    time uses a work directory (its main process holds `.lock` in it)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with _work_dir_lock(work_dir, dist.is_main):
        return _run_pipeline(config, work_dir, dist=dist, device=device, progress=progress, log=log,
                             on_event=on_event, check_references=check_references)


class WorkDirBusy(ValueError):
    """Another run uses the work directory."""


@contextlib.contextmanager
def _work_dir_lock(work_dir: Path, held: bool) -> Iterator[None]:
    """Two runs in one work directory (a second `memory3 train` of a release, a job resubmitted while a
    stopped trainer service's child still trained) removed each other's checkpoints as they saved, and
    both wrote the history. The lock goes with the process that holds it, however it ends."""
    if not held:  # the other processes of a data-parallel run share the main one's directory
        yield
        return
    with open(work_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip()
            raise WorkDirBusy(f"{work_dir} is in use by another run ({f'process {owner}' if owner else 'a process'}): "
                              "wait for it to end, or stop it") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def _run_pipeline(config: PipelineConfig, work_dir: Path, *, dist: Distributed, device: torch.device | str,
                  progress: bool, log: Callable[[str], None] | None, on_event: Callable[[dict], None] | None,
                  check_references: Callable[[list[Reference]], None] | None) -> PipelineResult:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if dist.is_main else None)
    started = time.perf_counter()
    if dist.is_main:  # one rank owns pipeline.json; the others would race it
        _check_same_config(work_dir, config)
    torch.manual_seed(config.seed)

    world = World(config.seed, n_train=config.world_train, n_heldout=config.world_heldout)
    log(f"world: {config.world_train} train and {config.world_heldout} held-out entities (seed {config.seed})")
    real = [text for _, text in itertools.islice(debian_documents(), config.real_documents)]
    if dist.is_main:
        _check_same_text(work_dir, real)
    log(f"real text: {len(real)} documents from Debian packages")

    tokenizer_path = work_dir / "tokenizer.json"
    if dist.is_main and not tokenizer_path.exists():
        texts = itertools.chain(real, (e.document for e in world.entities),
                                (qa_text(f) for e in world.split("train") for f in e.facts))
        part = tokenizer_path.with_suffix(".json.part")  # whole or absent: a kill mid-write failed every resume
        train_tokenizer(texts, config.vocab_size).save(str(part))
        part.replace(tokenizer_path)
    _barrier(dist)
    codec = TextCodec(Tokenizer.from_file(str(tokenizer_path)))
    log(f"tokenizer: {codec.vocab_size} tokens")

    model_config = model_config_for(Memory3Config.from_name(config.preset), codec.vocab_size)
    model = random_model(model_config, seed=config.seed, device=device)
    log(f"model: {config.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on "
        f"{describe(torch.device(device))}")
    prefix = codec.reference_prefix(model_config)

    references = list(build_references(
        itertools.chain(((e.id, e.document) for e in world.entities), (("debian", t) for t in real)),
        codec, model_config.ref_len))
    log(f"knowledge base: {len(references)} references")
    if check_references is not None:
        check_references(references)

    data = TrainingData(world, codec, model_config, seq_len=config.train.seq_len, seed=config.seed, real_text=real,
                        fresh_fraction=config.train.fresh_fraction, answer_weight=config.train.answer_weight,
                        stage2_real_fraction=config.train.stage2_real_fraction)
    evaluate = _training_eval(world, codec, config) if dist.is_main else None
    trainer = Trainer(model, data, config.train, work_dir, prefix=prefix, dist=dist, evaluate=evaluate,
                      progress=progress, on_event=on_event)
    latest = trainer.resume(log)
    if latest is not None:
        log(f"resuming from {latest.name} (step {trainer.state.step} of {config.train.total_steps})")
    trained_before = trainer.state.elapsed_s  # by the processes this run resumes
    trainer.run()

    model_dir = work_dir / "model"
    if dist.is_main:
        save_checkpoint(model, model_dir, codec.tokenizer)
        write_history(trainer.history(), work_dir / "history.json")
        plot_history(trainer.history(), work_dir / "training.png")
        log(f"model written to {model_dir}; curve in {work_dir / 'training.png'}")
    _barrier(dist)
    return PipelineResult(model_dir, model.eval(), codec, world, references, list(trainer.state.recent),
                          time.perf_counter() - started + trained_before, steps=trainer.state.step)


def write_history(history: Iterable[dict], path: Path) -> None:
    """`history` as one JSON list (what `json.dumps` of the list writes), an entry at a time: a
    run's history is read back from its file rather than held whole."""
    with path.open("w") as out:
        out.write("[")
        for i, entry in enumerate(history):
            out.write((", " if i else "") + json.dumps(entry))
        out.write("]")


def heldout_questions(world: World, n: int | None = None, seed: int = 0) -> list[Question]:
    """Questions whose facts exist only in the knowledge base, in a fixed shuffled order."""
    questions = [Question(qa_prompt(f), f.answer, e.id) for e in world.split("heldout") for f in e.facts]
    random.Random(seed).shuffle(questions)
    return questions[:n] if n is not None else questions


def world_retriever(world: World) -> Callable[[list[str]], list[list[str]]]:
    """Retrieval by entity name, for evaluation during training (no embedder in the loop).

    The named entity's document comes first (the release's embedding index returns it first for
    >99% of these questions), then four documents of entities of the same kind, as an embedding
    index mostly returns for a templated question; the quality benchmark uses the real index.
    A question's distractors depend on the question alone: every evaluation of a run, and a resumed
    run's, scores the same task (one stream shared by all made them differ call by call).
    In a world with fewer than five entities of a kind, its questions get all the others of their
    kind and entities of other kinds after them (`pick_distractors`), rather than the world being
    refused: small worlds are for trying the pipeline out, and their questions still read five
    memories (fewer only in a world of fewer than five entities), if easier ones to tell apart.
    """
    by_length = sorted(world.entities, key=lambda e: -len(e.name))
    by_kind: dict[str, list] = {}
    for e in world.entities:
        by_kind.setdefault(e.kind, []).append(e)
    not_of_kind = {kind: [e for e in world.entities if e.kind != kind] for kind in by_kind}

    def retrieve(queries: list[str]) -> list[list[str]]:
        out = []
        for q in queries:
            hit = next((e for e in by_length if e.name in q), None)
            if hit:
                same_kind, other_kinds = [e for e in by_kind[hit.kind] if e is not hit], not_of_kind[hit.kind]
            else:
                same_kind, other_kinds = world.entities, []
            rng = random.Random(f"{world.seed}-{q}")
            out.append(([hit.id] if hit else []) + [e.id for e in pick_distractors(rng, same_kind, other_kinds)])
        return out

    return retrieve


def pick_distractors(rng: random.Random, same_kind: list, other_kinds: list, n: int = 4) -> list:
    """`n` entities drawn from `same_kind`, or, where it holds fewer, all of them and as many of
    `other_kinds` as make `n` (as many as there are, if fewer). With enough of the same kind the
    draw is `rng.sample(same_kind, n)`, so the scores of such worlds do not change."""
    if len(same_kind) >= n:
        return rng.sample(same_kind, n)
    return rng.sample(same_kind, len(same_kind)) + rng.sample(other_kinds, min(n - len(same_kind), len(other_kinds)))


def _training_eval(world: World, codec: TextCodec, config: PipelineConfig):
    questions = heldout_questions(world, config.eval_questions, seed=config.seed)
    texts = {e.id: e.document for e in world.entities}
    retrieve = world_retriever(world)

    def evaluate(model) -> dict:
        out = {}
        for mode in ("none", "memory"):
            answers = answer_questions(model, codec, questions, mode, retrieve=retrieve, reference_text=texts)
            out[f"heldout_acc_{mode}"] = round(accuracy(answers, questions), 4)
            out[f"heldout_first_token_{mode}"] = round(first_token_accuracy(codec, answers, questions), 4)
        return out

    return evaluate


def loss_curves(history: Iterable[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of the training plot: the language-model loss of each stage, then the
    memory attention loss where it was on. `loss` also holds the attention loss, weighted, so the
    language-model loss is read from `lm_loss` where it is recorded. One pass over `history`,
    which may be read from its file as it goes."""
    stages: dict[int, list[tuple[int, float]]] = {}
    attention = []
    for h in history:
        if "loss" not in h:
            continue
        stages.setdefault(h["stage"], []).append((h["step"], h.get("lm_loss", h["loss"])))
        if "attention_loss" in h:
            attention.append((h["step"], h["attention_loss"]))
    curves = {f"stage {stage}": stages[stage] for stage in sorted(stages)}
    if attention:
        curves["memory attention loss"] = attention
    return curves


def plot_history(history: Iterable[dict], path: Path) -> None:
    """The training plot of `history`, read in one pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = []

    def steps():
        for h in history:
            if "eval" in h:
                evals.append(h)
            yield h

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    curves = loss_curves(steps())
    for label, points in curves.items():
        style = {"color": "grey", "alpha": 0.7, "linewidth": 0.6} if label.startswith("memory") else {"linewidth": 0.8}
        ax_loss.plot(*zip(*points, strict=True), label=label, **style)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("language-model loss")
    if curves:
        ax_loss.legend()
    for key in sorted({k for h in evals for k in h["eval"]}):
        points = [(h["step"], h["eval"][key]) for h in evals if key in h["eval"]]
        ax_acc.plot(*zip(*points, strict=True), marker="o", label=key)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("held-out exact match")
    if evals:
        ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# How a run goes, not what it learns: a Job run again on another kind of node may choose another
# autocast, and the same training is still the same release (and resumes the same run).
RUN_SETTINGS = frozenset({"eval_questions", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                          "train.bf16"})


def config_leaves(config: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 0}} -> {"train.seed": 0}: a difference named by its setting."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(config_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class WorkDirTaken(ValueError):
    """The work directory holds a run of another configuration (`differences`: what differs)."""

    def __init__(self, work_dir: Path, differences: str) -> None:
        super().__init__(f"{work_dir} holds a run with another configuration ({differences}); use a new "
                         "--work-dir, or the same settings to resume it")
        self.work_dir, self.differences = work_dir, differences


def _check_same_config(work_dir: Path, config: PipelineConfig) -> None:
    """A work directory belongs to one configuration: resuming another would mix two runs. Run
    settings may differ (a pod rescheduled on a CPU without native bf16 resumes its run)."""
    path = work_dir / "pipeline.json"
    current = json.loads(json.dumps(config.to_dict()))
    if path.exists():
        previous, now = config_leaves(json.loads(path.read_text())), config_leaves(current)
        differ = sorted(k for k in previous.keys() | now.keys()
                        if previous.get(k) != now.get(k) and k not in RUN_SETTINGS)
        if differ:
            raise WorkDirTaken(work_dir, "; ".join(f"{k} {previous.get(k)!r} there, {now.get(k)!r} now"
                                                   for k in differ[:3]))
    else:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(current, indent=2))
        tmp.replace(path)


def _check_same_text(work_dir: Path, real: list[str]) -> None:
    """The real text a run trains on comes from the image's Debian packages: resumed in an image of
    other package versions (an upgrade between two tries of a Job), a run drew other documents at the
    same steps and published a knowledge base other than the one it trained against, without a word."""
    path = work_dir / "real-text.sha256"
    digest = hashlib.sha256("\0".join(real).encode()).hexdigest()
    if not path.exists():
        path.write_text(digest + "\n")
    elif path.read_text().strip() != digest:
        raise WorkDirTaken(work_dir, f"the real text it trains on, {len(real)} documents of this machine's Debian "
                                     "packages, differs from the run's (packages of another version)")


def _barrier(dist: Distributed) -> None:
    if dist.world_size > 1:
        import torch.distributed as torch_dist

        torch_dist.barrier()
