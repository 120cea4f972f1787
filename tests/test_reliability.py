"""Defined behaviour for bad input and failed training steps: a message naming the file, exit status 1 for
failed items and 2 for usage errors, never a traceback; fuzzed annotation files and image bytes raise only
the documented error types."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.data import load_coco, load_flickr8k, load_image
from captioner.data.karpathy import load_karpathy
from captioner.engine import EpochTotals, NonFiniteLossError, train_one_epoch
from captioner.errors import DatasetFormatError, ImageReadError
from conftest import TINY, tiny_model


def write_image_zoo(folder: Path, photo: Path) -> tuple[list[str], list[str]]:
    """Every kind of image file a real folder holds, made from one good `photo`. -> (readable, unreadable) names.

    Readable: a plain JPEG, grayscale, CMYK, RGBA and 16-bit PNGs, a phone photo stored sideways with an EXIF
    orientation tag. Unreadable: zero bytes, a truncated download, a corrupt JPEG, text saved as .jpg, and a
    decompression bomb (a small file claiming 10,000 x 10,000 pixels, over the decoding limit).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(photo).convert("RGB")
    rgb.save(folder / "plain.jpg", quality=90)
    rgb.convert("L").save(folder / "grayscale.jpg")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "rgba.png")
    deep = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "sixteen_bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: "rotate 90 clockwise to display"
    rgb.transpose(Image.Transpose.ROTATE_90).save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    readable = ["plain.jpg", "grayscale.jpg", "cmyk.jpg", "rgba.png", "sixteen_bit.png", "exif_rotated.jpg"]

    jpeg = (folder / "plain.jpg").read_bytes()
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "corrupt.jpg").write_bytes(jpeg[:2] + bytes(range(256)) * 8)  # JPEG magic, then garbage
    (folder / "not_an_image.jpg").write_text("<html><body>404 Not Found</body></html>")
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")  # a few KB on disk, 100 megapixels decoded
    unreadable = ["zero_bytes.jpg", "truncated.jpg", "corrupt.jpg", "not_an_image.jpg", "bomb.png"]
    return readable, unreadable


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """A real process, so stdout, stderr and the exit status are exactly what a user sees."""
    return subprocess.run([sys.executable, "-m", "captioner.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_caption_folder_of_every_bad_image_kind(trained_run, synthetic_dataset, tmp_path):
    photo = sorted(synthetic_dataset.val_images.iterdir())[0]
    readable, unreadable = write_image_zoo(tmp_path / "zoo", photo)
    proc = run_cli("caption", "--checkpoint", str(trained_run / "best.pt"), str(tmp_path / "zoo"), "--device",
                   "cpu", "--json")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    captioned = {Path(json.loads(line)["path"]).name: json.loads(line)["captions"][0]["caption"]
                 for line in proc.stdout.splitlines()}
    assert sorted(captioned) == sorted(readable)
    assert all(text.strip() for text in captioned.values())
    for name in unreadable:
        assert name in proc.stderr, f"{name} not reported"
    assert "decompression bomb" in proc.stderr and "empty" in proc.stderr and "truncated" in proc.stderr


def test_caption_reports_a_missing_path_by_name_and_captions_the_rest(trained_run, synthetic_dataset, tmp_path):
    photos = sorted(synthetic_dataset.val_images.iterdir())[:2]
    missing = tmp_path / "missing.jpg"
    proc = run_cli("caption", "--checkpoint", str(trained_run / "best.pt"), str(photos[0]), str(missing),
                   str(photos[1]), "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(photos[0]), str(photos[1])]
    assert "missing.jpg" in proc.stderr and "not found" in proc.stderr
    assert "1 of 3 image(s) could not be read" in proc.stderr
    proc = run_cli("caption", "--checkpoint", str(trained_run / "best.pt"), str(missing), "--device", "cpu")
    assert proc.returncode == 2 and "no such image file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_output_paths_are_checked_before_decoding_and_their_folders_made(trained_run, synthetic_dataset, tmp_path,
                                                                        capsys, monkeypatch):
    """A bad output path is one clear message before any decoding (no traceback, nothing lost after the work);
    a missing parent folder is created."""
    import captioner.commands

    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    evaluate = ["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--dataset", "coco", "--captions",
                str(synthetic_dataset.val_captions), "--images", str(synthetic_dataset.val_images), "--device", "cpu"]
    real_evaluate = captioner.commands.evaluate_loader

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started before the output paths were checked")

    monkeypatch.setattr(captioner.commands, "evaluate_loader", no_decoding)
    for flag, path, message in (("--out", tmp_path / "a_folder", "it is a folder"),
                                ("--per-image", tmp_path / "a_file" / "p.jsonl", f"{tmp_path / 'a_file'} is a file"),
                                ("--results", tmp_path / "a_file" / "deeper" / "r.json",
                                 f"{tmp_path / 'a_file'} is a file, not a folder")):
        assert main([*evaluate, flag, str(path)]) == 2
        assert f"cannot write {flag} {path}: {message}" in capsys.readouterr().err
    monkeypatch.setattr(captioner.commands, "evaluate_loader", real_evaluate)
    assert main([*evaluate, "--out", str(tmp_path / "new" / "deeper" / "metrics.json"), "--limit", "2"]) == 0
    assert json.loads((tmp_path / "new" / "deeper" / "metrics.json").read_text())["num_images"] == 2

    photo = sorted(synthetic_dataset.val_images.iterdir())[0]
    proc = run_cli("caption", "--checkpoint", str(trained_run / "best.pt"), str(photo), "--attention",
                   str(tmp_path / "a_file"), "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not proc.stdout, proc.stderr
    assert f"cannot write to the --attention folder {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file, not a " \
        "folder" in proc.stderr
    proc = run_cli("plot", str(trained_run), "--out", str(tmp_path / "a_file" / "plots"))
    assert proc.returncode == 2 and "cannot write to the plots' folder" in proc.stderr, proc.stderr
    proc = run_cli("plot", str(tmp_path / "typo" / "run"), "--out", str(tmp_path / "plots"))
    assert proc.returncode == 2 and not (tmp_path / "plots").exists(), proc.stderr


def test_probing_an_output_file_changes_nothing_on_disk(tmp_path):
    from captioner.checkpoint import check_writable_file

    kept = tmp_path / "metrics.json"
    kept.write_text('{"Bleu_4": 0.1}\n')
    check_writable_file(kept, "--out")
    assert kept.read_text() == '{"Bleu_4": 0.1}\n'
    check_writable_file(tmp_path / "new.json", "--out")
    assert not (tmp_path / "new.json").exists()
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")  # its target does not exist yet
    check_writable_file(link, "--out")
    assert link.is_symlink()


def test_evaluate_reports_missing_and_unreadable_images_and_scores_the_rest(trained_run, synthetic_dataset,
                                                                            tmp_path):
    images = tmp_path / "val"
    shutil.copytree(synthetic_dataset.val_images, images)
    names = sorted(p.name for p in images.iterdir())
    (images / names[0]).unlink()  # referenced by the annotations, missing on disk
    (images / names[1]).write_bytes(b"")
    proc = run_cli("evaluate", "--checkpoint", str(trained_run / "best.pt"), "--dataset", "coco", "--captions",
                   str(synthetic_dataset.val_captions), "--images", str(images), "--device", "cpu", "--out",
                   str(tmp_path / "metrics.json"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert names[0] in proc.stderr and "not found" in proc.stderr
    assert names[1] in proc.stderr and "empty" in proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == len(names) - 2 and metrics["skipped_images"] == 2


def test_training_skips_and_counts_unreadable_images_or_stops_with_strict(synthetic_dataset, tmp_path):
    images = tmp_path / "train"
    shutil.copytree(synthetic_dataset.train_images, images)
    bad = sorted(images.iterdir())[:3]
    for path in bad:
        path.write_bytes(b"not an image")
    d = synthetic_dataset
    common = ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
              str(images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images), "--epochs",
              "1", *TINY]
    assert main([*common, "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert record["skipped_images"] == 3 and record["images"] == 48 - 3

    proc = run_cli(*common, "--out", str(tmp_path / "strict"), "--strict")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert any(path.name in proc.stderr for path in bad) and "not a recognised image format" in proc.stderr


def test_strict_training_stops_on_an_image_a_loader_worker_cannot_read(synthetic_dataset, tmp_path):
    """The error comes from a worker process (a trained trunk needs no calibration pass in the main process); the
    run exits with it, one line naming the file, rather than waiting forever on workers that ignore SIGTERM."""
    images = tmp_path / "train"
    shutil.copytree(synthetic_dataset.train_images, images)
    bad = sorted(images.iterdir())[5]
    bad.write_bytes(bad.read_bytes()[:300])
    d = synthetic_dataset
    proc = subprocess.run(
        [sys.executable, "-m", "captioner.cli", "train", "--dataset", "coco", "--train-captions", str(d.train_captions),
         "--train-images", str(images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
         "--epochs", "1", *TINY, "--trainable-layers", "3", "--workers", "2", "--strict",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error == f"captioner train: error: cannot read image '{bad}': file is truncated (an incomplete download " \
                    "or copy?): Truncated File Read", proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_image_folder_or_an_epoch_of_unreadable_images_stops_training(synthetic_dataset, tmp_path,
                                                                                 capsys):
    """Not a run that "succeeds" with every image skipped: the missing folder is named before anything starts,
    and an epoch that could read no image at all ends the run instead of saving an untrained model."""
    d = synthetic_dataset
    common = ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--val-captions",
              str(d.val_captions), "--val-images", str(d.val_images), "--epochs", "1", *TINY]
    code = main([*common, "--train-images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "missing")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"image folder not found: {tmp_path / 'nowhere'}" in err and str(d.train_captions) in err
    assert not (tmp_path / "missing" / "last.pt").exists()

    code = main([*common, "--train-images", str(d.train_images), "--out", str(tmp_path / "nothing"), "--epochs", "0"])
    assert code == 2 and "--epochs 0 with no --scst-epochs: this run would train nothing" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()

    empty = tmp_path / "empty"
    empty.mkdir()  # the folder is there, none of its images
    code = main([*common, "--train-images", str(empty), "--out", str(tmp_path / "unreadable")])
    assert code == 2  # a frozen trunk's calibration reads images before the run writes anything
    assert "none of the 48 training images read to calibrate the frozen trunk" in capsys.readouterr().err
    assert not (tmp_path / "unreadable" / "config.json").exists()
    code = main([*common, "--train-images", str(empty), "--out", str(tmp_path / "unreadable"), "--trainable-layers",
                 "3"])  # no calibration: the epoch finds it
    assert code == 2
    assert "epoch 1: no training image could be read (48 skipped" in capsys.readouterr().err
    assert not (tmp_path / "unreadable" / "best.pt").exists()


def test_a_new_run_refuses_a_folder_holding_another_run_unless_overwrite(trained_run, synthetic_dataset, tmp_path,
                                                                         capsys):
    """A typo in --out must not cost a finished run its best.pt; --overwrite starts over there on purpose."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "trunk_pretrained.pt").write_bytes(b"kept: checked against a run's settings before any reuse")
    before = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt", "log.jsonl", "config.json")}
    d = synthetic_dataset
    again = ["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
             str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
             "--out", str(run), "--epochs", "1", *TINY]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert (f"{run} holds another run (last.pt, best.pt, log.jsonl): `captioner train --resume {run / 'last.pt'}` "
            "continues it, --overwrite replaces it, or choose another --out") in err
    assert {name: (run / name).read_bytes() for name in before} == before
    # a resume into it is another run too; --overwrite never removes the checkpoint a run starts from, nor
    # anything before the run's checks have passed (here: a missing image folder)
    assert main(["train", "--resume", str(trained_run / "last.pt"), "--out", str(run), "--device", "cpu"]) == 2
    assert f"{run} holds another run" in capsys.readouterr().err
    assert main([*again, "--overwrite", "--init-from", str(run / "best.pt")]) == 2
    assert f"--init-from {run / 'best.pt'} is one of the files --overwrite would remove" in capsys.readouterr().err
    typo = [*again, "--overwrite"]
    typo[typo.index("--train-images") + 1] = str(tmp_path / "nowhere")
    assert main(typo) == 2 and "image folder not found" in capsys.readouterr().err
    unreadable = tmp_path / "unreadable"  # every training image: the frozen trunk's calibration finds none
    unreadable.mkdir()
    for image in d.train_images.iterdir():
        (unreadable / image.name).write_bytes(b"not an image")
    typo[typo.index("--train-images") + 1] = str(unreadable)
    assert main(typo) == 2
    assert ("none of the 48 training images read to calibrate the frozen trunk could be read (the first: "
            f"{unreadable}") in capsys.readouterr().err
    assert main([*again, "--overwrite", "--gpu-decode"]) == 2  # refused once the model is built (no CUDA here)
    assert "--gpu-decode decodes JPEGs with nvjpeg on a CUDA device" in capsys.readouterr().err
    assert {name: (run / name).read_bytes() for name in before} == before

    assert main([*again, "--overwrite"]) == 0
    assert [r["epoch"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())] == [1]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 != load_checkpoint(trained_run / "last.pt")["epoch"]
    assert (run / "trunk_pretrained.pt").exists()


def test_run_folder_that_cannot_be_created_is_a_clear_error(synthetic_dataset, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    d = synthetic_dataset
    code = main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(tmp_path / "a_file" / "run"), *TINY])
    assert code == 2
    assert "cannot write to the run folder" in capsys.readouterr().err


# --- non-finite losses ----------------------------------------------------------------------------------
class PoisonedBatches:
    """Wraps a model so that the forward pass of chosen batches (1-based) returns NaN logits."""

    def __init__(self, model, poisoned: set[int]):
        self.model, self.poisoned, self.calls = model, poisoned, 0
        self.real_forward = model.forward_train
        model.forward_train = self.forward_train

    def forward_train(self, *args, **kwargs):
        self.calls += 1
        out = self.real_forward(*args, **kwargs)
        if self.calls in self.poisoned:
            return out._replace(logits=out.logits * float("nan"))
        return out


def _model_and_loader(synthetic_dataset, batches: int = 3):
    from captioner.data import CaptionDataset, load_coco
    from captioner.data.collate import CaptionCollate
    from captioner.text import Tokenizer

    records = load_coco(synthetic_dataset.train_captions, synthetic_dataset.train_images)[: 4 * batches]
    tokenizer = Tokenizer.train(c for r in records for c in r.captions)
    collate = CaptionCollate(tokenizer, 24, 2)
    dataset = CaptionDataset(records, 64)
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    return model, torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)


def _optimizer(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_nonfinite_loss_stops_with_the_batch_named(synthetic_dataset):
    model, loader = _model_and_loader(synthetic_dataset)
    PoisonedBatches(model, {2})
    optimizer, scheduler = _optimizer(model)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1, batch 2"):
        train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), 1, progress=False)


def test_nonfinite_loss_skip_leaves_weights_untouched_and_counts(synthetic_dataset):
    model, loader = _model_and_loader(synthetic_dataset)
    poison = PoisonedBatches(model, {2})
    optimizer, scheduler = _optimizer(model)
    snapshots = []
    train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), 1, progress=False,
                    nonfinite="skip", totals=(totals := EpochTotals()),
                    on_batch=lambda t: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert poison.calls == 3
    assert (totals.batches, totals.steps, totals.nonfinite_steps) == (3, 2, 1)
    assert scheduler.last_epoch == 3  # the schedule moves on
    changed_by_poisoned_step = [k for k in snapshots[0] if not torch.equal(snapshots[0][k], snapshots[1][k])]
    assert not changed_by_poisoned_step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_epoch_without_a_progress_bar_logs_progress_lines(synthetic_dataset, monkeypatch, caplog):
    """Output to a file or a pipe (as here, under pytest) shows no tqdm bar: the epoch logs lines instead."""
    import captioner.engine

    model, loader = _model_and_loader(synthetic_dataset)
    optimizer, scheduler = _optimizer(model)
    monkeypatch.setattr(captioner.engine, "PROGRESS_LOG_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="captioner.engine"):
        train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), 4, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "captioner.engine"]
    assert [line.split(",")[0] for line in lines] == ["epoch 4: batch 1 of 3", "epoch 4: batch 2 of 3"]
    assert all("caption loss" in line and "img/s" in line for line in lines)
    caplog.clear()
    with caplog.at_level("INFO", logger="captioner.engine"):  # --no-progress: quiet
        train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), 5, progress=False)
    assert not [r for r in caplog.records if r.name == "captioner.engine"]


def test_nonfinite_weights_never_reach_a_checkpoint(synthetic_dataset, tmp_path, capsys):
    """An absurd learning rate blows the weights up within the first steps: the run stops, exit status 1,
    and neither best.pt nor last.pt is written from that state."""
    d = synthetic_dataset
    code = main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(tmp_path / "run"), "--epochs", "1", *TINY, "--lr", "1e30", "--clip-grad", "0",
                 "--warmup-epochs", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


# --- fuzzing ------------------------------------------------------------------------------------------------
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["images", "annotations", "id", "image_id", "file_name", "caption", "filepath",
                         "filename", "split", "sentences", "raw", "x"]), children, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(document=json_values)
def test_fuzzed_coco_and_karpathy_json_raise_only_dataset_format_errors(tmp_path, document):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(document))
    for load in (lambda: load_coco(path, tmp_path), lambda: load_karpathy(path, tmp_path, "train")):
        try:
            records = load()
        except DatasetFormatError as exc:
            assert str(path) in str(exc)
        else:
            assert all(r.captions and all(c.strip() for c in r.captions) for r in records)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzzed_json_bytes_raise_only_dataset_format_errors(tmp_path, raw):
    path = tmp_path / "annotations.json"
    path.write_bytes(raw)
    with pytest.raises(DatasetFormatError, match="annotations.json"):
        load_coco(path, tmp_path)


@FUZZ
@given(lines=st.lists(st.text(alphabet=st.sampled_from("ab.jpg#0\t \n1é"), max_size=30), max_size=6))
def test_fuzzed_flickr8k_token_files_raise_only_dataset_format_errors(tmp_path, lines):
    root = tmp_path / "flickr"
    shutil.rmtree(root, ignore_errors=True)
    (root / "Flickr8k_text").mkdir(parents=True)
    (root / "Flicker8k_Dataset").mkdir()
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(lines), encoding="utf-8")
    (root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\n")
    try:
        records = load_flickr8k(root, "train")
    except DatasetFormatError as exc:
        assert "Flickr" in str(exc)
    else:
        assert all(r.captions and all(c.strip() for c in r.captions) for r in records)


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = _jpeg_bytes()


@FUZZ
@given(data=st.data())
def test_fuzzed_image_bytes_raise_only_image_read_errors(tmp_path, data):
    """Random bytes, and a real JPEG with random bytes overwritten, cut short or appended."""
    kind = data.draw(st.sampled_from(["random", "overwrite", "cut", "append"]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=400))
    elif kind == "overwrite":
        at = data.draw(st.integers(0, len(JPEG) - 1))
        patch = data.draw(st.binary(min_size=1, max_size=16))
        raw = JPEG[:at] + patch + JPEG[at + len(patch):]
    elif kind == "cut":
        raw = JPEG[: data.draw(st.integers(0, len(JPEG)))]
    else:
        raw = JPEG + data.draw(st.binary(max_size=64))
    path = tmp_path / "fuzzed.jpg"
    path.write_bytes(raw)
    try:
        image = load_image(path)
    except ImageReadError as exc:
        assert "fuzzed.jpg" in str(exc)
    else:
        assert image.mode == "RGB" and image.width > 0 and image.height > 0


def test_whitespace_captions_dropped_non_ascii_kept(tmp_path):
    document = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "  un café à côté d'une île  "},
                                {"id": 2, "image_id": 1, "caption": " \t "},
                                {"id": 3, "image_id": 2, "caption": ""}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    records = load_coco(path, tmp_path)
    assert [(r.image_id, r.captions) for r in records] == [(1, ("un café à côté d'une île",))]
