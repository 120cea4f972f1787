"""captioner.data: loaders on tiny generated files in the official formats, hostile images, the dataset,
transforms; plus the shared real data (skipped where absent). Fixture images are made with PIL here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data import (
    CaptionDataset, ImageRecord, TrainAugment, images, list_images, load_coco, load_flickr8k, load_image,
    load_karpathy, normalize, resize_to_tensor,
)
from captioner.data.images import load_image_tensor
from captioner.errors import DatasetFormatError, ImageReadError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _noise(path: Path, size=(32, 24), fmt=None, **save) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt, **save)
    return path


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# --- COCO -------------------------------------------------------------------------------------------
def _coco() -> dict:
    captions = [(9, " A dog. "), (3, "A cat."), (9, "A brown dog."), (5, "   ")]
    return {"info": {}, "licenses": [], "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (9, 3, 5)],
            "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)]}


def test_load_coco_sorted_stripped_and_quiet(tmp_path, capsys):
    records = load_coco(_write_json(tmp_path / "c.json", _coco()), tmp_path / "imgs")
    assert [r.image_id for r in records] == [3, 9]  # sorted; image 5 has only a blank caption
    assert records[1] == ImageRecord(9, tmp_path / "imgs" / "9.jpg", ("A dog.", "A brown dog."))
    assert capsys.readouterr().out == ""  # pycocotools' prints are suppressed


@pytest.mark.parametrize("part, key", [
    (None, "annotations"), (None, "images"), ("annotations", "caption"), ("annotations", "image_id"),
    ("annotations", "id"), ("images", "file_name"), ("images", "id"),
])
def test_load_coco_missing_key_names_file_item_and_key(tmp_path, part, key):
    data = _coco()
    del (data[part][0] if part else data)[key]
    with pytest.raises(DatasetFormatError, match=r"c\.json") as err:
        load_coco(_write_json(tmp_path / "c.json", data), tmp_path)
    assert f"{part + '[0]' if part else 'top-level object'} is missing key '{key}'" in str(err.value)


def test_load_coco_bad_json_unknown_image_and_missing_file(tmp_path):
    data = _coco()
    data["annotations"].append({"id": 7, "image_id": 404, "caption": "x"})
    with pytest.raises(DatasetFormatError, match=r"c\.json.*annotations\[4\] refers to image_id 404"):
        load_coco(_write_json(tmp_path / "c.json", data), tmp_path)
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(DatasetFormatError, match=r"bad\.json.*not valid JSON"):
        load_coco(tmp_path / "bad.json", tmp_path)
    with pytest.raises(DatasetFormatError, match=r"missing\.json"):
        load_coco(tmp_path / "missing.json", tmp_path)


# --- Karpathy ---------------------------------------------------------------------------------------
def _karpathy_item(imgid, split, raws=("a dog .",), **extra):
    sentences = [{"raw": r} for r in raws]
    return {"filename": f"{imgid}.jpg", "split": split, "imgid": imgid, "sentences": sentences, **extra}


def test_load_karpathy_splits_paths_and_ids(tmp_path):
    data = {"dataset": "coco", "images": [
        _karpathy_item(0, "train", filepath="train2014", cocoid=100),
        _karpathy_item(1, "restval", filepath="val2014", cocoid=101),
        _karpathy_item(2, "val", filepath="val2014", cocoid=102), _karpathy_item(3, "test", raws=(" x ", "")),
        _karpathy_item(4, "train", raws=("  ",)),
    ]}
    path = _write_json(tmp_path / "dataset_coco.json", data)
    train = load_karpathy(path, tmp_path, "train")
    assert [r.image_id for r in train] == [100, 101]  # restval is training data; image 4 has no caption
    assert train[1].path == tmp_path / "val2014" / "1.jpg"
    # no filepath -> root / filename; no cocoid -> imgid
    assert load_karpathy(path, tmp_path, "test") == [ImageRecord(3, tmp_path / "3.jpg", ("x",))]
    assert [r.image_id for r in load_karpathy(path, tmp_path, "val")] == [102]
    with pytest.raises(ValueError, match="restval"):
        load_karpathy(path, tmp_path, "restval")


def test_a_karpathy_filepath_folder_missing_under_root_is_named_before_training(tmp_path):
    """Not an epoch of "skipping unreadable image" warnings for every val2014 image of the training split."""
    from captioner.data.factory import load_records
    data = {"dataset": "coco", "images": [_karpathy_item(0, "train", filepath="train2014", cocoid=100),
                                          _karpathy_item(1, "restval", filepath="val2014", cocoid=101)]}
    path = _write_json(tmp_path / "dataset_coco.json", data)
    (tmp_path / "train2014").mkdir()
    with pytest.raises(DatasetFormatError) as refused:
        load_records("karpathy", "train", karpathy_json=str(path), root=str(tmp_path))
    assert str(refused.value) == (f"image folder not found: {tmp_path / 'val2014'} (a \"filepath\" of the train split "
                                  f"in {path}, under --root)")
    (tmp_path / "val2014").mkdir()
    assert len(load_records("karpathy", "train", karpathy_json=str(path), root=str(tmp_path))) == 2


@pytest.mark.parametrize("data, expected", [
    ({"dataset": "x"}, "'images'"),
    ({"images": [{"split": "train", "imgid": 0, "sentences": []}]}, "images[0] is missing key 'filename'"),
    ({"images": [_karpathy_item(0, "dev")]}, "'dev'"),
    ({"images": [{**_karpathy_item(0, "test"), "sentences": [{"tokens": []}]}]}, "'raw'"),
    ({"images": [_karpathy_item(7, "train"), _karpathy_item(7, "train")]}, "images[1] repeats image id 7"),
])
def test_load_karpathy_malformed(tmp_path, data, expected):
    with pytest.raises(DatasetFormatError, match="k.json") as err:
        load_karpathy(_write_json(tmp_path / "k.json", data), tmp_path, "train")
    assert expected in str(err.value)


# --- Flickr8k ---------------------------------------------------------------------------------------
def _flickr_root(tmp_path: Path, image_dir="Flicker8k_Dataset") -> Path:
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    (tmp_path / image_dir).mkdir()
    lines = [f"{n}.jpg#{k}\t{n} caption {k} ." for n in ("a", "b", "c") for k in range(5)]
    (text / "Flickr8k.token.txt").write_text("\r\n".join(lines + ["b.jpg#5\t   "]) + "\r\n")
    (text / "Flickr_8k.trainImages.txt").write_text("c.jpg\nnocaps.jpg\na.jpg\n\n")
    (text / "Flickr_8k.devImages.txt").write_text("b.jpg\n")
    return tmp_path


@pytest.mark.parametrize("image_dir", ["Flicker8k_Dataset", "Images"])
def test_load_flickr8k_order_folders_and_skips(tmp_path, image_dir, caplog):
    root = _flickr_root(tmp_path, image_dir)
    with caplog.at_level(logging.WARNING):
        train = load_flickr8k(root, "train")
    assert [r.image_id for r in train] == ["c.jpg", "a.jpg"]  # split-list order; nocaps.jpg skipped
    assert "1 of the listed images" in caplog.text and "nocaps.jpg" in caplog.text
    assert train[0].path == root / image_dir / "c.jpg"
    assert train[0].captions == tuple(f"c caption {k} ." for k in range(5))
    assert load_flickr8k(root, "val") == load_flickr8k(root, "dev")
    assert len(load_flickr8k(root, "dev")[0].captions) == 5  # the blank sixth caption is dropped


def test_load_flickr8k_errors(tmp_path):
    root = _flickr_root(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_flickr8k(root, "validation")
    with pytest.raises(DatasetFormatError, match=r"Flickr_8k\.testImages\.txt"):
        load_flickr8k(root, "test")
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    for content, lineno in (("a.jpg#0\tfine\na.jpg#1 no tab here\n", 2), ("a.jpg0\tno hash\n", 1)):
        token.write_text(content)
        with pytest.raises(DatasetFormatError, match=rf"Flickr8k\.token\.txt', line {lineno}"):
            load_flickr8k(root, "train")
    token.write_text("a.jpg#0\tfine\n")
    (root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\na.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"trainImages\.txt', line 3: a\.jpg is already listed on line 1"):
        load_flickr8k(root, "train")
    (root / "Flicker8k_Dataset").rmdir()
    with pytest.raises(DatasetFormatError, match="Flicker8k_Dataset.*Images"):
        load_flickr8k(root, "train")


# --- load_image -------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(_noise(p, (64, 64), fmt="JPEG").read_bytes()[:600]), "truncated"),
    (lambda p: p.write_text("<html>404 not found</html>"), "not a recognised image"),
    (lambda p: None, "not found"),
])
def test_load_image_failures_name_the_file(tmp_path, make, problem):
    path = tmp_path / "photo_x.jpg"
    make(path)
    with pytest.raises(ImageReadError, match="photo_x.jpg") as err:
        load_image(path)
    assert problem in str(err.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("module", [images, Image], ids=["our_limit", "pil_limit"])
def test_load_image_decompression_bomb(tmp_path, monkeypatch, module):
    """Both limits count; PIL alone would only warn between 1x and 2x of its limit."""
    monkeypatch.setattr(module, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError, match=r"bomb\.png.*decompression bomb"):
        load_image(_noise(tmp_path / "bomb.png", (40, 40)))


def test_load_image_modes_become_rgb(tmp_path):
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.png")
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("P", (8, 6), 3).save(tmp_path / "pal.gif")
    loaded = {name: load_image(tmp_path / name) for name in ("gray.png", "cmyk.jpg", "rgba.png", "pal.gif")}
    assert all(img.mode == "RGB" and img.size == (8, 6) for img in loaded.values())
    assert loaded["gray.png"].getpixel((0, 0)) == (77, 77, 77)
    r, g, b = loaded["cmyk.jpg"].getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    assert loaded["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert loaded["rgba.png"].getpixel((1, 1)) == (255, 0, 0)


def test_load_image_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as stored:
        assert stored.mode.startswith("I")  # really a 16-bit file
    pixels = np.asarray(load_image(tmp_path / "deep.png"))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255 and 100 < np.median(pixels) < 155
    assert np.abs(pixels.astype(int) - np.rint(ramp / 257.0)).max() <= 1


def test_load_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    _noise(tmp_path / "phone.jpg", (40, 20), exif=exif.tobytes())
    with Image.open(tmp_path / "phone.jpg") as stored:
        assert stored.size == (40, 20)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


# --- load_image_tensor: what datasets read -----------------------------------------------------------
def _same_as_pil(path: Path, size: int) -> bool:
    return torch.equal(load_image_tensor(path, size), resize_to_tensor(load_image(path), size))


def test_load_image_tensor_reads_training_size_jpegs_without_pil(tmp_path, monkeypatch):
    """A plain JPEG stored at S x S (pack-images --square) is decoded straight to a tensor, PIL's decode unused,
    with the pixels PIL gives; other files and sizes take the PIL path."""
    square = _noise(tmp_path / "square.jpg", (32, 32), quality=90)
    progressive = _noise(tmp_path / "progressive.jpg", (32, 32), quality=80, progressive=True)
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)).save(tmp_path / "gray.jpg")
    expected = {p: resize_to_tensor(load_image(p), 32) for p in (square, progressive, tmp_path / "gray.jpg")}

    def no_pil_decoding(*args):
        raise AssertionError("decoded by PIL")

    assert images.decoders_agree()  # this installation's torchvision and PIL decode alike (else: PIL only)
    monkeypatch.setattr(images, "_decode", no_pil_decoding)
    for path, pixels in expected.items():
        assert torch.equal(load_image_tensor(path, 32), pixels), path.name
    with pytest.raises(AssertionError, match="decoded by PIL"):  # another size must be resized: PIL's path
        load_image_tensor(square, 16)
    monkeypatch.undo()

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": turned like load_image turns it
    others = [_noise(tmp_path / "wide.jpg", (40, 24)), _noise(tmp_path / "square.png", (32, 32)),
              _noise(tmp_path / "phone.jpg", (32, 32), exif=exif.tobytes())]
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    for path in [*others, tmp_path / "cmyk.jpg", square]:
        assert _same_as_pil(path, 32) and _same_as_pil(path, 20), path.name


def test_load_image_tensor_takes_the_pil_path_where_the_decoders_disagree(tmp_path, monkeypatch):
    square = _noise(tmp_path / "square.jpg", (32, 32), quality=90)
    monkeypatch.setattr(images, "decoders_agree", lambda: False)
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda *args: pytest.fail("fast path used"))
    assert torch.equal(load_image_tensor(square, 32), resize_to_tensor(load_image(square), 32))


def test_jpeg_size_walks_markers_without_a_length():
    """TEM and RST markers carry no length field; a fill byte may precede a marker; the end of the image or a
    scan before any frame header means no size."""
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    frame = b"\xff\xc2\x00\x11\x08\x00\x30\x00\x40\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"  # 64 wide, 48 high
    assert images._jpeg_size(b"\xff\xd8" + app0 + b"\xff\x01\xff\xd3\xff" + frame) == (64, 48)
    assert images._jpeg_size(b"\xff\xd8" + app0 + b"\xff\xd9" + frame) is None
    assert images._jpeg_size(b"\xff\xd8" + app0 + b"\xff\xda\x00\x08" + frame) is None
    assert images._jpeg_size(b"\x89PNG\r\n\x1a\n") is None and images._jpeg_size(b"\xff\xd8" + app0[:5]) is None


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(_noise(p, (64, 64), fmt="JPEG").read_bytes()[:600]), "truncated"),
    (lambda p: p.write_text("<html>404 not found</html>"), "not a recognised image"),
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "folder"),
])
def test_load_image_tensor_failures_name_the_file(tmp_path, make, problem):
    path = tmp_path / "photo_x.jpg"
    make(path)
    with pytest.raises(ImageReadError, match="photo_x.jpg") as err:
        load_image_tensor(path, 64)  # the truncated file claims 64 x 64: the fast path fails, PIL names it
    assert problem in str(err.value)


def test_list_images(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.JPG", "d/a.png", "d/sub/c.webp", "d/notes.txt", "d/._a.jpg", "odd.tiff"):
        (tmp_path / name).write_bytes(b"x")
    found = list_images([tmp_path / "odd.tiff", str(tmp_path / "d")])
    assert found == [tmp_path / "odd.tiff", tmp_path / "d/a.png", tmp_path / "d/b.JPG", tmp_path / "d/sub/c.webp"]
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        list_images([tmp_path / "nope.jpg"])


# --- transforms and dataset -------------------------------------------------------------------------
def test_resize_and_normalize():
    img = Image.new("RGB", (50, 20), (255, 0, 128))
    t = resize_to_tensor(img, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.uint8 and t[:, 8, 8].tolist() == [255, 0, 128]
    x = normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))  # black -> -mean/std
    assert x.dtype == torch.float32
    assert torch.allclose(x[1, :, 0, 0], torch.tensor([-2.1179, -2.0357, -1.8044]), atol=1e-4)
    assert normalize(t).shape == (3, 16, 16)
    with pytest.raises(TypeError):
        normalize(x)


def test_train_augment_shape_dtype_reproducible():
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    aug = TrainAugment(24)
    torch.manual_seed(0)
    first = [aug(image) for _ in range(3)]
    torch.manual_seed(0)
    again = [aug(image) for _ in range(3)]
    assert all(a.shape == (3, 24, 24) and a.dtype == torch.uint8 for a in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # it does vary from call to call
    square = image[:, :30, :]  # zero strength must be the identity: no hidden flip, hue or crop
    assert torch.equal(TrainAugment(30, (1.0, 1.0), ratio=(1.0, 1.0), brightness=0, contrast=0)(square), square)


def test_dataset_items_failures_and_strict(tmp_path, caplog):
    good = _noise(tmp_path / "good.jpg", fmt="JPEG")
    (tmp_path / "bad.jpg").write_bytes(b"")
    records = [ImageRecord(1, good, ("a", "b")), ImageRecord(2, tmp_path / "bad.jpg", ("c",))]
    ds = CaptionDataset(records, image_size=16)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8
    assert (item["captions"], item["image_id"], item["path"], item["index"]) == (["a", "b"], 1, str(good), 0)
    with caplog.at_level(logging.WARNING):
        assert ds[1] is None and ds[1] is None
    assert ds.failed_paths == [str(tmp_path / "bad.jpg")] and "bad.jpg" in caplog.text
    with pytest.raises(ImageReadError, match="bad.jpg"):
        CaptionDataset(records, image_size=16, strict=True)[1]


def test_dataset_cache_decodes_once_and_augments_after(tmp_path):
    path = _noise(tmp_path / "once.png")
    ds = CaptionDataset([ImageRecord(1, path, ("a",))], image_size=16, cache_images=True)
    first = ds[0]["image"]
    path.unlink()  # a second read from disk would now fail
    assert torch.equal(ds[0]["image"], first) and ds.failed_paths == [] and ds.cached_bytes == 3 * 16 * 16
    ds.augment = TrainAugment(16)
    assert ds[0]["image"].shape == (3, 16, 16) and not torch.equal(ds[0]["image"], ds[0]["image"])


def test_swap_left_right_whole_words_case_kept():
    from captioner.data.transforms import swap_left_right

    caption = "Left of the RIGHT tree, a left-handed man turns left; bright, upright, leftover Right."
    swapped = "Right of the LEFT tree, a right-handed man turns right; bright, upright, leftover Left."
    assert swap_left_right(caption) == swapped and swap_left_right(swapped) == caption
    assert swap_left_right("a dog on the grass") == "a dog on the grass"


def test_train_augment_strength_checks_and_saturation():
    with pytest.raises(ValueError, match="saturation"):
        TrainAugment(16, saturation=1.0)
    grey = torch.full((3, 8, 8), 100, dtype=torch.uint8)  # saturation jitter leaves a grey image grey
    out = TrainAugment(8, (1.0, 1.0), ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0.9)(grey)
    assert torch.equal(out, grey)


MIRRORED = ("a dog on the left of a Right tree", "LEFT and right", "no side at all")


@pytest.mark.parametrize("scale, jitter", [(1.0, 0.0), (0.4, 0.3)])
def test_hflip_mirrors_image_and_captions_together_per_item_seed(tmp_path, scale, jitter):
    """The flip is drawn last from the item's seeded generator: with and without --hflip the crop and jitter are
    the same, so a flipped item is exactly the mirror of the unflipped one, and its captions are mirrored too."""
    from captioner.data.sampling import ItemKey
    from captioner.data.transforms import swap_left_right

    records = [ImageRecord(1, _noise(tmp_path / "a.png", size=(40, 30)), MIRRORED)]

    def dataset(hflip: bool) -> CaptionDataset:
        augment = TrainAugment(24, (scale, 1.0), brightness=jitter, contrast=jitter, saturation=jitter, hflip=hflip)
        return CaptionDataset(records, 32, augment=augment, cache_images=True)

    flipping, plain = dataset(True), dataset(False)
    flips = []
    for seed in range(24):
        item, reference = flipping[ItemKey(0, seed)], plain[ItemKey(0, seed)]
        again = flipping[ItemKey(0, seed)]
        assert torch.equal(item["image"], again["image"]) and item["captions"] == again["captions"]  # per seed
        assert not reference["flipped"] and reference["captions"] == list(MIRRORED)
        if item["flipped"]:
            assert torch.equal(item["image"], torch.flip(reference["image"], dims=[-1]))
            assert item["captions"] == [swap_left_right(c) for c in MIRRORED]
        else:
            assert torch.equal(item["image"], reference["image"]) and item["captions"] == list(MIRRORED)
        flips.append(item["flipped"])
    assert 4 < sum(flips) < 20  # about half


def test_collate_trains_on_the_mirrored_captions(tmp_path):
    from captioner.data.collate import CaptionCollate
    from captioner.data.sampling import ItemKey
    from captioner.text import Tokenizer

    tokenizer = Tokenizer.train(["a dog on the left of a right tree", "left and right", "no side at all"] * 20)
    augment = TrainAugment(16, (1.0, 1.0), brightness=0, contrast=0, hflip=True)
    dataset = CaptionDataset([ImageRecord(1, _noise(tmp_path / "a.png"), MIRRORED)], 16, augment=augment)
    items = [dataset[ItemKey(0, seed)] for seed in range(8)]
    assert {it["flipped"] for it in items} == {False, True}
    batch = CaptionCollate(tokenizer, 24, captions_per_image=0)(items)
    for row, owner in enumerate(batch.caption_image_index.tolist()):
        length = int((batch.targets[row] > 3).sum())  # the caption's tokens (ids above pad/unk/bos/eos)
        text = tokenizer.decode(batch.targets[row, :length].tolist())
        assert text == tokenizer.decode(tokenizer.encode(items[owner]["captions"][row % 3]))
        assert ("left of a right" in text) == (row % 3 == 0 and not items[owner]["flipped"])


# --- the shared real data ---------------------------------------------------------------------------
def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (see shared/data/README.md)")
    return path


def test_real_coco_mini():
    root = _shared("coco-mini")
    records = load_coco(root / "annotations" / "captions_train2017.json", root / "train2017")
    assert len(records) == 80 and all(len(r.captions) == 5 and r.path.is_file() for r in records)
    item = CaptionDataset(records[:1], image_size=32, strict=True)[0]
    assert item["image"].shape == (3, 32, 32)


def test_real_photos_decode_to_the_same_pixels_by_either_path():
    """torchvision's decode_jpeg (the training-size fast path) and PIL give every real photo the same pixels, and
    the hand-read frame header gives PIL's size."""
    from torchvision.io import ImageReadMode, decode_jpeg

    root = _shared("flickr8k")
    photos = sorted((root / "Flicker8k_Dataset").glob("*.jpg"))[::100] + sorted(_shared("coco-mini").rglob("*.jpg"))
    for path in photos:
        data = path.read_bytes()
        assert images._jpeg_size(data) == Image.open(path).size, path
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert torch.equal(pixels, torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)), path


def test_real_flickr8k():
    root = _shared("flickr8k")
    train, dev = load_flickr8k(root, "train"), load_flickr8k(root, "dev")
    assert (len(train), len(dev)) == (6000, 1000)
    assert not {r.image_id for r in train} & {r.image_id for r in dev}
    assert all(len(r.captions) == 5 for r in train + dev) and dev[0].path.is_file()


class _CollateReportingSharedMemory:
    """Collates in the worker and reports whether the stacked images were made in shared memory there."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        batch = self.collate(items)
        return batch, batch.images.is_shared()


def test_a_worker_stacks_its_batch_in_shared_memory(tmp_path):
    """The handover to the training process needs the batch in shared memory: stacked anywhere else, it would
    be copied once more."""
    from captioner.data.collate import CaptionCollate

    records = [ImageRecord(i, _noise(tmp_path / f"{i}.jpg", (40, 30)), ("a picture",)) for i in range(4)]
    loader = torch.utils.data.DataLoader(CaptionDataset(records, 32), batch_size=4, num_workers=1,
                                         collate_fn=_CollateReportingSharedMemory(CaptionCollate(None, 8)))
    batch, shared_in_worker = next(iter(loader))
    assert shared_in_worker and batch.images.shape == (4, 3, 32, 32)
    in_process, shared_here = _CollateReportingSharedMemory(CaptionCollate(None, 8))([CaptionDataset(records, 32)[0]])
    assert not shared_here  # without workers nothing is handed over: an ordinary stack
