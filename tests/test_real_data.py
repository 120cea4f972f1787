"""The real formats end to end: COCO's official files (coco-mini) and Flickr8k as distributed.

These read ../shared/data (never copied into the repository) and skip when it is absent."""

import json
import os
import subprocess
import sys

import pytest

from captioner.cli import main
from conftest import SHARED_DATA

COCO_MINI = SHARED_DATA / "coco-mini"
FLICKR8K = SHARED_DATA / "flickr8k"
TINY = ["--image-size", "64", "--dim", "32", "--heads", "4", "--decoder-layers", "1", "--batch-size", "16",
        "--device", "cpu", "--no-progress", "--vocab-size", "300"]


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"real COCO sample not found at {COCO_MINI}")
def test_coco_mini_trains_one_epoch_and_captions_every_image(tmp_path):
    captions, images = COCO_MINI / "annotations" / "captions_train2017.json", COCO_MINI / "train2017"
    # Hold out 20 images: train on 60 (official format, rewritten subset), caption all 80 including unseen ones.
    doc = json.loads(captions.read_text())
    seen = {im["id"] for im in doc["images"][:60]}
    subset = dict(doc, images=[im for im in doc["images"] if im["id"] in seen],
                  annotations=[a for a in doc["annotations"] if a["image_id"] in seen])
    train_json = tmp_path / "captions_train_subset.json"
    train_json.write_text(json.dumps(subset))
    run = tmp_path / "run"
    assert main(["train", "--dataset", "coco", "--train-captions", str(train_json), "--train-images", str(images),
                 "--val-captions", str(train_json), "--val-images", str(images), "--out", str(run),
                 "--epochs", "1", *TINY]) == 0
    proc = subprocess.run([sys.executable, "-m", "captioner.cli", "caption", "--checkpoint", str(run / "best.pt"),
                           str(images), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 80
    assert {line.split("\t")[0] for line in lines} == {str(p) for p in images.glob("*.jpg")}
    assert all(line.split("\t")[1].strip() for line in lines)


def _mini_flickr8k(root, train, dev, test):
    """A Flickr8k-layout folder over a few real images: split lists and token file filtered, images linked."""
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    train_all = (FLICKR8K / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split()
    dev_all = (FLICKR8K / "Flickr8k_text" / "Flickr_8k.devImages.txt").read_text().split()
    splits = {"train": train_all[:train], "dev": dev_all[:dev], "test": dev_all[dev : dev + test]}
    for name, files in splits.items():
        (text / f"Flickr_8k.{name}Images.txt").write_text("\n".join(files) + "\n")
    keep = {f for files in splits.values() for f in files}
    tokens = (FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines()
    (text / "Flickr8k.token.txt").write_text("\n".join(t for t in tokens if t.split("#")[0] in keep) + "\n")
    os.symlink(FLICKR8K / "Flicker8k_Dataset", root / "Flicker8k_Dataset")
    return splits


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"real Flickr8k not found at {FLICKR8K}")
def test_flickr8k_trains_and_scores_every_test_image(tmp_path):
    root = tmp_path / "flickr8k"
    splits = _mini_flickr8k(root, train=64, dev=16, test=24)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "flickr8k", "--root", str(root), "--out", str(run), "--epochs", "1",
                 *TINY]) == 0
    log = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert log["images"] == 64 and log["val_num_images"] == 16
    metrics_path = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--dataset", "flickr8k", "--root", str(root),
                 "--split", "test", "--beam-size", "2", "--out", str(metrics_path), "--device", "cpu"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["num_images"] == len(splits["test"]) == 24
    assert 0.0 <= metrics["Bleu_4"] <= metrics["Bleu_1"] <= 1.0
