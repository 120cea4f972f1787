"""Training augmentation on the training device (data/device_augment.py, `--augment-on device`): the same random
choices as the workers' TrainAugment, the same pixels up to rounding, the same mirrored captions, and runs that
train with it. Checked on the CPU, where grid_sample takes the same arguments as on a GPU."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from torch.utils.data import DataLoader

from captioner.cli import main
from captioner.config import RunConfig
from captioner.data import load_coco
from captioner.data.collate import CaptionCollate, stacked_draws
from captioner.data.dataset import CaptionDataset
from captioner.data.device_augment import DeviceAugmentLoader, augment_batch
from captioner.data.device_decode import DeviceDecodingLoader
from captioner.data.records import ImageRecord
from captioner.data.sampling import ItemKey
from captioner.data.transforms import TrainAugment
from captioner.errors import CaptionerError
from captioner.pretrain import pretrain_trunk
from captioner.text import Tokenizer
from captioner.training_data import augment_on_device, make_loader
from conftest import TINY
from test_pretrain import colour_dataset, pretraining_config

CPU = torch.device("cpu")
AUGMENTS = {  # trunk pre-training's, the Flickr8k recipe's, and the default with mirroring
    "pretraining": TrainAugment(48, (0.35, 1.0), ratio=(3 / 4, 4 / 3), brightness=0.3, contrast=0.3, saturation=0.3,
                                hflip=True),
    "recipe": TrainAugment(48, (0.766, 1.0), brightness=0.0, contrast=0.0, saturation=0.0),
    "default_mirrored": TrainAugment(48, hflip=True),
}


def photo_like(count: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """uint8 (count, 3, size, size): smooth gradients with noise on top, so a misplaced crop changes pixels."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                        (ramp.view(1, -1) * ramp.view(-1, 1))])  # (3, S, S)
    noise = torch.rand(count, 3, size, size, generator=generator)
    return (200 * base + 55 * noise).round().to(torch.uint8)


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_a_batch_augmented_on_the_device_equals_the_workers_images(name):
    augment, images = AUGMENTS[name], photo_like(24)
    expected, draws = [], []
    for row, image in enumerate(images):
        draws.append(augment.draw(48, 48, torch.Generator().manual_seed(row)).as_tensor())
        expected.append(augment.apply(image, torch.Generator().manual_seed(row))[0])
    got, expected = augment_batch(images, torch.stack(draws)), torch.stack(expected)
    differ = (got.int() - expected.int()).abs()
    # Rounding of the interpolated value may fall the other way at a few pixels (then scaled by the jitter)
    assert differ.max() <= 2 and (differ > 0).float().mean() < 0.005
    assert any(bool(d[7]) for d in draws) == augment.hflip  # the mirrored case is exercised where it can occur
    assert not torch.equal(got, images)


def test_each_draw_is_applied_to_its_own_image():
    images = photo_like(2)
    identity = [0, 0, 48, 48, 1, 1, 1, 0]
    mirrored = [0, 0, 48, 48, 1, 1, 1, 1]
    out = augment_batch(images, torch.tensor([identity, mirrored], dtype=torch.float32))
    assert torch.equal(out[0], images[0]) and torch.equal(out[1], images[1].flip(-1))
    zoomed = augment_batch(images[:1], torch.tensor([[10, 20, 24, 24, 1, 1, 1, 0]], dtype=torch.float32))
    crop = torch.nn.functional.interpolate(images[:1, :, 10:34, 20:44].float(), size=(48, 48), mode="bilinear")
    assert (zoomed.int() - crop.round().int()).abs().max() <= 1
    darker = augment_batch(images[:1], torch.tensor([[0, 0, 48, 48, 0.5, 1, 1, 0]], dtype=torch.float32))
    assert torch.equal(darker, (images[:1].float() * 0.5).round().to(torch.uint8))


def test_bad_draws_are_refused():
    images = photo_like(2)
    with pytest.raises(ValueError, match=r"\(2, 8\) draws"):
        augment_batch(images, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="larger than the 48 px image"):
        augment_batch(images, torch.tensor([[0, 0, 60, 48, 1, 1, 1, 0]] * 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(images.float(), torch.zeros(2, 8))


def mirrored_records(tmp_path, count: int = 8) -> list[ImageRecord]:
    records = colour_dataset(tmp_path / "images", count)
    return [ImageRecord(r.image_id, r.path, ("a dog on the left", "the left side")) for r in records]


def test_items_carry_the_draw_their_seed_gives_and_mirrored_captions(tmp_path):
    records, augment = mirrored_records(tmp_path), AUGMENTS["default_mirrored"]
    later = CaptionDataset(records, 48, augment=augment, cache_images=True, augment_later=True)
    now = CaptionDataset(records, 48, augment=augment, cache_images=True)
    plain = CaptionDataset(records, 48)
    flips = set()
    for index in range(len(records)):
        key = ItemKey(index, 1000 + index)
        item, reference = later[key], now[key]
        assert torch.equal(item["image"], plain[index]["image"])  # the pixels are left for the device
        drawn = augment.draw(48, 48, torch.Generator().manual_seed(1000 + index))
        assert torch.equal(item["augment"], drawn.as_tensor())
        assert item["flipped"] == reference["flipped"] == drawn.flipped
        assert item["captions"] == reference["captions"]  # "right" where the image is mirrored, in both paths
        flips.add(item["flipped"])
    assert flips == {True, False}
    assert stacked_draws([later[ItemKey(0, 1)], later[ItemKey(1, 2)]]).shape == (2, 8)
    with pytest.raises(ValueError, match="mixes items"):
        stacked_draws([later[ItemKey(0, 1)], plain[1]])
    with pytest.raises(ValueError, match="augmentation's size"):
        CaptionDataset(records, 64, augment=augment, augment_later=True)


def loader_batches(records, cfg: RunConfig, tokenizer, epoch: int = 2, count: int = 2):
    loader = make_loader(records, cfg, tokenizer, train=True, device=CPU)
    loader.sampler.set_epoch(epoch)
    return loader, list(islice(loader, count))


def test_the_device_path_trains_on_the_workers_batches(synthetic_dataset):
    records = load_coco(synthetic_dataset.train_captions, synthetic_dataset.train_images)[:16]
    tokenizer = Tokenizer.train([c for r in records for c in r.captions], vocab_size=60)
    cfg = RunConfig()
    cfg.data.image_size, cfg.data.augment, cfg.data.hflip, cfg.data.color_jitter = 48, True, True, 0.2
    cfg.train.batch_size, cfg.train.workers = 8, 0  # no worker processes a failing assertion could leave behind
    cfg.data.augment_on = "workers"
    plain_loader, workers = loader_batches(records, cfg, tokenizer)
    cfg.data.augment_on = "device"
    device_loader, device = loader_batches(records, cfg, tokenizer)
    assert isinstance(device_loader, DeviceAugmentLoader) and not isinstance(plain_loader, DeviceAugmentLoader)
    assert len(device_loader) == len(plain_loader) and device_loader.dataset.augment_later
    for a, b in zip(workers, device):
        assert a.indices == b.indices and a.captions == b.captions and torch.equal(a.tokens_in, b.tokens_in)
        assert b.augment is None and b.images.shape == a.images.shape
        differ = (a.images.int() - b.images.int()).abs()
        assert differ.max() <= 2 and (differ > 0).float().mean() < 0.005


def test_augment_on_auto_means_the_device_on_cuda_only():
    assert augment_on_device("auto", torch.device("cuda")) and not augment_on_device("auto", CPU)
    assert augment_on_device("device", CPU) and not augment_on_device("workers", torch.device("cuda"))
    with pytest.raises(CaptionerError, match="--augment-on must be one of auto, workers, device"):
        augment_on_device("gpu", CPU)


def test_decoded_then_augmented_on_the_device(synthetic_dataset):
    """--gpu-decode with --augment: nvjpeg's decoder (run here on the CPU) then the batch augmentation."""
    records = load_coco(synthetic_dataset.train_captions, synthetic_dataset.train_images)[:8]
    augment = TrainAugment(48, (0.5, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, hflip=True)
    keys = [ItemKey(i, 77 + i) for i in range(len(records))]
    collate = CaptionCollate(None, 24)
    encoded = CaptionDataset(records, 48, augment=augment, encoded=True, augment_later=True)
    assert all(encoded[k]["jpeg"] is not None and encoded[k]["augment"] is not None for k in keys)
    loader = DataLoader(encoded, batch_size=8, sampler=keys, collate_fn=collate)
    batch = next(iter(DeviceAugmentLoader(DeviceDecodingLoader(loader, CPU, prefetch=False), CPU)))
    reference = next(iter(DataLoader(CaptionDataset(records, 48, augment=augment), batch_size=8, sampler=keys,
                                     collate_fn=collate)))
    assert batch.captions == reference.captions and batch.images.shape == reference.images.shape
    # decode_jpeg and PIL may differ by a grey level or two; the crops, jitter and mirroring must agree
    assert (batch.images.float() - reference.images.float()).abs().mean() < 2.0
    with pytest.raises(ValueError, match="augment_later"):
        CaptionDataset(records, 48, augment=augment, encoded=True)


def test_pretraining_with_augmentation_on_the_device_learns_the_tags(tmp_path):
    train = colour_dataset(tmp_path / "train", 32)
    val = colour_dataset(tmp_path / "val", 8, offset=100)
    cfg = pretraining_config(tmp_path)
    cfg.data.augment_on = "device"
    summary = pretrain_trunk(cfg, train, val, tmp_path / "trunk.pt", CPU, progress=False)
    assert summary["best_val_map"] == pytest.approx(1.0)
    losses = [epoch["loss"] for epoch in summary["history"]]
    assert losses[-1] < 0.8 * losses[0]


def test_train_with_augmentation_on_the_device(synthetic_dataset, tmp_path):
    d, out = synthetic_dataset, tmp_path / "run"
    assert main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(out), "--epochs", "1", "--augment", "--hflip", "--augment-on", "device",
                 "--trunk-stages", "4", "--trainable-layers", "1", *TINY]) == 0
    assert (out / "best.pt").is_file() and RunConfig.load(out / "config.json").data.augment_on == "device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_batch_augmentation_gives_the_cpus_pixels_and_auto_uses_it(synthetic_dataset):
    augment, images = AUGMENTS["pretraining"], photo_like(64)
    draws = torch.stack([augment.draw(48, 48, torch.Generator().manual_seed(row)).as_tensor() for row in range(64)])
    images_on_cuda = images.cuda()
    augment_batch(images_on_cuda, draws.pin_memory())  # the first call makes the luma weights
    torch.cuda.set_sync_debug_mode("error")  # a host wait for the GPU raises: there must be none
    try:
        on_cuda = augment_batch(images_on_cuda, draws.pin_memory())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cuda = on_cuda.cpu()
    assert (on_cuda.int() - augment_batch(images, draws).int()).abs().max() <= 1
    records = load_coco(synthetic_dataset.train_captions, synthetic_dataset.train_images)[:16]
    cfg = RunConfig()
    cfg.data.image_size, cfg.data.augment, cfg.train.batch_size = 48, True, 8
    loader = make_loader(records, cfg, None, train=True, device=torch.device("cuda"))
    batch = next(iter(loader))
    assert isinstance(loader, DeviceAugmentLoader) and batch.images.is_cuda and batch.augment is None
