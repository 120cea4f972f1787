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
