"""Trunk pre-training on the captions' words (captioner/pretrain.py): the tag vocabulary and targets, the metric
it selects by, that it learns, that its file loads as --encoder-weights, and how `train` runs and reuses it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.cli import main
from captioner.config import RunConfig
from captioner.data.records import ImageRecord
from captioner.models.encoder import ResNet18Trunk, load_resnet18
from captioner.pretrain import MIRRORED_WORDS, mean_average_precision, pretrain_trunk, pretraining_settings, \
    tag_loss, tag_targets, tag_vocabulary

from conftest import TINY


def record(n: int, *captions: str) -> ImageRecord:
    return ImageRecord(n, Path(f"/nowhere/{n}.jpg"), captions)


def test_tag_vocabulary_keeps_content_words_used_by_enough_images_most_used_first():
    records = [record(0, "A dog runs on the grass .", "The dog is running"),
               record(1, "a dog and a cat", "two cats"),
               record(2, "a cat on the left", "grass"),
               record(3, "a red ball on the left")]
    # per image: dog 2, cat 2, grass 2, left 2, running/runs/two/cats/red/ball 1; "a", "the", "on", "is" are stopwords
    assert tag_vocabulary(records, 10, min_images=2) == ["cat", "dog", "grass", "left"]
    assert tag_vocabulary(records, 2, min_images=2) == ["cat", "dog"]
    assert tag_vocabulary(records, 10, min_images=2, exclude=MIRRORED_WORDS) == ["cat", "dog", "grass"]
    assert tag_vocabulary(records, 10, min_images=3) == []


def test_tag_targets_are_the_share_of_an_images_captions_using_the_word():
    records = [record(0, "a dog runs", "the dog sits", "a cat", "grass", "a dogged man"),
               record(1, "nothing here")]
    targets = tag_targets(records, ["dog", "cat", "grass"])
    assert torch.allclose(targets, torch.tensor([[0.4, 0.2, 0.2], [0.0, 0.0, 0.0]]))


def test_mean_average_precision():
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    perfect = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.9, 0.5], [0.8, 0.2, 0.5], [0.0, 0.0, 0.5]])
    assert mean_average_precision(perfect, labels) == pytest.approx(1.0)  # tag 3 has no positive: left out
    # tag 1's positives ranked 2nd and 4th: AP = (1/2 + 2/4) / 2; tag 2's only positive ranked 3rd: AP = 1/3
    worse = torch.tensor([[0.8, 0.1, 0.0], [0.9, 0.2, 0.0], [0.1, 0.9, 0.0], [0.5, 0.8, 0.0]])
    assert mean_average_precision(worse, labels) == pytest.approx((0.5 + 1 / 3) / 2)


def test_softmax_tag_loss_is_the_cross_entropy_against_the_normalised_targets_of_tagged_images():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 3.0, 0.0]])
    targets = torch.tensor([[0.6, 0.2, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # the second image has no tag
    log_p = torch.log_softmax(logits, dim=1)
    expected = (-(0.75 * log_p[0, 0] + 0.25 * log_p[0, 1]) - (0.5 * log_p[2, 1] + 0.5 * log_p[2, 2])) / 2
    assert tag_loss(logits, targets, "softmax") == pytest.approx(expected.item())
    assert tag_loss(logits, targets, "sigmoid") == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item())
    with pytest.raises(ValueError, match="tag loss"):
        tag_loss(logits, targets, "hinge")


def colour_dataset(folder: Path, count: int, offset: int = 0) -> list[ImageRecord]:
    """Solid red or blue squares, captioned by their colour: tags any trunk must learn to tell apart."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for n in range(offset, offset + count):
        name, rgb = ("red", (200, 30, 30)) if n % 2 else ("blue", (30, 30, 200))
        path = folder / f"{n}.png"
        Image.new("RGB", (40, 40), rgb).save(path)
        records.append(ImageRecord(n, path, (f"a {name} square", f"the square is {name}")))
    return records


def pretraining_config(out: Path, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.data.image_size = 32
    cfg.train.out = str(out)
    cfg.train.batch_size = 8
    cfg.train.device = "cpu"
    cfg.train.trunk_pretrain_epochs = 3
    cfg.train.trunk_pretrain_crop = 0.5
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


@pytest.mark.parametrize("loss, clip_grad", [("sigmoid", 1.0), ("softmax", 1.0), ("sigmoid", 0.0)])  # 0: no clip
def test_pretraining_learns_the_tags_and_writes_a_trunk_that_encoder_weights_loads(tmp_path, loss, clip_grad):
    train = colour_dataset(tmp_path / "train", 32)
    val = colour_dataset(tmp_path / "val", 8, offset=100)
    cfg = pretraining_config(tmp_path, trunk_pretrain_loss=loss, clip_grad=clip_grad)
    summary = pretrain_trunk(cfg, train, val, tmp_path / "trunk.pt", torch.device("cpu"), progress=False)
    assert summary["tags"] == ["square", "blue", "red"]  # "square" is in every caption; blue and red in half
    assert summary["best_val_map"] == pytest.approx(1.0)  # every red square ranked above every blue one
    losses = [epoch["loss"] for epoch in summary["history"]]
    assert losses[-1] < 0.8 * losses[0]
    saved = torch.load(tmp_path / "trunk.pt", weights_only=True)
    assert saved["best_epoch"] == summary["best_epoch"] and len(saved["history"]) == 3
    trunk = ResNet18Trunk(str(tmp_path / "trunk.pt"), trainable_layers=5, stages=5)
    assert torch.equal(trunk.suffix[0][0].weight, saved["state_dict"]["conv1.weight"])  # conv1 of the saved trunk
    torch.manual_seed(cfg.train.seed)  # what pre-training started from: the seeded random initialisation
    assert not torch.equal(trunk.suffix[0][0].weight, load_resnet18("none").conv1.weight)


def run_flags(d, out: Path) -> list[str]:
    return ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
            str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
            "--out", str(out), "--epochs", "1", "--trunk-pretrain-epochs", "1", *TINY]


def test_train_pretrains_first_then_reuses_the_trunk_only_while_its_settings_hold(synthetic_dataset, tmp_path,
                                                                                   caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="captioner")
    assert main(run_flags(synthetic_dataset, out)) == 0
    trunk_file = out / "trunk_pretrained.pt"
    assert "pre-training the trunk on" in caplog.text and trunk_file.is_file()
    saved = RunConfig.load(out / "config.json")  # the recipe, not the file: --config RUN/config.json reuses it
    assert saved.model.encoder_weights == "none" and saved.train.trunk_pretrain_epochs == 1
    # The default trunk keeps conv1..layer2 frozen, so the captioner still holds the pre-trained weights there
    trunk = torch.load(trunk_file, weights_only=True)["state_dict"]
    captioner = torch.load(out / "best.pt", weights_only=True)["model"]
    assert torch.equal(captioner["encoder.prefix.0.0.weight"], trunk["conv1.weight"])
    assert torch.equal(captioner["encoder.prefix.2.1.bn2.running_var"], trunk["layer2.1.bn2.running_var"])
    made = trunk_file.stat().st_mtime_ns

    caplog.clear()
    assert main(run_flags(synthetic_dataset, out)) == 2  # the folder holds a run: only --overwrite starts over
    assert main([*run_flags(synthetic_dataset, out), "--overwrite"]) == 0  # the same run again: the trunk is kept
    assert "using the pre-trained trunk" in caplog.text and trunk_file.stat().st_mtime_ns == made
    again = torch.load(out / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(again[k], captioner[k]) for k in captioner)  # and the run is the same run

    caplog.clear()
    assert main([*run_flags(synthetic_dataset, out), "--trunk-pretrain-lr", "0.001", "--overwrite"]) == 0
    assert "pre-training again" in caplog.text and trunk_file.stat().st_mtime_ns != made


def test_the_settings_a_trunk_is_reused_under_change_with_the_captions_and_the_validation_split(tmp_path):
    images = colour_dataset(tmp_path / "images", 4)
    cfg = pretraining_config(tmp_path)
    settings = pretraining_settings(cfg, images[:3], images[3:])
    assert pretraining_settings(cfg, images[:3], images[3:]) == settings
    recaptioned = [images[0], ImageRecord(1, images[1].path, ("a green square",)), images[2]]
    assert pretraining_settings(cfg, recaptioned, images[3:]) != settings
    assert pretraining_settings(cfg, images[:3], images[2:]) != settings
    cfg.train.clip_grad = 0.0
    assert pretraining_settings(cfg, images[:3], images[3:]) != settings


def test_pretrain_trunk_command_needs_epochs(tmp_path, capsys):
    assert main(["pretrain-trunk", "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "--trunk-pretrain-epochs" in capsys.readouterr().err


def test_pretrain_trunk_command_writes_a_trunk_for_encoder_weights(synthetic_dataset, tmp_path, capsys):
    d = synthetic_dataset
    flags = ["pretrain-trunk", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
             str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
             "--out", str(tmp_path), "--trunk-pretrain-epochs", "1", "--image-size", "32", "--batch-size", "16",
             "--device", "cpu", "--no-progress"]
    assert main([*flags, "--trunk-pretrain-cache", str(tmp_path / "trunks")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["path"] == str((tmp_path / "trunk_pretrained.pt").absolute()) and printed["best_epoch"] == 1
    # stored for train runs given the same cache and settings
    assert [p.read_bytes() for p in (tmp_path / "trunks").glob("*.pt")] == [Path(printed["path"]).read_bytes()]
    assert 0.0 <= printed["best_val_map"] <= 1.0 and printed["tags"] > 0
    trunk = ResNet18Trunk(printed["path"], trainable_layers=5, stages=5)
    saved = torch.load(printed["path"], weights_only=True)["state_dict"]
    assert torch.equal(trunk.suffix[1][0].conv1.weight, saved["layer1.0.conv1.weight"])
    assert main([*flags, "--resume", "x.pt"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_runs_given_a_trunk_cache_pretrain_each_trunk_once_and_share_it(synthetic_dataset, tmp_path, caplog):
    cache = tmp_path / "trunks"
    caplog.set_level(logging.INFO, logger="captioner")
    assert main([*run_flags(synthetic_dataset, tmp_path / "a"), "--trunk-pretrain-cache", str(cache)]) == 0
    assert "pre-training the trunk on" in caplog.text
    first = (tmp_path / "a" / "trunk_pretrained.pt").read_bytes()
    assert [p.read_bytes() for p in cache.glob("*.pt")] == [first]

    caplog.clear()  # another run with the same pre-training settings copies it (its own captioning differs)
    assert main([*run_flags(synthetic_dataset, tmp_path / "b"), "--trunk-pretrain-cache", str(cache),
                 "--dropout", "0.3"]) == 0
    assert "copied the pre-trained trunk" in caplog.text and "pre-training the trunk on" not in caplog.text
    assert (tmp_path / "b" / "trunk_pretrained.pt").read_bytes() == first

    caplog.clear()  # other pre-training settings: another trunk, trained and stored beside the first
    assert main([*run_flags(synthetic_dataset, tmp_path / "c"), "--trunk-pretrain-cache", str(cache),
                 "--trunk-pretrain-lr", "0.001"]) == 0
    assert "pre-training the trunk on" in caplog.text and len(list(cache.glob("*.pt"))) == 2


def test_a_run_waits_while_another_pretrains_the_same_trunk_and_not_for_another_trunk(tmp_path):
    import threading

    from captioner.shared_trunks import SharedTrunk

    entered = threading.Event()

    def second_run():
        with SharedTrunk(tmp_path, {"seed": 0}):
            entered.set()

    with SharedTrunk(tmp_path, {"seed": 0}):
        waiting = threading.Thread(target=second_run)
        waiting.start()
        assert not entered.wait(0.5), "a second run went in while the first held the same trunk's lock"
        with SharedTrunk(tmp_path, {"seed": 1}):  # another trunk's lock is free
            pass
    waiting.join(10)
    assert entered.is_set()
