"""The benchmarks run end to end and report every figure they promise (tiny sizes; no timing asserted)."""

from captioner.benchmarks.decode import run_decode_benchmark


def test_decode_benchmark_reports_every_setting_and_the_baseline():
    result = run_decode_benchmark(device="cpu", num_images=4, batch_size=2, naive_images=1, max_len=3, vocab_size=50)
    for source in ("from_memory", "from_files"):
        assert set(result[source]) == {"greedy", "beam3", "beam5"}
        assert all(r["captions_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in result[source].values())
    assert result["from_memory"]["beam3"]["mean_tokens"] <= 3
    assert result["naive_per_image"]["beam3"]["images"] == 1
    assert result["speedup_beam3_vs_naive"] > 0 and result["images"] == 4
