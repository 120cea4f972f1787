import json

from captioner import demo


def test_demo_runs_the_whole_pipeline(tmp_path, monkeypatch, capsys):
    # The real demo trains 1,200 images for 5 epochs (minutes); the same code path on a handful of images.
    monkeypatch.setattr(demo, "DEMO_TRAIN_IMAGES", 24)
    monkeypatch.setattr(demo, "DEMO_VAL_IMAGES", 6)
    monkeypatch.setattr(demo, "DEMO_EPOCHS", 1)
    metrics = demo.run_demo(tmp_path, device="cpu", progress=False)
    out = capsys.readouterr().out
    assert "held-out BLEU (beam 3)" in out and out.count("model:") == 4
    assert metrics["num_images"] == 6 and metrics["beam_size"] == 3
    assert json.loads((tmp_path / "demo_metrics.json").read_text())["Bleu_4"] == metrics["Bleu_4"]
    assert (tmp_path / "run" / "best.pt").is_file()


def test_demo_seeds_script_reruns_a_seed_exactly_and_reports_the_spread(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "demo_seeds.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--seeds", "0", "1", "0",
                           "--train-images", "24", "--val-images", "6", "--epochs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *runs, summary = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["seed"] for r in runs] == [0, 1, 0]
    same = ("held_out_bleu_4", "final_train_loss")
    assert [runs[0][k] for k in same] == [runs[2][k] for k in same]  # a seed is a run, again
    assert runs[0]["final_train_loss"] != runs[1]["final_train_loss"]
    assert summary["seeds"] == 3 and summary["loss_min"] <= summary["loss_mean"] <= summary["loss_max"]
    assert summary["bleu_4_min"] == min(r["held_out_bleu_4"] for r in runs)
