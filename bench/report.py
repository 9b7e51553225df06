"""Benchmark output: JSON files, and the README table rebuilt from them."""

from __future__ import annotations

import json
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def render_table(results_dir: Path) -> str:
    rows = ["| benchmark | figure | value | target |", "|---|---|---|---|"]
    decode = _load(results_dir / "decode.json")
    if decode:
        p = decode["protocol"]
        where = f"`{p['preset']}`, batch {p['batch']}, {p['prompt_tokens']} in / {p['new_tokens']} out"
        rows += [
            f"| decode ({where}) | no memory | {decode['no_memory_tok_s']:.1f} tok/s | |",
            f"| | explicit memory | {decode['memory_tok_s']:.1f} tok/s | |",
            f"| | RAG (5 refs prefilled) | {decode['rag_tok_s']:.1f} tok/s | |",
            f"| | memory / no memory | {decode['memory_over_no_memory']:.3f} | >= 0.95 |",
            f"| | memory / RAG | {decode['memory_over_rag']:.3f} | > 1 |",
        ]
    storage = _load(results_dir / "storage.json")
    if storage:
        errors = storage.get("reconstruction", {})
        for codec, size in storage["paper_config_bytes_per_memory"].items():
            err = errors.get(codec, {}).get("rel_mse")
            err_txt = f", rel. MSE {err:.2e}" if err is not None else ""
            rows.append(f"| storage (`paper-2.4b` layout) | {codec} | {size:,} B/memory{err_txt} | |")
        rows.append(f"| | best codec | {storage['best_codec']} ({storage['best_bytes_per_memory']:,} B) "
                    f"| <= 39,424 B |")
    serving = _load(results_dir / "serving.json")
    if serving:
        p = serving["protocol"]
        where = f"`{p['preset']}`, {p['prompt_tokens']} in / {p['new_tokens']} out, services as processes"
        lat = serving["latency_by_concurrency"]
        rows += [
            f"| serving ({where}) | fetch 5 memories: Redis hit / S3 miss (p50) | "
            f"{serving['fetch5_redis_hit_p50_ms']:.1f} / {serving['fetch5_s3_miss_p50_ms']:.1f} ms | |",
            f"| | retrieval of one chunk (p50) | {serving['retrieval_p50_ms']:.1f} ms | |",
            *(f"| | {c} streams: TTFT p50 / ITL p50 / tok/s | {v['ttft']['p50_ms']:.0f} ms / "
              f"{v['itl']['p50_ms']:.1f} ms / {v['tok_s']:.0f} | |" for c, v in lat.items()),
            f"| | retrieval on / off (tok/s) | {serving['retrieval_on_over_off']:.3f}"
            + (" (90%: {:.3f}–{:.3f})".format(*serving["retrieval_on_over_off_ci90"])
               if "retrieval_on_over_off_ci90" in serving else "") + " | >= 0.95 |",
        ]
        if "retrieval_on_over_off_loaded" in serving:
            rows += [
                f"| | retrieval on / off with the same retrieval and fetch load | "
                f"{serving['retrieval_on_over_off_loaded']:.3f} | |",
                f"| | off with that load / off (sharing the machine) | {serving['off_loaded_over_off']:.3f} | |",
            ]
        if "decoder_on_over_off" in serving:
            rows += [
                f"| | at the decoder: tokens generated per s, on / off | {serving['decoder_on_over_off']:.3f} | |",
                f"| | at the decoder: CPU per token, on / off | "
                f"{serving['decoder_cpu_per_token_on_over_off']:.3f} | |",
            ]
        extra = serving.get("decoder_extra_cpu_us_per_token")
        if extra:
            rows.append(f"| | at the decoder: extra CPU per token with retrieval on, scheduler thread / other threads "
                        f"(of {serving['decoder_cpu_us_per_token_off']:.0f} µs off) | "
                        f"{extra['scheduler']:.0f} / {extra['other_threads']:.0f} µs | |")
        if "engine_on_over_off" in serving:
            rows.append(f"| | engine alone, retrieval latency simulated: on / off | "
                        f"{serving['engine_on_over_off']:.3f} | |")
        costs = serving.get("engine_alone", {}).get("step_costs")
        if costs:
            rows += [
                f"| | engine passes back to back, memory / plain: decode step of {costs['rows']} rows / "
                f"prefill of one prompt | {costs['decode_memory_over_plain']:.3f} / "
                f"{costs['prefill_memory_over_plain']:.3f} | |",
                f"| | on / off that these two passes alone predict | {costs['predicted_on_over_off']:.3f} | |",
            ]
        hit_rate = serving.get("on_off", {}).get("decoder_memory_cache_hit_rate")
        if hit_rate is not None:
            rows.append(f"| | decoder's cache of decoded memories: hit rate | {hit_rate:.3f} | |")
    prefill = _load(results_dir / "prefill.json")
    if prefill:
        arms = [a for a in prefill["arms"] if a != "0"]
        others = f"{prefill['rows'] - 1} decoding stream{'s' if prefill['rows'] > 2 else ''}"
        rows.append(f"| prefill (`{prefill['preset']}`, a {prefill['long_tokens']:,}-token prompt joins {others}) | "
                    f"running streams' longest pause / TTFT, "
                    f"--prefill-tokens " + ", ".join(["0 (one pass)", *arms]) + " | "
                    + " / ".join(f"{prefill['arms'][a]['stall_ms']:.0f} ms" for a in ["0", *arms]) + "; "
                    + " / ".join(f"{prefill['arms'][a]['ttft_ms']:.0f} ms" for a in ["0", *arms]) + " | |")
        rows.append("| | longest pause / one pass's: --prefill-tokens " + ", ".join(arms) + " | "
                    + " / ".join(f"{prefill['arms'][a]['stall_over_one_pass']:.2f}" for a in arms) + " | |")
    sampling = _load(results_dir / "sampling.json")
    if sampling:
        arms = [a for a in sampling["arms"] if a != "plain"]
        rows.append(f"| sampling options (`{sampling['preset']}`, {sampling['rows']} streams) | decode step / plain "
                    f"greedy's: " + ", ".join(a.replace("_", " ") for a in arms)
                    + f" (penalties: presence, frequency and {sampling['biased_ids']} biased ids) | "
                    + " / ".join(f"{sampling['arms'][a]['step_over_plain']:.3f}" for a in arms) + " | |")
        if "scored_over_plain_read" in sampling:
            rows.append(f"| | a {sampling['prompt_tokens']}-token prompt read alone: scored (every position's "
                        f"logprob) / read to its first token | {sampling['scored_over_plain_read']:.3f} "
                        f"({sampling['prompt_scored_ms']:.0f} / {sampling['prompt_read_ms']:.0f} ms) | |")
    index = _load(results_dir / "index.json")
    if index:
        p, kinds, summary = index["protocol"], index["kinds"], index["summary"]
        ivf = kinds[f"ivfpq_nprobe{summary['ivfpq_nprobe']}"]
        rows += [
            f"| index ({p['references']:,} references, {p['questions']} questions) | question's own reference "
            f"in the 5 retrieved: flat / HNSW / IVF-PQ | {kinds['flat']['hit_at_5']:.3f} / "
            f"{kinds['hnsw']['hit_at_5']:.3f} / {ivf['hit_at_5']:.3f} | |",
            f"| | IVF-PQ ({ivf['nlist']} lists, nprobe {ivf['nprobe']}) / flat: found / bytes | "
            f"{summary['ivfpq_hit_at_5_over_flat']:.3f} / {summary['ivfpq_bytes_over_flat']:.3f} | |",
            f"| | query time, per query in a batch of {p['questions']}: flat / HNSW / IVF-PQ | "
            f"{kinds['flat']['query_ms']:.2f} / "
            f"{kinds['hnsw']['query_ms']:.2f} / {ivf['query_ms']:.2f} ms | |",
        ]
        sharded = index.get("sharded")
        if sharded:
            n = summary["shards"]
            rows += [
                f"| | in {n} index shards, slowest shard's query time / whole index's: flat / HNSW / IVF-PQ | "
                + " / ".join(f"{sharded[k]['slowest_shard_query_over_whole']:.2f}" for k in ("flat", "hnsw", "ivfpq"))
                + " | |",
                f"| | in {n} index shards, merged answers' found / whole index's: flat / HNSW / IVF-PQ | "
                + " / ".join(f"{sharded[k]['hit_at_5_over_whole']:.3f}" for k in ("flat", "hnsw", "ivfpq")) + " | |",
            ]
    tables = _load(results_dir / "tables.json")
    if tables:
        s, service, gc = tables["summary"], tables["memory_service"], tables["release_gc"]
        rows += [
            f"| release tables ({s['references']:,} references) | memory service, held per reference: from the "
            f"table's rows / from `memory_ids.npy`, mapped (its file, in the page cache) | "
            f"{service['table_rows']['bytes_held_per_reference']:.0f} / "
            f"{service['memory_ids']['bytes_held_per_reference']:.0f} B "
            f"({service['memory_ids']['mapped_file_bytes_per_reference']:.0f} B) | |",
            f"| | memory service, its table made from the downloaded file: rows / `memory_ids.npy` | "
            f"{service['table_rows']['read_s']:.2f} / {service['memory_ids']['read_s']:.3f} s | |",
            f"| | memory service, a lookup: in memory / mapped | {service['table_rows']['lookup_us']:.1f} / "
            f"{service['memory_ids']['lookup_us']:.1f} µs | |",
            f"| | `release delete`/`gc`, held per memory: key strings / sorted ids | "
            f"{s['gc_bytes_per_memory']['key_set']:.0f} / {s['gc_bytes_per_memory']['listed']:.0f} B | |",
            f"| | `release delete`/`gc`, reading a listing: the table / `memory_ids.npy` | "
            f"{gc['key_set_from_table']['read_s']:.2f} / {gc['listed_from_memory_ids']['read_s']:.3f} s | |",
            "| | `release gc`, checking the bank's keys: sorted ids / set | "
            f"{_ratio(s['gc_bank_check_listed_over_set'])} | |",
        ]
    quality = _load(results_dir / "quality.json")
    if quality:
        first = quality["first_hit_only"]
        ppl = quality["perplexity"]
        rows += [
            f"| quality (`{quality['release']}`, {quality['n_questions']} KB-only questions) | exact match: "
            f"no memory / memory / RAG | {quality['acc_no_memory']:.3f} / {quality['acc_memory']:.3f} / "
            f"{quality['acc_rag']:.3f} | |",
            f"| | memory / RAG | {_ratio(quality['memory_over_rag'])} | >= 0.9 |",
            f"| | memory / no memory | {_ratio(quality['memory_over_no_memory'])} | >= 5 |",
            f"| | first retrieved hit only: memory / RAG | {first['acc_memory']:.3f} / {first['acc_rag']:.3f} | |",
            "| | tokens kept per KV head: " + ", ".join(quality["tokens_per_head_ablation"]["acc_memory"]) + " | "
            + " / ".join(f"{v:.2f}" for v in quality["tokens_per_head_ablation"]["acc_memory"].values()) + " | |",
            f"| | real-text perplexity: no memory / memory | {ppl['no_memory']:,.0f} / {ppl['memory']:,.0f} | |",
        ]
        attention = quality.get("attention_on_the_right_memory")
        if attention:
            rows.append(f"| | answer's memory attention on the right memory, by memory layer (chance "
                        f"{attention['chance']:.2f}) | " + " / ".join(f"{v:.2f}" for v in attention["by_memory_layer"])
                        + " | |")
    if len(rows) == 2:
        rows.append("| (no results yet) | | | |")
    return "\n".join(rows)


def update_readme(readme: Path, results_dir: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section to refresh")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render_table(results_dir)}\n{END}{tail}", encoding="utf-8")


def _ratio(value: float | None) -> str:
    return "n/a (zero denominator)" if value is None else f"{value:.2f}"


def _load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
