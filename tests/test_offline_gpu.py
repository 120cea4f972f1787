"""scripts/offline_gpu.py: a budgeted round on a machine without network, run here on CPU with tiny settings.

The GPU figures it exists for cannot be produced here; what is checked is what a short GPU session relies on: the
phases keep to the budget, a phase past its time is stopped and recorded, every result lands in at most eight files
in the output folder, the scoring passes run in their order on the checkpoints that exist, and the benchmark
commands name only settings the benchmark times on CUDA."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from test_ablation import synthetic_as_flickr8k

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import offline_gpu  # noqa: E402

TINY = {"model": {"dim": 32, "heads": 4, "decoder_layers": 1, "dropout": 0.0},
        "data": {"image_size": 64}, "train": {"batch_size": 16, "vocab_size": 200, "epochs": 1}}


def kit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "offline_gpu.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def test_recipe_trains_scores_in_order_and_leaves_its_results_in_a_few_files(synthetic_dataset, tmp_path):
    root = synthetic_as_flickr8k(synthetic_dataset, tmp_path / "flickr8k")
    (tmp_path / "base.json").write_text(json.dumps(TINY))
    (tmp_path / "variants.json").write_text(json.dumps({"ce": [], "scst": ["--scst-epochs", "1"]}))
    out = tmp_path / "out"
    proc = kit("recipe", "--out", str(out), "--root", str(root), "--runs", str(tmp_path / "runs"), "--base",
               str(tmp_path / "base.json"), "--variants", str(tmp_path / "variants.json"), "--device", "cpu",
               "--budget", "400", "--scoring-seconds", "150", "--ensembles", "ce+scst", "ce+missing", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= offline_gpu.MAX_OUT_FILES
    assert {"summary.json", "log.txt", "results.json", "results.md", "bleu_bench.csv", "train_logs.txt"} <= set(files)
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(results) == {"ce", "scst"} and all(r["status"] == "ok" for r in results.values())

    with open(out / "bleu_bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = [r for r in rows if r["scoring_pass"] == "best.pt of each variant"]
    # every variant's best.pt with and without a length penalty and the bigram ban
    assert sorted((Path(r["checkpoint"]).parent.name, r["length_penalty"], r["no_repeat_ngram"]) for r in best) == \
        sorted((v, lp, nr) for v in ("ce", "scst") for lp in ("0.0", "1.0") for nr in ("0", "2"))
    ensembles = [r for r in rows if r["scoring_pass"] == "ensembles"]
    assert {r["checkpoint"].count("+") for r in ensembles} == {1} and len(ensembles) == 2  # ce+missing left out

    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["device"] == "cpu" and summary["seconds_used"] <= 400
    names = [p["name"] for p in summary["phases"]]
    assert names[0].startswith("train and score on dev") and names[1].startswith("bleu-bench 1")
    assert names.index("bleu-bench 3: ensembles") > names.index(names[1])
    assert summary["best_variant"]["name"] in results
    assert all(p.get("exit_status") == 0 for p in summary["phases"] if "skipped" not in p)


def test_scoring_passes_rank_by_dev_bleu4_and_take_only_the_checkpoints_there(tmp_path):
    runs = tmp_path / "runs"
    scores = {"a": 0.10, "b": 0.14, "c": 0.12}
    results = [{"name": n, "dev_beam3": {"Bleu_4": s}} for n, s in scores.items()] + [{"name": "failed"}]
    runs.mkdir()
    (runs / "results.json").write_text(json.dumps({"results": results}))
    for name in scores:
        (runs / name).mkdir()
        (runs / name / "best.pt").write_bytes(b"")
    (runs / "c" / "scst_start.pt").write_bytes(b"")
    passes = offline_gpu.scoring_passes(runs, ["b+c", "a+nothing", "a"])
    (what1, best, decoding1), (what2, control, _), (what3, ensembles, _) = passes
    assert best == [str(runs / n / "best.pt") for n in ("b", "c", "a")]
    assert control == [str(runs / "c" / "scst_start.pt")]
    assert ensembles == [f"{runs / 'b' / 'best.pt'}+{runs / 'c' / 'best.pt'}"]
    assert decoding1 == offline_gpu.BEST_DECODING


def test_a_phase_past_its_time_is_stopped_and_recorded(tmp_path):
    session = offline_gpu.Session(tmp_path, budget=60)
    started = time.monotonic()
    code = session.run("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], timeout=1, env={})
    assert code is None and time.monotonic() - started < 15
    phase = json.loads((tmp_path / "summary.json").read_text())["phases"][0]
    assert phase["name"] == "sleeper" and phase["stopped_at_time_limit"] and phase["exit_status"] is None


def test_a_budget_that_leaves_no_training_time_and_a_used_output_folder_are_refused(tmp_path):
    root = tmp_path / "flickr8k"
    (root / "Flickr8k_text").mkdir(parents=True)
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text("{}")
    proc = kit("recipe", "--out", str(used), "--root", str(root), cwd=tmp_path)
    assert proc.returncode != 0 and "is not empty (summary.json)" in proc.stderr
    proc = kit("recipe", "--out", str(tmp_path / "new"), "--root", str(root), "--budget", "100", cwd=tmp_path)
    assert proc.returncode != 0 and "per training run" in proc.stderr
    proc = kit("recipe", "--out", str(tmp_path / "new2"), "--root", str(tmp_path), cwd=tmp_path)
    assert proc.returncode != 0 and "has no Flickr8k_text/ folder" in proc.stderr


def test_the_benchmark_commands_name_only_settings_the_benchmark_times_on_cuda(tmp_path):
    import argparse

    from captioner.benchmarks.train import add_arguments, options_from_args, setting_names

    commands = offline_gpu.bench_commands(tmp_path, [])
    assert [name for name, _ in commands] == [name for name, _ in offline_gpu.BENCH_RUNS]
    for name, command in commands:
        assert command[1:5] == ["-m", "captioner.cli", "benchmark", "train"]
        parser = argparse.ArgumentParser(exit_on_error=False)
        add_arguments(parser)
        opts = options_from_args(parser.parse_args(command[5:]))
        assert set(opts.only) <= setting_names(opts, cuda=True), name
        assert command[-1] == str(tmp_path / f"bench_{name}.json")
    assert [n for n, _ in offline_gpu.bench_commands(tmp_path, ["coco_epoch"])] == ["coco_epoch"]


def test_prepare_packs_the_images_and_counts_what_would_travel(synthetic_dataset, tmp_path):
    root = synthetic_as_flickr8k(synthetic_dataset, tmp_path / "flickr8k")
    packed = tmp_path / "packed"
    proc = kit("prepare", "--flickr8k", str(root), "--packed", str(packed), "--size", "32", "--no-wheels",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((packed / "Flicker8k_Dataset").glob("*.jpg"))) == 56
    assert (packed / "Flickr8k_text" / "Flickr8k.token.txt").is_file()
    sizes = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert sizes["checkout_mib"] > 0 and str(packed) in sizes["carried_mib"]
    proc = kit("prepare", "--packed", str(packed), "--no-wheels", "--max-mib", "0.1", cwd=tmp_path)
    assert proc.returncode == 1 and "more than --max-mib 0.1" in proc.stderr
