"""The real formats end to end: COCO's official files (coco-mini) and Flickr8k as distributed.

These read ../shared/data (never copied into the repository) and skip when it is absent."""

import json
import shutil
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


def _cocoevalcap_scores(annotation_file, results_file, monkeypatch):
    """What coco-caption's COCOEvalCap reports for a results file (SPICE stubbed out: it needs a download)."""
    import pycocoevalcap.eval as coco_eval_module
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval_module, "Spice", NoSpice)
    coco = COCO(str(annotation_file))
    evaluator = coco_eval_module.COCOEvalCap(coco, coco.loadRes(str(results_file)))
    evaluator.params["image_id"] = evaluator.cocoRes.getImgIds()
    evaluator.evaluate()
    return evaluator.eval


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"real COCO sample not found at {COCO_MINI}")
@pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption's PTB tokenizer and METEOR need Java")
@pytest.mark.parametrize("source", ["human", "model"])
def test_metrics_all_equal_cocoevalcap_on_coco_mini(source, trained_run, tmp_path, monkeypatch):
    """`evaluate --metrics all` reports what COCOEvalCap reports for the same results file: once for human
    captions (one reference held out per image, real punctuation and clitics), once for a model's captions."""
    pytest.importorskip("pycocoevalcap", reason="pip install captioner[coco-eval]")
    from captioner.data.coco import load_coco
    from captioner.scoring import score_captions

    captions, images = COCO_MINI / "annotations" / "captions_train2017.json", COCO_MINI / "train2017"
    results, metrics_path = tmp_path / "results.json", tmp_path / "metrics.json"
    if source == "model":
        assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--dataset", "coco", "--captions",
                     str(captions), "--images", str(images), "--metrics", "all", "--results", str(results),
                     "--out", str(metrics_path), "--device", "cpu"]) == 0
        ours = json.loads(metrics_path.read_text())
    else:
        records = load_coco(captions, images)
        hypotheses = {r.image_id: r.captions[0] for r in records}
        references = {r.image_id: list(r.captions[1:]) for r in records}
        results.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in hypotheses.items()]))
        held_out = json.loads(captions.read_text())
        first = {}
        for a in held_out["annotations"]:
            first.setdefault(a["image_id"], a["id"])
        held_out["annotations"] = [a for a in held_out["annotations"] if first[a["image_id"]] != a["id"]]
        captions = tmp_path / "references.json"
        captions.write_text(json.dumps(held_out))
        ours = score_captions(references, hypotheses, "all")[0]
    assert ours["tokenization"] == "ptb"
    theirs = _cocoevalcap_scores(captions, results, monkeypatch)
    for metric in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L", "METEOR"):
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-6), metric
