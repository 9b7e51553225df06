"""Implementations of the CLI subcommands; each takes plain values parsed by `main`."""

from __future__ import annotations

import sys
from pathlib import Path

from memory3.model.checkpoint import CONFIG_FILE, save_checkpoint
from memory3.model.config import Memory3Config
from memory3.model.generate import SamplingParams
from memory3.model.init import random_model
from memory3.model.tokenizer import byte_level_tokenizer

DEMO_REFERENCES = (
    "The lighthouse of Varn Island was built in 1887 by the engineer Odile Marchetti. "
    "Its lamp is fuelled by whale oil and can be seen from forty kilometres away.",
    "Kessel Harbour is the only port on Varn Island. Ferries leave for the mainland every Tuesday.",
)
DEMO_QUESTION = "Who built the lighthouse of Varn Island?"


def cmd_init(preset: str, out: Path, seed: int) -> int:
    config = Memory3Config.from_name(preset)
    tokenizer = byte_level_tokenizer()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"preset {preset!r} has vocab_size {config.vocab_size} < {tokenizer.get_vocab_size()}")
    if (out / CONFIG_FILE).exists():
        raise ValueError(f"{out} already holds a checkpoint; choose another --out")
    save_checkpoint(random_model(config, seed=seed), out, tokenizer)
    print(f"wrote a randomly initialised {preset!r} checkpoint to {out}")
    return 0


def cmd_generate(checkpoint: Path, prompt: str, *, references: list[str], max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, seed: int | None, device: str) -> int:
    from memory3.services.local import LocalGenerator

    generator = LocalGenerator(checkpoint, device=device)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    cited: list[int] = []
    finish = None
    for event in generator.stream(prompt, references=references, max_new_tokens=max_new_tokens, sampling=sampling):
        if event.citations:
            cited.extend(i for i in event.citations if i not in cited)
        sys.stdout.write(event.text)
        sys.stdout.flush()
        finish = event.finish_reason or finish
    sys.stdout.write("\n")
    print(f"[finish: {finish}; references used: {cited or 'none'}]", file=sys.stderr)
    return 0


def cmd_demo(home: Path) -> int:
    checkpoint = home / "demo-small"
    if not (checkpoint / CONFIG_FILE).exists():
        cmd_init("small", checkpoint, seed=0)
    print(f"Q: {DEMO_QUESTION}", file=sys.stderr)
    print("(randomly initialised weights: the text is not meaningful until a trained release is served)",
          file=sys.stderr)
    return cmd_generate(checkpoint, DEMO_QUESTION, references=list(DEMO_REFERENCES), max_new_tokens=48,
                        temperature=0.0, top_k=0, top_p=1.0, seed=None, device="cpu")
