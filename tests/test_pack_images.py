"""captioner pack-images: small Flickr8k- and COCO-layout trees made here, packed, and read back by the loaders;
plus ~50 real Flickr8k images from ../shared/data (skipped where absent)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli import main
from captioner.data import load_coco, load_flickr8k, load_image
from captioner.data.dataset import CaptionDataset
from captioner.pack import SETTINGS_FILE, pack_images
from conftest import SHARED_DATA

FLICKR8K = SHARED_DATA / "flickr8k"
SIZE = 32


def _image(path: Path, size: tuple[int, int], fmt: str | None = None, mode: str = "RGB", **save) -> Path:
    pixels = np.random.default_rng(len(path.name)).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(), mode).save(path, fmt, **save)
    return path


def _flickr_tree(root: Path) -> Path:
    """Flickr8k as distributed: large and small JPEGs, a phone photo stored sideways, a PNG with alpha."""
    images, text = root / "Flicker8k_Dataset", root / "Flickr8k_text"
    images.mkdir(parents=True)
    text.mkdir()
    _image(images / "wide.jpg", (90, 60))
    _image(images / "tall.JPG", (60, 96))
    _image(images / "small.jpg", (20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80x40, shown (and trained on) as 40x80
    _image(images / "phone.jpeg", (80, 40), exif=exif.tobytes())
    _image(images / "alpha.png", (64, 48), mode="RGBA")
    names = ["wide.jpg", "tall.JPG", "small.jpg", "phone.jpeg", "alpha.png"]
    tokens = [f"{n}#{k}\t{n.split('.')[0]} caption {k} ." for n in names for k in range(5)]
    (text / "Flickr8k.token.txt").write_text("\r\n".join(tokens) + "\r\n")
    (text / "Flickr_8k.trainImages.txt").write_text("tall.JPG\nwide.jpg\nsmall.jpg\nphone.jpeg\n")
    (text / "Flickr_8k.devImages.txt").write_text("alpha.png\n")
    return root


def _coco_tree(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    sizes = {7: (100, 75), 3: (48, 64), 12: (24, 16)}
    for image_id, size in sizes.items():
        _image(root / "train2017" / f"{image_id:012d}.jpg", size)
    doc = {"info": {}, "licenses": [],
           "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in sizes.items()],
           "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"Thing {i} number {k}."}
                           for i in sizes for k in range(2)]}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(doc, indent=1))
    return root


def _files(root: Path) -> dict[Path, Path]:
    """The mirrored files (not the note of how DST was packed, which SRC does not have)."""
    return {p.relative_to(root): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != SETTINGS_FILE}


def test_flickr8k_tree_packs_and_loads_the_same(tmp_path):
    src, dst = _flickr_tree(tmp_path / "src"), tmp_path / "dst"
    summary = pack_images(src, dst, size=SIZE, workers=1, progress=False)
    counts = (summary.images, summary.packed, summary.up_to_date, summary.unreadable, summary.other_files)
    assert counts == (5, 5, 0, 0, 3)
    assert summary.bytes_after == sum(p.stat().st_size for p in _files(dst).values())
    assert json.loads((dst / SETTINGS_FILE).read_text()) == {"size": SIZE, "quality": 85, "square": False}
    assert _files(dst).keys() == _files(src).keys()  # same tree, same names (tall.JPG keeps its case)
    for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt"):
        assert (dst / "Flickr8k_text" / name).read_bytes() == (src / "Flickr8k_text" / name).read_bytes()

    packed = dst / "Flicker8k_Dataset"
    sizes = {p.name: Image.open(p).size for p in packed.iterdir()}
    assert sizes == {"wide.jpg": (48, 32), "tall.JPG": (32, 51), "small.jpg": (20, 30),  # never enlarged
                     "phone.jpeg": (32, 64), "alpha.png": (43, 32)}
    with Image.open(packed / "phone.jpeg") as phone:  # turned upright once, and no tag to turn it again
        assert phone.format == "JPEG" and 0x0112 not in phone.getexif()
    with Image.open(packed / "alpha.png") as alpha:
        assert alpha.format == "PNG" and alpha.mode == "RGB"  # what training sees: RGB over white
    assert all(load_image(p).mode == "RGB" for p in packed.iterdir())

    for split in ("train", "dev"):
        before, after = load_flickr8k(src, split), load_flickr8k(dst, split)
        assert [(r.image_id, r.captions) for r in after] == [(r.image_id, r.captions) for r in before]
        assert [r.path for r in after] == [dst / r.path.relative_to(src) for r in before]
        assert all(r.path.is_file() for r in after)


def test_coco_tree_packs_with_a_process_pool_and_loads_the_same(tmp_path):
    src, dst = _coco_tree(tmp_path / "coco"), tmp_path / "packed"
    summary = pack_images(src, dst, size=SIZE, quality=70, workers=2, progress=False)
    assert (summary.images, summary.packed, summary.other_files) == (3, 3, 1)
    assert summary.bytes_after < summary.bytes_before
    captions = "annotations/captions_train2017.json"
    assert (dst / captions).read_bytes() == (src / captions).read_bytes()
    before, after = load_coco(src / captions, src / "train2017"), load_coco(dst / captions, dst / "train2017")
    assert [(r.image_id, r.captions) for r in after] == [(r.image_id, r.captions) for r in before]
    assert [r.path for r in after] == [dst / "train2017" / r.path.name for r in before]
    assert [load_image(r.path).size for r in after] == [(32, 43), (43, 32), (24, 16)]  # ids 3, 7, 12


def test_corrupt_image_is_named_counted_and_exits_1(tmp_path):
    src, dst = _flickr_tree(tmp_path / "src"), tmp_path / "dst"
    (src / "Flicker8k_Dataset" / "broken.jpg").write_bytes(b"<html>404 not found</html>")
    (src / "Flicker8k_Dataset" / "empty.png").write_bytes(b"")
    # A real process: the exit status, stdout and stderr exactly as a user gets them.
    proc = subprocess.run([sys.executable, "-m", "captioner", "pack-images", str(src), str(dst), "--size", str(SIZE),
                           "--workers", "2"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["images"], summary["packed"], summary["unreadable"]) == (7, 5, 2)
    assert "broken.jpg" in proc.stderr and "not a recognised image format" in proc.stderr
    assert "empty.png" in proc.stderr and "file is empty" in proc.stderr
    assert "2 of 7 image(s) could not be read" in proc.stderr
    assert not (dst / "Flicker8k_Dataset" / "broken.jpg").exists()
    assert len(list((dst / "Flicker8k_Dataset").iterdir())) == 5


def test_rerun_is_incremental_and_cleans_up_after_a_killed_run(tmp_path, capsys):
    src, dst = _flickr_tree(tmp_path / "src"), tmp_path / "dst"
    args = ["pack-images", str(src), str(dst), "--size", str(SIZE), "--workers", "1"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["packed"], second["up_to_date"], second["other_files"]) == (0, 5, 3)
    assert second["bytes_after"] == first["bytes_after"]

    packed = dst / "Flicker8k_Dataset"
    edited = src / "Flicker8k_Dataset" / "wide.jpg"
    os.utime(edited, ns=(packed.joinpath("wide.jpg").stat().st_mtime_ns + 10**9,) * 2)  # edited since
    (packed / "small.jpg").write_bytes(b"")  # what a power cut can leave
    (packed / ".tall.JPG.x1y2z3.pack-tmp").write_bytes(b"\xff\xd8 torn")  # what a kill mid-write leaves
    assert main(args) == 0
    third = json.loads(capsys.readouterr().out)
    assert (third["packed"], third["up_to_date"]) == (2, 3)
    assert sorted(p.name for p in packed.iterdir()) == ["alpha.png", "phone.jpeg", "small.jpg", "tall.JPG", "wide.jpg"]
    assert load_image(packed / "small.jpg").size == (20, 30)


def test_square_copies_are_training_size_and_load_without_resizing(tmp_path):
    src, dst = _flickr_tree(tmp_path / "src"), tmp_path / "dst"
    summary = pack_images(src, dst, size=SIZE, workers=1, progress=False, square=True)
    assert (summary.images, summary.packed, summary.unreadable) == (5, 5, 0)
    packed = dst / "Flicker8k_Dataset"
    sizes = {p.name: Image.open(p).size for p in packed.iterdir()}
    assert sizes == {"wide.jpg": (32, 32), "tall.JPG": (32, 32), "small.jpg": (20, 30),  # never enlarged
                     "phone.jpeg": (32, 32), "alpha.png": (32, 32)}
    before, after = load_flickr8k(src, "train"), load_flickr8k(dst, "train")
    assert [(r.image_id, r.captions) for r in after] == [(r.image_id, r.captions) for r in before]
    # Training reads a square copy's stored picture as it is: no resizing left to do when loading
    for item in CaptionDataset(after, SIZE):
        stored = torch.from_numpy(np.array(load_image(item["path"]))).permute(2, 0, 1)  # (3, H, W)
        if stored.shape[1:] == (SIZE, SIZE):
            assert torch.equal(item["image"], stored)


def test_a_copy_is_not_added_to_with_other_settings(tmp_path, capsys):
    src, dst = _flickr_tree(tmp_path / "src"), tmp_path / "dst"
    base = ["pack-images", str(src), str(dst), "--workers", "1"]
    assert main(base + ["--size", str(SIZE)]) == 0
    capsys.readouterr()
    before = {path: path.read_bytes() for path in _files(dst).values()}
    for other, words in [(["--size", str(SIZE), "--square"], f"--size {SIZE} --quality 85 --square"),
                         (["--size", "64"], "--size 64 --quality 85"),
                         (["--size", str(SIZE), "--quality", "70"], f"--size {SIZE} --quality 70")]:
        assert main(base + other) == 2
        err = capsys.readouterr().err
        assert f"'{dst}' was packed with --size {SIZE} --quality 85, this run asks for {words};" in err
    assert {path: path.read_bytes() for path in _files(dst).values()} == before  # untouched
    assert main(base + ["--size", str(SIZE)]) == 0  # the same settings again: an incremental run
    assert json.loads(capsys.readouterr().out)["up_to_date"] == 5

    (dst / SETTINGS_FILE).unlink()  # a copy that does not say how it was packed is not added to either
    assert main(base + ["--size", str(SIZE)]) == 2
    assert f"'{dst}' is not empty and has no {SETTINGS_FILE}" in capsys.readouterr().err


def test_refusals_exit_2_and_name_the_paths(tmp_path, capsys):
    src = _flickr_tree(tmp_path / "src")
    for dst, words in [(src / "packed", "lies inside the source"), (src, "is the source"),
                       (src / "Flickr8k_text" / "..", "is the source")]:
        assert main(["pack-images", str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert words in err and f"'{dst}'" in err and f"'{src}'" in err
    assert main(["pack-images", str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 2
    assert "'" + str(tmp_path / "nowhere") + "' does not exist" in capsys.readouterr().err
    assert main(["pack-images", str(src), str(tmp_path / "dst"), "--size", "0"]) == 2
    assert "--size" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() and not (src / "packed").exists()


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"real Flickr8k not found at {FLICKR8K}")
def test_real_flickr8k_subset_packs_to_128px(tmp_path):
    src, dst = tmp_path / "flickr8k", tmp_path / "packed"
    names = (FLICKR8K / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split()[:50]
    (src / "Flicker8k_Dataset").mkdir(parents=True)
    for name in names:
        shutil.copyfile(FLICKR8K / "Flicker8k_Dataset" / name, src / "Flicker8k_Dataset" / name)
    (src / "Flickr8k_text").mkdir()
    (src / "Flickr8k_text" / "Flickr_8k.trainImages.txt").write_text("\n".join(names) + "\n")
    tokens = (FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    keep = set(names)
    (src / "Flickr8k_text" / "Flickr8k.token.txt").write_text(
        "\n".join(t for t in tokens if t.split("#")[0] in keep) + "\n", encoding="utf-8")

    summary = pack_images(src, dst, size=128, quality=85, workers=2, progress=False)
    assert (summary.images, summary.packed, summary.unreadable) == (50, 50, 0)
    assert summary.bytes_after < summary.bytes_before / 2
    before, after = load_flickr8k(src, "train"), load_flickr8k(dst, "train")
    assert len(after) == 50 and [(r.image_id, r.captions) for r in after] == [(r.image_id, r.captions) for r in before]
    for record in after:
        original = Image.open(src / "Flicker8k_Dataset" / record.image_id).size
        packed = load_image(record.path).size
        assert min(packed) == min(128, min(original))
        assert abs(packed[0] / packed[1] - original[0] / original[1]) < 0.02
