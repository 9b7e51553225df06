"""Knowledge externalization benchmark on a published release.

Questions are about held-out entities of the release's synthetic world: their facts exist only in
the knowledge base. The same model answers (a) with no memory, (b) with explicit memory read from
the release's memory bank, retrieved per chunk by the release's index, and (c) with RAG, the same 5
retrieved references prepended as text. Retrieved references overlapping the question by more than
2/3 are dropped (paper §3). Also measured: both with the retrieval cut to its first hit (a
diagnostic of reading one memory against choosing among five), an ablation of the tokens kept per KV
head (memories re-encoded by the same model), and held-out real-text perplexity with and without
memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from memory3.model.layout import chunk_groups, rope_positions
from memory3.model.memory import stack_memories
from memory3.model.model import RotaryEmbedding, Transformer, apply_rope
from memory3.services.release.reader import Release
from memory3.services.retrieval.embedder import Embedder
from memory3.services.storage.object_store import ObjectStore, S3Config
from memory3.services.trainer.corpus import debian_documents
from memory3.services.trainer.evaluate import accuracy, answer_questions
from memory3.services.trainer.overlap import EVAL_MAX_OVERLAP, overlap
from memory3.services.trainer.pipeline import heldout_questions
from memory3.services.trainer.world import World

from .machine import machine_info

ABLATION_TOKENS = (4, 8, 16, 32, "all")


def make_retriever(release: Release, embedder: Embedder, codec, k: int = 5):
    """Top-k reference ids per query text, after the overlap filter.

    Results are kept per query text: the benchmark asks the same questions in every mode and
    ablation, and the index is fixed, so each query is embedded and searched once.
    """
    index = release.index()
    token_cache: dict[str, list[int]] = {}
    found_cache: dict[str, list[str]] = {}

    def tokens_of(rid: str) -> list[int]:
        if rid not in token_cache:
            token_cache[rid] = codec.encode(release.by_id[rid]["text"])
        return token_cache[rid]

    def retrieve(queries: list[str]) -> list[list[str]]:
        new = list(dict.fromkeys(q for q in queries if q not in found_cache))
        if new:
            hits = index.search(embedder.embed(new), k + 5)
            for query, found in zip(new, hits, strict=True):
                q_tokens = codec.encode(query)
                kept = [rid for rid, _ in found if overlap(tokens_of(rid), q_tokens) <= EVAL_MAX_OVERLAP]
                found_cache[query] = kept[:k]
        return [list(found_cache[q]) for q in queries]

    return retrieve


def run_quality_bench(s3: S3Config, release_name: str, *, cache_dir: Path, n_questions: int = 300,
                      ablation_questions: int = 100, perplexity_documents: int = 100, plot: Path | None = None,
                      device: torch.device | str = "cpu") -> dict:
    """Every figure is the model's on `device`; retrieval (embedder and index) stays on the CPU."""
    release = Release.open(ObjectStore(s3), release_name, cache_dir)
    model, codec = release.load_model(device=str(device)), release.text_codec()
    pipeline = release.manifest.provenance.get("pipeline") or {}
    if "world_train" not in pipeline:
        raise ValueError(f"release {release_name!r} records no synthetic world; it was not built by memory3 train")
    world = World(pipeline["seed"], n_train=pipeline["world_train"], n_heldout=pipeline["world_heldout"])
    questions = heldout_questions(world, n_questions, seed=1)
    embedder = Embedder()
    retrieve = make_retriever(release, embedder, codec)
    texts = {r["id"]: r["text"] for r in release.references}

    accs = {}
    for mode in ("none", "memory", "rag"):
        answers = answer_questions(model, codec, questions, mode, retrieve=retrieve, reference_text=texts,
                                   memory_lookup=release.fetch_memories)
        accs[mode] = accuracy(answers, questions)

    # Diagnostic: the same retrieval cut to its first hit, which tells reading one memory apart from
    # picking the right one among the five (the other hits are mostly same-kind neighbours).
    def first_hit(queries: list[str]) -> list[list[str]]:
        return [found[:1] for found in retrieve(queries)]

    top1 = {}
    for mode in ("memory", "rag"):
        answers = answer_questions(model, codec, questions, mode, retrieve=first_hit, reference_text=texts,
                                   memory_lookup=release.fetch_memories)
        top1[mode] = round(accuracy(answers, questions), 4)

    ablation = {}
    subset = questions[:ablation_questions]
    for kept in ABLATION_TOKENS:
        k = model.config.ref_len if kept == "all" else kept
        variant = _with_kept_tokens(model, k)
        answers = answer_questions(variant, codec, subset, "memory", retrieve=retrieve, reference_text=texts)
        ablation[str(kept)] = accuracy(answers, subset)

    # Diagnostic: where the answer position's memory attention goes among the five.
    by_text = {text: rid for rid, text in texts.items()}
    documents = {e.id: e.document for e in world.entities}
    bodies, groups, right = [], [], []
    for q, found in zip(questions, retrieve([q.prompt for q in questions]), strict=True):
        own = by_text.get(documents[q.entity_id])
        body = codec.body(q.prompt)
        if own not in found or len(body) > model.config.chunk_len:
            continue
        bodies.append(body)
        groups.append(release.fetch_memories(found))
        right.append(found.index(own))
    attention = attention_on_the_right_memory(model, codec.reference_prefix(model.config), bodies, groups, right)

    real_start = pipeline.get("real_documents", 0)
    heldout_docs = [t for _, t in itertools.islice(debian_documents(), real_start, real_start + perplexity_documents)]
    ppl = real_text_perplexity(model, codec, heldout_docs, retrieve, release.fetch_memories)

    summary = {
        "acc_no_memory": round(accs["none"], 4), "acc_memory": round(accs["memory"], 4),
        "acc_rag": round(accs["rag"], 4), "n_questions": len(questions),
        "memory_over_rag": round(accs["memory"] / accs["rag"], 4) if accs["rag"] else None,
        "memory_over_no_memory": round(accs["memory"] / accs["none"], 4) if accs["none"] else None,
    }
    result = {
        "benchmark": "quality", "summary": summary, **summary,
        "first_hit_only": {"acc_memory": top1["memory"], "acc_rag": top1["rag"],
                           "note": "retrieval cut to its first hit: one memory / one document"},
        "tokens_per_head_ablation": {"n_questions": len(subset), "acc_memory": ablation},
        "attention_on_the_right_memory": {
            "n_questions": len(bodies), "chance": round(1 / model.config.mems_per_chunk, 4),
            "by_memory_layer": attention,
            "note": "share of the answer position's memory attention on the question's own document, "
                    "per memory layer, averaged over heads"},
        "perplexity": ppl,
        "release": release_name,
        "setup": {"device": str(device), "world_seed": pipeline["seed"],
                  "retrieval": f"{release.manifest.index['embedder']} + FAISS, "
                  f"top 5 after the 2/3 overlap filter", "memories": "from the release's memory bank"},
        "machine": machine_info(),
    }
    if plot is not None:
        plot_quality(result, plot)
    return result


def _with_kept_tokens(model, k: int) -> Transformer:
    """The same weights, shared, not copied (a copy of a large model would not fit beside it on a GPU),
    with another number of tokens kept per KV head: only encoding reads it."""
    with torch.device("meta"):  # no initialisation: the weights come next
        variant = Transformer(dataclasses.replace(model.config, mem_tokens_per_head=k))
    variant.load_state_dict(model.state_dict(), assign=True)
    variant.rope = RotaryEmbedding(variant.config.head_dim, variant.config.rope_theta)  # a plain attribute: not loaded
    return variant.eval()


@torch.no_grad()
def attention_on_the_right_memory(model: Transformer, prefix: list[int], bodies: list[list[int]],
                                  groups: list[list], right: list[int]) -> list[float]:
    """Per memory layer: of the attention that a prompt's last token gives to its memories, the
    share that falls on memory `right[i]` of its group (averaged over heads and prompts).

    Each body is one chunk, reading one group of memories. A model that picks the right memory
    among the group scores near 1; one that reads them all alike scores 1 / group size.
    """
    config, device = model.config, model.output.weight.device
    layers = [layer.attention for layer in model.layers if layer.is_memory_layer]
    shares: list[list[float]] = [[] for _ in layers]
    p = len(prefix)

    def hook(index):
        def capture(attention, args, _output):
            x, cos, sin, mask, memory = args[:5]
            q, k, _ = attention.project(x)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys = torch.cat([memory[0], k], dim=2)  # (1, H_kv, S_mem + T, D)
            keys = keys.repeat_interleave(attention.n_head // attention.n_kv_head, dim=1)  # (1, H, S, D)
            scores = (q[:, :, -1:] @ keys.transpose(-1, -2))[:, :, 0] / attention.head_dim ** 0.5  # (1, H, S)
            scores = scores.masked_fill(~mask[:, :, -1], float("-inf"))
            weights = scores.softmax(-1)[0, :, : memory[0].shape[2]]  # (H, S_mem)
            per_memory = weights.reshape(weights.shape[0], -1, config.mem_tokens_per_head).sum(-1)  # (H, J)
            shares[index].append(float((per_memory[:, capture.right] / per_memory.sum(-1)).mean()))
        return capture

    hooks = [hook(i) for i in range(len(layers))]
    handles = [a.register_forward_hook(h) for a, h in zip(layers, hooks, strict=True)]
    try:
        for body, group, j in zip(bodies, groups, right, strict=True):
            for h in hooks:
                h.right = j
            tokens = torch.tensor([prefix + body], device=device)
            slots = torch.arange(tokens.shape[1], device=device)[None]
            model(tokens, rope_positions(slots, p, config.ref_len),
                  memory=stack_memories([[group]], slots_per_group=config.mem_slots, device=device),
                  token_group=chunk_groups(slots, p, config.chunk_len))
    finally:
        for handle in handles:
            handle.remove()
    return [round(sum(x) / len(x), 4) if x else float("nan") for x in shares]


@torch.no_grad()
def real_text_perplexity(model, codec, documents: list[str], retrieve, memory_lookup) -> dict:
    """Per-token perplexity of held-out real text, without memory and with per-chunk retrieved memory."""
    config, device = model.config, model.output.weight.device
    prefix = codec.reference_prefix(config)
    p = len(prefix)
    totals = {"no_memory": [0.0, 0], "memory": [0.0, 0]}
    for doc in documents:
        body = codec.body(doc)[: config.chunk_len * 4 + 1]
        if len(body) < 16:
            continue
        x, y = torch.tensor([body[:-1]], device=device), torch.tensor([body[1:]], device=device)
        positions = torch.arange(x.shape[1], device=device)[None]
        plain = model(x, positions)[0]
        totals["no_memory"][0] += float(F.cross_entropy(plain, y[0], reduction="sum"))
        totals["no_memory"][1] += y.shape[1]
        chunks = [body[s : s + config.chunk_len] for s in range(0, x.shape[1], config.chunk_len)]
        found = retrieve([codec.decode(c) for c in chunks])
        groups = [memory_lookup(ids) for ids in found]
        tokens = torch.tensor([prefix + body[:-1]], device=device)
        slots = torch.arange(tokens.shape[1], device=device)[None]
        kwargs = {}
        if any(groups):
            kwargs = {"memory": stack_memories([groups], slots_per_group=config.mem_slots, device=device),
                      "token_group": chunk_groups(slots, p, config.chunk_len)}
        logits = model(tokens, rope_positions(slots, p, config.ref_len), **kwargs)[0, p:]
        totals["memory"][0] += float(F.cross_entropy(logits, y[0], reduction="sum"))
        totals["memory"][1] += y.shape[1]
    return {name: round(math.exp(loss / max(1, n)), 3) for name, (loss, n) in totals.items()} | {
        "documents": len(documents), "tokens": totals["memory"][1]}


def plot_quality(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    modes = ["acc_no_memory", "acc_memory", "acc_rag"]
    left.bar(["no memory", "explicit memory", "RAG"], [result[m] for m in modes],
             color=["grey", "tab:blue", "tab:orange"])
    left.set_ylabel("exact match (KB-only facts)")
    left.set_title(f"{result['n_questions']} held-out questions")
    ablation = result["tokens_per_head_ablation"]["acc_memory"]
    right.plot(list(ablation), list(ablation.values()), marker="o")
    right.set_xlabel("tokens kept per KV head")
    right.set_ylabel("exact match with memory")
    right.set_title("sparsity ablation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

