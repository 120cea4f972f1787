"""GPU JPEG decoding (data/device_decode.py), checked on the CPU: torchvision's decode_jpeg takes the same
arguments on both devices, so the batching, CPU fallbacks, dropped rows and pixels are tested here; the CUDA
stream prefetching runs in the GPU benchmark."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from captioner.config import RunConfig
from captioner.data import load_coco
from captioner.data.collate import Batch, CaptionCollate
from captioner.data.dataset import CaptionDataset
from captioner.data.device_decode import DeviceDecodingLoader, decode_batch_on_device
from captioner.data.records import ImageRecord
from captioner.engine import train_one_epoch
from captioner.errors import CaptionerError
from captioner.text import Tokenizer
from captioner.training_data import make_loader
from conftest import tiny_model
from test_reliability import write_image_zoo

CPU = torch.device("cpu")
SIZE = 48


@pytest.fixture(scope="module")
def zoo(synthetic_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    photo = sorted(Path(synthetic_dataset.train_images).iterdir())[0]
    readable, unreadable = write_image_zoo(folder, photo)
    records = [ImageRecord(i, folder / name, (f"picture number {i}", f"an image called {Path(name).stem}"))
               for i, name in enumerate(readable + unreadable)]
    return records, readable, unreadable


def test_only_plain_jpegs_travel_as_bytes(zoo):
    records, readable, unreadable = zoo
    dataset = CaptionDataset(records, SIZE, encoded=True)
    kinds = {Path(r.path).name: dataset[i] for i, r in enumerate(records)}
    assert {n for n, it in kinds.items() if it is not None and it.get("jpeg") is not None} == {
        "plain.jpg", "grayscale.jpg", "truncated.jpg"}  # the truncated file's header is fine: the decoder finds out
    for name in ("cmyk.jpg", "rgba.png", "sixteen_bit.png", "exif_rotated.jpg"):  # decoded on the CPU as before
        assert kinds[name]["image"].shape == (3, SIZE, SIZE)
    assert all(kinds[n] is None for n in ("zero_bytes.jpg", "corrupt.jpg", "not_an_image.jpg", "bomb.png"))


def test_a_batchs_jpeg_files_travel_from_a_worker_as_one_tensor(zoo):
    """Each tensor a worker hands over costs a shared-memory segment and a file descriptor: a batch's files go as
    one tensor, and each row's bytes come back whole and in place."""
    records, _, _ = zoo
    dataset = CaptionDataset(records, SIZE, encoded=True)
    files = {i: dataset[i]["jpeg"] for i in range(len(records)) if dataset[i] and dataset[i].get("jpeg") is not None}
    loader = DataLoader(dataset, batch_size=len(records), num_workers=1, collate_fn=CaptionCollate(None, 24))
    batch = next(iter(loader))
    assert isinstance(batch.jpegs.data, torch.Tensor) and batch.jpegs.data.numel() == sum(f.numel() for f in files.values())
    rows = {batch.indices[row]: data for row, data in batch.jpegs}
    assert rows.keys() == files.keys() and all(torch.equal(rows[i], files[i]) for i in files)


def test_decoded_batch_matches_cpu_pixels_and_drops_what_cannot_be_read(zoo):
    records, readable, unreadable = zoo
    tokenizer = Tokenizer.train([c for r in records for c in r.captions], vocab_size=60)
    collate = CaptionCollate(tokenizer, 24)
    cpu_items = [CaptionDataset(records, SIZE)[i] for i in range(len(records))]
    gpu_items = [CaptionDataset(records, SIZE, encoded=True)[i] for i in range(len(records))]
    expected, decoded = collate(cpu_items), decode_batch_on_device(collate(gpu_items), CPU)

    assert decoded.jpegs is None and decoded.images.shape == (len(readable), 3, SIZE, SIZE)
    assert decoded.skipped == len(unreadable) == expected.skipped
    assert decoded.paths == expected.paths and decoded.image_ids == expected.image_ids
    assert torch.equal(decoded.tokens_in, expected.tokens_in) and torch.equal(decoded.targets, expected.targets)
    assert torch.equal(decoded.caption_image_index, expected.caption_image_index)
    assert torch.equal(decoded.bow_targets, expected.bow_targets)
    # Different JPEG decoders and resamplers: the same picture up to rounding, not the same bytes.
    difference = (decoded.images.float() - expected.images.float()).abs()
    assert difference.mean() < 2.0, difference.mean()
    assert difference.flatten(1).mean(1).max() < 4.0


def test_without_rows_drops_an_image_and_its_captions():
    batch = Batch(images=torch.arange(3).view(3, 1, 1, 1).expand(3, 3, 2, 2).to(torch.uint8),
                  tokens_in=torch.tensor([[1, 10], [1, 11], [1, 20], [1, 30], [1, 31]]),
                  targets=torch.tensor([[10, 2], [11, 2], [20, 2], [30, 2], [31, 2]]),
                  caption_image_index=torch.tensor([0, 0, 1, 2, 2]), captions=[["a"], ["b"], ["c"]],
                  image_ids=[7, 8, 9], paths=["a.jpg", "b.jpg", "c.jpg"], indices=[0, 1, 2], skipped=1,
                  bow_targets=torch.eye(3))
    kept = batch.without_rows([1])
    assert kept.image_ids == [7, 9] and kept.paths == ["a.jpg", "c.jpg"] and kept.skipped == 2
    assert kept.images[:, 0, 0, 0].tolist() == [0, 2]
    assert kept.tokens_in[:, 1].tolist() == [10, 11, 30, 31]
    assert kept.caption_image_index.tolist() == [0, 0, 1, 1]
    assert torch.equal(kept.bow_targets, torch.eye(3)[[0, 2]])


def test_training_on_device_decoded_batches_gives_the_cpu_loss(synthetic_dataset):
    records = load_coco(synthetic_dataset.train_captions, synthetic_dataset.train_images)[:16]
    tokenizer = Tokenizer.train([c for r in records for c in r.captions], vocab_size=60)
    losses = {}
    for name, encoded in (("cpu", False), ("device", True)):
        loader = DataLoader(CaptionDataset(records, SIZE, encoded=encoded), batch_size=8,
                            collate_fn=CaptionCollate(tokenizer, 24, 2))
        if encoded:
            loader = DeviceDecodingLoader(loader, CPU)
        model = tiny_model(vocab_size=tokenizer.vocab_size, trainable_layers=0)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        losses[name] = train_one_epoch(model, islice(loader, 2), optimizer, scheduler, CPU, 1, progress=False)
    assert losses["device"]["images"] == losses["cpu"]["images"] == 16
    assert losses["device"]["train_loss"] == pytest.approx(losses["cpu"]["train_loss"], rel=1e-3)


def test_gpu_decode_without_cuda_is_a_clear_error(synthetic_dataset):
    cfg = RunConfig()
    cfg.data.gpu_decode = True
    records = load_coco(synthetic_dataset.train_captions, synthetic_dataset.train_images)[:4]
    with pytest.raises(CaptionerError, match="--gpu-decode.*CUDA"):
        make_loader(records, cfg, None, train=False, device=CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvjpeg and CUDA streams)")
def test_on_cuda_prefetched_batches_equal_inline_ones_and_training_runs(synthetic_dataset, tmp_path):
    records = load_coco(synthetic_dataset.train_captions, synthetic_dataset.train_images)
    tokenizer = Tokenizer.train([c for r in records for c in r.captions], vocab_size=60)
    cuda = torch.device("cuda")

    def batches(prefetch: bool, threads: int):
        loader = DataLoader(CaptionDataset(records, SIZE, encoded=True), batch_size=8, num_workers=2,
                            collate_fn=CaptionCollate(tokenizer, 24), pin_memory=True)
        return [(b.images.cpu(), b.paths) for b in DeviceDecodingLoader(loader, cuda, prefetch, threads)]

    inline = batches(False, 1)
    for prefetched in (batches(True, 1), batches(True, 4), batches(False, 3)):
        assert len(inline) == len(prefetched) == -(-len(records) // 8)
        for (a, paths_a), (b, paths_b) in zip(inline, prefetched):
            assert paths_a == paths_b and torch.equal(a, b)
    cpu = torch.stack([CaptionDataset(records, SIZE)[i]["image"] for i in range(8)])
    assert (inline[0][0].float() - cpu.float()).abs().mean() < 2.0  # nvjpeg: the same pictures as PIL

    from captioner.cli import main

    d = synthetic_dataset
    code = main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions), "--train-images",
                 str(d.train_images), "--val-captions", str(d.val_captions), "--val-images", str(d.val_images),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--image-size", "64", "--batch-size", "16",
                 "--device", "cuda", "--gpu-decode", "--trainable-layers", "0", "--workers", "2", "--no-progress",
                 "--vocab-size", "200"])
    assert code == 0 and (tmp_path / "run" / "best.pt").exists()
