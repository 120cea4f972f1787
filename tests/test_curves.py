"""Training curves: `captioner plot RUN` and `train --tensorboard`."""

import json
import sys

import pytest
from PIL import Image

from captioner.cli import main
from captioner.curves import read_log, write_epoch_scalars
from conftest import TINY


def test_plot_writes_one_png_per_curve(trained_run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", str(trained_run), "--out", str(out)]) == 0
    written = json.loads(capsys.readouterr().out)["plots"]
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["lr.png", "train_loss.png", "val_bleu.png"]
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width >= 400


def test_plot_defaults_to_the_run_folder_and_reads_the_last_record_of_each_epoch(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": 1, "train_loss": 3.0, "lr": 1e-3}, {"epoch": 2, "train_loss": 2.0, "lr": 5e-4},
               {"epoch": 2, "train_loss": 1.5, "lr": 4e-4}]  # epoch 2 logged again by a resumed run
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [r["train_loss"] for r in read_log(run)] == [3.0, 1.5]
    assert main(["plot", str(run / "log.jsonl")]) == 0
    assert sorted(p.name for p in run.glob("*.png")) == ["lr.png", "train_loss.png"]  # no BLEU in this log


@pytest.mark.parametrize("content,message", [(None, "no such file"), ('{"epoch": 1}\n{oops\n', "line 2: not JSON"),
                                             ('{"loss": 1}\n', "line 1: expected a JSON object"),
                                             ("\n", "no epoch records")])
def test_plot_bad_logs_are_clear_errors(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "log.jsonl").write_text(content)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "log.jsonl" in err and "Traceback" not in err


def test_epoch_scalars_read_back_from_tensorboard_events(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    for epoch, bleu in ((1, 0.25), (2, 0.5)):
        write_epoch_scalars(tmp_path, {"epoch": epoch, "val_Bleu_4": bleu, "lr": 1e-3 / epoch, "example": "a cat",
                                       "strict": True})
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"val_Bleu_4", "lr"}  # numbers only, not text or flags
    assert [(e.step, e.value) for e in events.Scalars("val_Bleu_4")] == [(1, 0.25), (2, 0.5)]


def test_tensorboard_missing_is_a_clear_error_before_training(monkeypatch, synthetic_dataset, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    d = synthetic_dataset
    code = main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--tensorboard", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'captioner[tensorboard]'" in err
    assert not (tmp_path / "run").exists()


def test_train_with_tensorboard_writes_a_scalar_per_epoch(synthetic_dataset, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    d = synthetic_dataset
    run = tmp_path / "run"
    code = main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(run), "--epochs", "1", "--val-limit", "2", "--tensorboard", *TINY])
    assert code == 0
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = json.loads((run / "log.jsonl").read_text())
    (scalar,) = events.Scalars("train_loss")
    assert scalar.step == 1 and scalar.value == pytest.approx(logged["train_loss"], rel=1e-6)  # stored as float32
    assert {"val_Bleu_4", "lr"} <= set(events.Tags()["scalars"])
