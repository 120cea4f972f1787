"""End to end through the command line on a tiny synthetic dataset: train -> caption -> evaluate."""

import json
import subprocess
import sys

import pytest

from captioner.cli import main
from conftest import TINY


def test_train_writes_run_folder(trained_run):
    for name in ("last.pt", "best.pt", "config.json", "log.jsonl"):
        assert (trained_run / name).is_file(), name
    lines = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all(0.0 <= line["val_Bleu_4"] <= 1.0 and line["val_num_images"] == 8 for line in lines)
    config = json.loads((trained_run / "config.json").read_text())
    assert config["data"]["image_size"] == 64 and config["model"]["vocab_size"] > 4


def test_resume_continues_from_last_epoch(trained_run, synthetic_dataset):
    code = main(["train", "--resume", str(trained_run / "last.pt"), "--out", str(trained_run), "--epochs", "3",
                 "--no-progress"])
    assert code == 0
    lines = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]


def test_caption_folder_reports_bad_images_and_goes_on(trained_run, synthetic_dataset, tmp_path):
    good = sorted(synthetic_dataset.val_images.iterdir())[:3]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    # A real process, so stdout/stderr and the exit status are exactly what a user sees.
    proc = subprocess.run([sys.executable, "-m", "captioner.cli", "caption", "--checkpoint",
                           str(trained_run / "best.pt"), str(folder), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    out, err, code = proc.stdout, proc.stderr, proc.returncode
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all("\t" in line and line.split("\t")[1] for line in lines)
    assert "broken.jpg" in err and "Traceback" not in err


def test_caption_json_n_best(trained_run, synthetic_dataset, capsys):
    image = sorted(synthetic_dataset.val_images.iterdir())[0]
    code = main(["caption", "--checkpoint", str(trained_run / "best.pt"), str(image), "--beam-size", "3",
                 "--num-captions", "2", "--json", "--device", "cpu"])
    assert code == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["path"] == str(image)
    scores = [c["score"] for c in entry["captions"]]
    assert len(scores) == 2 and scores[0] >= scores[1]
    code = main(["caption", "--checkpoint", str(trained_run / "best.pt"), str(image), "--beam-size", "3",
                 "--num-captions", "2", "--device", "cpu"])  # the text format: a line per caption, best first
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [f"{image}\t{c['caption']}" for c in entry["captions"]]


def test_evaluate_writes_metrics_and_coco_results(trained_run, synthetic_dataset, tmp_path):
    metrics_path, results_path = tmp_path / "m.json", tmp_path / "r.json"
    code = main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--dataset", "coco",
                 "--captions", str(synthetic_dataset.val_captions), "--images", str(synthetic_dataset.val_images),
                 "--beam-size", "3", "--out", str(metrics_path), "--results", str(results_path), "--device", "cpu"])
    assert code == 0
    metrics = json.loads(metrics_path.read_text())
    assert {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "num_images", "beam_size"} <= set(metrics)
    assert metrics["num_images"] == 8 and metrics["beam_size"] == 3
    results = json.loads(results_path.read_text())
    assert len(results) == 8 and all(isinstance(r["image_id"], int) and isinstance(r["caption"], str)
                                     for r in results)


def test_malformed_annotation_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "captions.json"
    bad.write_text('{"images": [')
    code = main(["train", "--dataset", "coco", "--train-captions", str(bad), "--train-images", str(tmp_path),
                 "--val-captions", str(bad), "--val-images", str(tmp_path), "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "captions.json" in err and "Traceback" not in err


@pytest.mark.parametrize("section, setting, message", [
    ("train", {"epochs": 1.5}, "train.epochs must be a whole number, got 1.5"),
    ("train", {"batch_size": "big"}, 'train.batch_size must be a whole number, got "big"'),
    ("train", {"lr": "0.001"}, 'train.lr must be a number, got "0.001"'),
    ("data", {"augment": "no"}, 'data.augment must be true or false, got "no"'),
    ("data", {"image_size": True}, "data.image_size must be a whole number, got true"),
    ("model", {"decoder": "gru"}, "model.decoder must be one of transformer, lstm, got 'gru'"),
    ("model", ["dim", 64], "section 'model' must be a JSON object of settings"),
    ("model", {"dimension": 64}, "unknown key(s) ['dimension'] in section 'model'"),
])
def test_a_config_file_value_of_the_wrong_kind_is_refused_naming_file_and_key(tmp_path, capsys, section, setting,
                                                                             message):
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({section: setting}))
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"{config}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size (train.batch_size) must be at least 1, got 0"),
    (["--lr", "-0.001"], "--lr (train.lr) must be at least 0, got -0.001"),
    (["--lr", "0", "--scst-epochs", "1"], "--lr 0 leaves no learning rate to scale --scst-lr from"),
    (["--dropout", "1"], "--dropout (model.dropout) must be below 1, got 1"),
    (["--label-smoothing", "1.5", "--workers", "-1"], "--label-smoothing (train.label_smoothing) must be below 1, "
                                                      "got 1.5; --workers (train.workers) must be at least 0, got -1"),
    (["--dim", "30"], "--dim (30) must be a multiple of --heads (4)"),
    (["--trunk-stages", "6", "--grid-pool", "0", "--scst-samples", "1"],
     "--trunk-stages (model.trunk_stages) must be at most 5, got 6; --grid-pool (model.grid_pool) must be at least "
     "1, got 0; --scst-samples (train.scst_samples) must be at least 2, got 1"),
])
def test_settings_out_of_range_are_named_before_the_run_starts(tmp_path, capsys, flags, message):
    code = main(["train", "--dataset", "flickr8k", "--root", str(tmp_path), "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and f"settings out of range: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_too_small_for_the_captions_characters_is_named():
    from captioner.errors import CaptionerError
    from captioner.text import Tokenizer

    # more distinct words than the vocabulary holds, so not a word vocabulary: subwords need every character
    words = [f"{a}{b}{c}" for a in "ab" for b in "ab" for c in "ab"] + ["aaaa", "abab", "bbbb", "baba"]
    captions = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3
    needed = len(set("".join(captions))) + 4  # the characters, the space included, and pad/unk/bos/eos
    assert len({w for c in captions for w in c.split()}) + 4 > needed  # a word vocabulary would need more
    with pytest.raises(CaptionerError, match=f"--vocab-size {needed - 1} cannot hold these captions: their "
                                             f"{needed - 4} distinct characters and 4 special tokens need at least "
                                             f"{needed}"):
        Tokenizer.train(captions, vocab_size=needed - 1)
    assert Tokenizer.train(captions, vocab_size=needed).vocab_size <= needed


def test_a_config_file_number_in_a_fractional_setting_may_be_whole():
    from captioner.config import RunConfig

    cfg = RunConfig.from_dict({"train": {"lr": 1, "warmup_epochs": 0}, "model": {"dropout": 0}})
    assert (cfg.train.lr, cfg.train.warmup_epochs, cfg.model.dropout) == (1.0, 0.0, 0.0)
    assert isinstance(cfg.train.lr, float) and json.dumps(cfg.to_dict()["train"]["lr"]) == "1.0"


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["caption", "--checkpoint", str(tmp_path / "none.pt"), str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "none.pt" in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    assert main(["caption", "--checkpoint", str(tmp_path / "run"), str(tmp_path)]) == 2
    assert f"checkpoint {tmp_path / 'run'} is a folder; give a file in it (best.pt)" in capsys.readouterr().err


def test_evaluate_names_the_coco_file_it_was_not_given(trained_run, capsys):
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--captions", "captions.json",
                 "--device", "cpu"]) == 2
    assert ("--dataset coco needs the test split's caption JSON and image folder; no image folder was given"
            in capsys.readouterr().err)


def test_caption_sampling_is_reproducible_and_n_best_sorted(trained_run, synthetic_dataset, capsys):
    images = [str(p) for p in sorted(synthetic_dataset.val_images.iterdir())[:3]]
    argv = ["caption", "--checkpoint", str(trained_run / "best.pt"), *images, "--sample", "--num-captions", "3",
            "--temperature", "1.3", "--top-k", "20", "--top-p", "0.9", "--seed", "5", "--batch-size", "2", "--json",
            "--device", "cpu"]
    assert main(argv) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(argv) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == first
    assert [entry["path"] for entry in first] == images
    for entry in first:
        scores = [c["score"] for c in entry["captions"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("flags,message", [(["--sample", "--beam-size", "3"], "exclusive"),
                                           (["--num-captions", "4", "--beam-size", "2"], "beam size >= 4"),
                                           (["--top-p", "1.5"], "top_p"),
                                           (["--min-len", "5", "--max-len", "3"], "min_len 5 is above max_len 3"),
                                           (["--temperature", "0.7"], "temperature, top_k and top_p shape sampling")])
def test_bad_decoding_flags_are_usage_errors(trained_run, synthetic_dataset, capsys, flags, message):
    image = str(sorted(synthetic_dataset.val_images.iterdir())[0])
    code = main(["caption", "--checkpoint", str(trained_run / "best.pt"), image, "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["caption", "--checkpoint", "x.pt", "a.jpg", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["evaluate", "--checkpoint", "x.pt", "--limit", "-5"], "argument --limit: must be at least 0, got -5"),
    (["bleu-bench", "--checkpoints", "x.pt", "--out", "b", "--max-len", "0"], "argument --max-len: must be at least 1"),
    (["bleu-bench", "--checkpoints", "x.pt", "--out", "b", "--batch-size", "-1"], "argument --batch-size: must be"),
    (["make-synthetic", "syn", "--train", "-3"], "argument --train: must be at least 1, got -3"),
    (["evaluate", "--checkpoint", "x.pt", "--max-len", "ten"], "argument --max-len: invalid int value: 'ten'")])
def test_numeric_flags_out_of_range_are_refused_when_parsed(capsys, argv, message):
    """Not a traceback from the DataLoader, nor a silent slice: `--limit -5` would have scored all but 5 images."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_bleu_bench_refuses_a_value_listed_twice_and_make_synthetic_a_file_for_its_folder(
        trained_run, synthetic_dataset, tmp_path, capsys):
    checkpoint = str(trained_run / "best.pt")
    code = main(["bleu-bench", "--checkpoints", checkpoint, "--beam-sizes", "1", "3", "1", "--out", str(tmp_path / "b"),
                 "--captions", str(synthetic_dataset.val_captions), "--images", str(synthetic_dataset.val_images)])
    assert code == 2 and "bleu-bench: --beam-sizes lists a value twice: 1 3 1" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file")
    assert main(["make-synthetic", str(tmp_path / "taken"), "--train", "2", "--val", "1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the dataset folder {tmp_path / 'taken'}: {tmp_path / 'taken'} is a file" in err


def test_evaluate_records_decoding_settings(trained_run, synthetic_dataset, tmp_path):
    metrics_path = tmp_path / "m.json"
    code = main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--dataset", "coco",
                 "--captions", str(synthetic_dataset.val_captions), "--images", str(synthetic_dataset.val_images),
                 "--beam-size", "3", "--length-penalty", "0.6", "--no-repeat-ngram", "3", "--out", str(metrics_path),
                 "--device", "cpu"])
    assert code == 0
    decoding = json.loads(metrics_path.read_text())["decoding"]
    assert decoding["beam_size"] == 3 and decoding["length_penalty"] == 0.6 and decoding["no_repeat_ngram"] == 3


def test_lstm_decoder_trains_captions_and_evaluates(synthetic_dataset, tmp_path, capsys):
    d = synthetic_dataset
    out = tmp_path / "lstm"
    code = main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions),
                 "--train-images", str(d.train_images), "--val-captions", str(d.val_captions),
                 "--val-images", str(d.val_images), "--out", str(out), "--epochs", "1", "--decoder", "lstm", *TINY])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["model"]["decoder"] == "lstm"
    image = str(sorted(d.val_images.iterdir())[0])
    for flags in (["--beam-size", "3", "--num-captions", "2"], ["--sample", "--num-captions", "2", "--seed", "1"]):
        capsys.readouterr()
        assert main(["caption", "--checkpoint", str(out / "best.pt"), image, "--json", "--device", "cpu", *flags]) == 0
        assert len(json.loads(capsys.readouterr().out)["captions"]) == 2
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--dataset", "coco", "--captions",
                 str(d.val_captions), "--images", str(d.val_images), "--device", "cpu"]) == 0


def test_evaluate_all_metrics_per_image_scores_and_report(trained_run, synthetic_dataset, tmp_path, capsys):
    pytest.importorskip("pycocoevalcap", reason="pip install captioner[coco-eval]")
    metrics_path, per_image, report = tmp_path / "m.json", tmp_path / "per_image.jsonl", tmp_path / "report.html"
    code = main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--dataset", "coco",
                 "--captions", str(synthetic_dataset.val_captions), "--images", str(synthetic_dataset.val_images),
                 "--metrics", "all", "--out", str(metrics_path), "--per-image", str(per_image), "--report", str(report),
                 "--device", "cpu"])
    assert code == 0
    metrics = json.loads(metrics_path.read_text())
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(metrics)
    assert "SPICE" in metrics["skipped_metrics"]
    assert ("METEOR" in metrics) != ("METEOR" in metrics["skipped_metrics"])  # computed, or skipped with a reason
    rows = [json.loads(line) for line in per_image.read_text().splitlines()]
    assert len(rows) == 8 and all(r["references"] and "CIDEr" in r["scores"] for r in rows)
    assert [r["scores"]["CIDEr"] for r in rows] == sorted(r["scores"]["CIDEr"] for r in rows)  # worst first
    page = report.read_text()
    assert page.count("data:image/jpeg;base64,") >= 8 and "Worst" in page and "Best" in page


def test_a_resume_takes_only_the_train_settings_given_on_its_command_line(tmp_path):
    """Flags typed and the --config file's train section count as given; the rest of a resumed run's settings
    come from its checkpoint (see test_resume.py, which resumes with the command a SIGTERM prints)."""
    import argparse

    from captioner.train_cli import add_train_arguments, given_train_settings

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert given_train_settings(parser.parse_args(["--resume", "run/last.pt"])) == set()
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"model": {"dim": 64}, "train": {"epochs": 40, "lr": 5e-4}}))
    args = parser.parse_args(["--config", str(config), "--scst-epochs", "3", "--image-size", "96"])
    assert given_train_settings(args) == {"epochs", "lr", "scst_epochs"}  # --image-size is a data setting


def test_a_resume_without_out_writes_to_the_checkpoints_folder_and_names_settings_it_keeps(
        synthetic_dataset, tmp_path, monkeypatch, caplog):
    d = synthetic_dataset
    (tmp_path / "first").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    assert main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", "run", "--epochs", "1", *TINY]) == 0  # a relative --out
    monkeypatch.chdir(tmp_path / "elsewhere")
    with caplog.at_level("WARNING", logger="captioner"):
        assert main(["train", "--resume", "../first/run/last.pt", "--epochs", "2", "--lr", "0.5", "--no-progress",
                     "--device", "cpu", "--dim", "64", "--train-images", "elsewhere"]) == 0
    log = [json.loads(line) for line in (tmp_path / "first" / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1, 2]
    assert not (tmp_path / "elsewhere" / "run").exists()
    assert "resuming with the run's own lr=0.001 (a resume keeps them; given: lr=0.5)" in caplog.text
    assert "--resume continues the run with its own model and data settings; ignored: " in caplog.text
    assert "--train-images" in caplog.text and "--dim" in caplog.text


def test_a_flag_of_another_dataset_is_refused_not_ignored(tmp_path, capsys):
    code = main(["train", "--dataset", "flickr8k", "--root", str(tmp_path), "--train-captions", "captions.json",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--dataset flickr8k reads --root; --train-captions belongs to another dataset" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, usage", [
    (["evaluate", "--checkpoint", "run/best.pt", "--beam", "3", "--bogus"], "usage: captioner evaluate"),
    (["benchmark", "decode", "--bogus"], "usage: captioner benchmark decode"),
    (["benchmark", "--bogus", "decode"], "usage: captioner benchmark [-h]"),
    (["--bogus", "demo"], "usage: captioner [-h]"),
])
def test_an_unknown_flag_is_reported_with_its_commands_usage(capsys, argv, usage):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(usage) and "error: unrecognized arguments: --bogus" in err
