"""The benchmarks run end to end and report every figure they promise (tiny sizes; no timing asserted)."""

import pytest

from captioner.benchmarks.decode import run_decode_benchmark


def test_decode_benchmark_reports_every_setting_and_the_baseline():
    result = run_decode_benchmark(device="cpu", num_images=4, batch_size=2, naive_images=1, max_len=3, vocab_size=50)
    for source in ("from_memory", "from_files"):
        assert set(result[source]) == {"greedy", "beam3", "beam5"}
        assert all(r["captions_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in result[source].values())
    assert result["from_memory"]["beam3"]["mean_tokens"] <= 3
    assert result["naive_per_image"]["beam3"]["images"] == 1
    assert result["speedup_beam3_vs_naive"] > 0 and result["images"] == 4


def test_train_benchmark_times_every_setting_on_the_same_number_of_images():
    from captioner.benchmarks.train import TrainBenchmarkOptions, run_train_benchmark

    opts = TrainBenchmarkOptions(device="cpu", images=12, batch_size=4, batches=2, finetune_batches=1, image_size=32,
                                 workers=0, captions_per_image=2)
    result = run_train_benchmark(opts)
    settings = ("baseline", "frozen_from_jpeg", "finetune_from_jpeg", "cached_features", "cached_features_cpu_bf16")
    for name in settings:
        expected = 4 * (1 if name == "finetune_from_jpeg" else 2)
        assert result[name]["images"] == expected and result[name]["captions_per_s"] > 0, name
        # from the counts and the time, not from images_per_s: both rates are rounded to 0.1, which at a few
        # images/s on a busy machine is more than 1% of either
        captions_per_s = 2 * result[name]["images"] / result[name]["seconds"]
        assert result[name]["captions_per_s"] == pytest.approx(captions_per_s, rel=0.01, abs=0.05)
    assert result["extract"]["images"] == 12  # every generated image, once
    for name in settings[1:]:
        ratio = result[name]["images_per_s"] / result["baseline"]["images_per_s"]
        assert result[f"{name}_vs_baseline"] == pytest.approx(ratio, abs=0.01)
    assert "frozen_gpu_decode" not in result  # CUDA-only settings are not faked on a CPU


def test_train_benchmark_refuses_an_unknown_setting_before_any_work(capsys):
    from captioner.cli import main

    code = main(["benchmark", "train", "--device", "cpu", "--only", "cached_feature", "frozen_from_jpeg_batch8",
                 "--more-batch-sizes", "8"])  # the twin's size given: only the misspelt name is unknown
    err = capsys.readouterr().err
    assert code == 2 and "--only: with these options on cpu, no setting is named cached_feature (" in err
    assert "known: baseline, cached_features," in err
    # settings other options or another device would add are refused as well: they would never be timed
    for name in ("frozen_from_packed_jpeg", "frozen_from_jpeg_compiled", "frozen_gpu_decode"):
        assert main(["benchmark", "train", "--device", "cpu", "--only", name]) == 2
        assert f"no setting is named {name} (" in capsys.readouterr().err


def test_train_benchmark_times_the_frozen_trunk_from_packed_copies():
    from captioner.benchmarks.train import TrainBenchmarkOptions, run_train_benchmark

    opts = TrainBenchmarkOptions(device="cpu", images=12, batch_size=4, batches=2, image_size=32, workers=0,
                                 captions_per_image=2, only=("frozen_from_packed_jpeg",), pack_size=48)
    result = run_train_benchmark(opts)
    assert result["pack"]["images"] == 12 and result["pack"]["megabytes_after"] < result["pack"]["megabytes_before"]
    assert result["frozen_from_packed_jpeg"]["images"] == 8
    assert "frozen_from_packed_jpeg_vs_baseline" in result and "frozen_from_jpeg" not in result


def test_train_benchmark_times_loading_alone_and_the_frozen_trunk_from_square_copies():
    from captioner.benchmarks.train import TrainBenchmarkOptions, run_train_benchmark

    opts = TrainBenchmarkOptions(device="cpu", images=12, batch_size=4, batches=2, image_size=32, workers=0,
                                 captions_per_image=2, pack_size=32,
                                 only=("loading_from_jpeg", "loading_from_square_jpeg", "frozen_from_square_jpeg"))
    result = run_train_benchmark(opts)
    assert result["pack_square"]["images"] == 12 and "pack" not in result  # the shorter-side copy was not needed
    assert result["frozen_from_square_jpeg"]["images"] == 8 and "frozen_from_square_jpeg_vs_baseline" in result
    for name in ("loading_from_jpeg", "loading_from_square_jpeg"):
        assert result[name]["images"] == 8 and result[name]["images_per_s"] > 0, name
        assert f"{name}_vs_baseline" not in result  # no training step in it: not comparable with the baseline
    assert "loading_from_packed_jpeg" not in result and "frozen_from_jpeg" not in result


def test_train_benchmark_rounds_time_each_setting_again_and_report_its_median_round():
    from captioner.benchmarks.train import TrainBenchmarkOptions, run_train_benchmark

    opts = TrainBenchmarkOptions(device="cpu", images=8, batch_size=4, batches=1, image_size=32, workers=0,
                                 captions_per_image=1, only=("cached_features",), rounds=3)
    result = run_train_benchmark(opts)
    for name in ("baseline", "cached_features"):
        rounds = result[name]["images_per_s_rounds"]
        assert len(rounds) == 3 and result[name]["images_per_s"] == sorted(rounds)[1], name
    assert result["extract"]["images"] == 8  # the cache is filled once, whatever the rounds
    ratio = result["cached_features"]["images_per_s"] / result["baseline"]["images_per_s"]
    assert result["cached_features_vs_baseline"] == pytest.approx(ratio, abs=0.01)


def test_train_benchmark_compile_times_compiled_twins_through_the_compiled_forward(monkeypatch):
    """--compile adds NAME_compiled beside each fast setting, and its steps run through the compiled forward (a
    stand-in here that counts its calls: a real compile costs minutes on two cores and is measured on a GPU)."""
    import captioner.benchmarks.train as bench

    calls = {"wrapped": 0, "steps": 0}

    def counting_compile(forward_train):
        calls["wrapped"] += 1

        def forward(*args, **kwargs):
            calls["steps"] += 1
            return forward_train(*args, **kwargs)
        return forward

    monkeypatch.setattr(bench, "compile_training_forward", counting_compile)
    opts = bench.TrainBenchmarkOptions(device="cpu", images=8, batch_size=4, batches=2, image_size=32, workers=0,
                                       captions_per_image=1, pack_size=40, compile=True,
                                       only=("frozen_from_packed_jpeg", "cached_features"))
    result = bench.run_train_benchmark(opts)
    twins = ("frozen_from_packed_jpeg_compiled", "cached_features_compiled")
    for name in ("frozen_from_packed_jpeg", "cached_features", *twins):
        assert result[name]["images"] == 8, name  # two timed batches of four
        assert f"{name}_vs_baseline" in result
    assert "frozen_from_jpeg_compiled" not in result  # --only still decides which settings run
    # one compiled forward per twin, and every one of the twins' steps (one warm-up + two timed each) went through it
    assert calls == {"wrapped": 2, "steps": 2 * 3}


def test_train_benchmark_more_batch_sizes_time_twins_in_larger_batches():
    from captioner.benchmarks.train import TrainBenchmarkOptions, run_train_benchmark

    opts = TrainBenchmarkOptions(device="cpu", images=12, batch_size=2, batches=2, image_size=32, workers=0,
                                 captions_per_image=1, pack_size=40, more_batch_sizes=(4, 6),
                                 only=("frozen_from_packed_jpeg_batch6", "cached_features"))
    result = run_train_benchmark(opts)
    assert result["cached_features"]["images"] == 4  # two timed batches of two
    assert result["cached_features_batch4"]["images"] == 8 and result["cached_features_batch6"]["images"] == 12
    assert result["frozen_from_packed_jpeg_batch6"]["images"] == 12  # a twin named on its own in --only
    assert "frozen_from_packed_jpeg" not in result and "frozen_from_packed_jpeg_batch4" not in result
    assert "cached_features_batch6_vs_baseline" in result


def test_packed_loss_benchmark_times_both_losses_on_the_same_batches_and_they_agree(synthetic_dataset, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_ablation import synthetic_as_flickr8k

    repo = Path(__file__).resolve().parents[1]
    root = synthetic_as_flickr8k(synthetic_dataset, tmp_path / "flickr8k")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": {"dim": 32, "heads": 4, "decoder_layers": 1, "trunk_stages": 5,
                                            "grid_convs": 0}, "data": {"image_size": 64},
                                  "train": {"vocab_size": 200, "label_smoothing": 0.1}}))
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "benchmark_packed_loss.py"), "--root", str(root),
                           "--config", str(config), "--batch-size", "8", "--steps", "2", "--rounds", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_loss"] is True and result["captions_per_step"] == 40
    assert 0.0 < result["real_share_of_positions"] <= 1.0
    assert len(result["rounds_ms_all_positions"]) == len(result["rounds_ms_real_positions"]) == 2
    assert result["ms_per_step_loss_over_all_positions"] > 0 and result["ms_per_step_loss_over_real_positions"] > 0
    missing = subprocess.run([sys.executable, str(repo / "scripts" / "benchmark_packed_loss.py"), "--root",
                              str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no Flickr8k folder" in missing.stderr


def test_augment_benchmark_reports_both_places_from_the_same_images(synthetic_dataset, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_ablation import synthetic_as_flickr8k

    repo = Path(__file__).resolve().parents[1]
    root = synthetic_as_flickr8k(synthetic_dataset, tmp_path / "flickr8k")
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "benchmark_augment.py"), "--root", str(root),
                           "--image-size", "32", "--batch-size", "8", "--workers", "1", "--rounds", "2",
                           "--step-batches", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert set(result["settings"]) == {"workers", "device"} and result["device"] == "cpu"
    workers, device = result["settings"]["workers"], result["settings"]["device"]
    assert len(workers["images_per_s_rounds"]) == len(device["images_per_s_rounds"]) == 2
    assert workers["device_ms_per_batch"] == 0.0 and device["device_ms_per_batch"] > 0  # only one augments there
    assert workers["worker_ms_per_image"] > 0 and device["worker_ms_per_image"] > 0
    assert len(workers["pretraining_images_per_s_rounds"]) == 2 and device["pretraining_images_per_s"] > 0

    too_few = subprocess.run([*proc.args[:-1], "6"], capture_output=True, text=True, timeout=300)  # 3 + 6 > 48 / 8
    assert too_few.returncode == 2 and not too_few.stdout  # no JSON with NaN figures
    assert "--step-batches 6 needs 3 + 6 batches of --batch-size 8: 48 images give 6" in too_few.stderr
    assert result["pretraining_images_per_s_ratio"] > 0
