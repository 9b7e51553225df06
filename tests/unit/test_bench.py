"""Benchmarks run end to end at toy sizes and report what they claim to (no figures asserted)."""

from memory3.bench.report import render_table, write_json
from memory3.bench.storage import run_storage_bench
from memory3.model.codecs import RawCodec, VQCodec
from memory3.model.memory_format import paper_bytes_per_memory


def test_storage_bench_reports_sizes_and_errors(tmp_path):
    result = run_storage_bench(preset="tiny", n_references=64, rq_bits=4, pq_bits=4, niter=2)
    sizes = result["paper_config_bytes_per_memory"]
    assert set(sizes) == {"fp16", "bf16", "int8", "vq"}
    assert sizes["bf16"] == paper_bytes_per_memory(RawCodec("bf16"))
    assert sizes["vq"] == paper_bytes_per_memory(VQCodec(80, opq_m=20, rq_bits=4, pq_bits=4))
    assert result["best_codec"] == min(sizes, key=sizes.get)
    errors = result["reconstruction"]
    assert errors["fp16"]["rel_mse"] < errors["int8"]["rel_mse"] < errors["vq"]["rel_mse"] < 1.0
    assert result["setup"]["train_references"] == 51
    write_json(result, tmp_path / "storage.json")
    table = render_table(tmp_path)
    assert "best codec" in table and f"{sizes['vq']:,} B/memory" in table
