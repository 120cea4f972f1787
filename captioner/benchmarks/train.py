"""Training benchmark: images/s of training steps end to end from JPEG files and from cached features, against
a plain baseline (fp32, PIL loading in the training process, no cache), all in one process on one device.

The data is generated: synthetic scenes drawn at COCO's size (640x480 JPEGs, five captions each). Every
figure comes from the project's own training step (`engine.train_one_epoch`) on the default-size model:

- baseline: frozen trunk run in every step, fp32, DataLoader without workers, no cache;
- frozen_from_jpeg: frozen trunk, DataLoader workers and pinned memory, channels_last, bf16 autocast on CUDA;
- finetune_from_jpeg: the whole trunk trained (`--trainable-layers 5`), same loading;
- cached_features: the frozen trunk's output read from the on-disk FeatureStore (filled beforehand, and the
  fill timed as `extract`), so a step is the bridge and the decoder only.

Each setting runs `--batches` timed batches after one warm-up batch. Peak memory: CUDA's peak allocated per
setting; on CPU the process's peak resident set so far (it never goes down, so read it as an upper bound).
"""

from __future__ import annotations

import json
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..config import ModelConfig
from ..data.coco import load_coco
from ..data.collate import CaptionCollate
from ..data.dataset import CaptionDataset
from ..data.sampling import EpochSampler
from ..engine import fill_feature_store, train_one_epoch
from ..feature_cache import FeatureStore
from ..models.captioner import Captioner
from ..text import Tokenizer
from .decode import _device_name, _peak_memory_mb, _reset_peak, _sync

COCO_TRAIN_IMAGES = 113_287  # Karpathy train + restval: the usual "one COCO epoch"


def coco_sized_images(folder: Path, count: int, seed: int = 0):
    """`count` synthetic scenes as 640x480 JPEGs (quality 90) with their captions -> ImageRecords."""
    from ..data.synthetic import make_synthetic

    written = make_synthetic(folder, num_train=count, num_val=0, seed=seed, width=640, height=480)
    records = load_coco(written.train_captions, written.train_images)
    for r in records:  # make_synthetic's own JPEG quality is kept; re-save at a photo-like quality
        Image.open(r.path).convert("RGB").save(r.path, quality=90)
    return records


def _loader(records, tokenizer, image_size: int, batch_size: int, workers: int, device: torch.device,
            store: FeatureStore | None = None, captions_per_image: int = 5) -> DataLoader:
    dataset = CaptionDataset(records, image_size, cache_images=False)
    dataset.features = store
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(records), seed=0),
                      num_workers=workers, collate_fn=CaptionCollate(tokenizer, 40, captions_per_image),
                      pin_memory=device.type == "cuda", persistent_workers=False)


def _model(vocab_size: int, trainable_layers: int, device: torch.device) -> Captioner:
    torch.manual_seed(0)
    model = Captioner(ModelConfig(vocab_size=vocab_size, trainable_layers=trainable_layers), load_encoder_weights=False)
    return model.to(device).to(memory_format=torch.channels_last)


def _time_training(model, loader, batches: int, device: torch.device, store: FeatureStore | None = None,
                   autocast: bool = True) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(model, islice(loader, 1), optimizer, scheduler, device, 0, progress=False,
                    feature_store=store, amp=autocast)  # warm-up: kernels, allocator, workers
    _sync(device)
    _reset_peak(device)
    started = time.perf_counter()
    stats = train_one_epoch(model, islice(loader, batches), optimizer, scheduler, device, 0, progress=False,
                            feature_store=store, amp=autocast)
    _sync(device)
    seconds = time.perf_counter() - started
    captions = stats["images"] * loader.collate_fn.captions_per_image
    return {"images_per_s": round(stats["images"] / seconds, 1), "captions_per_s": round(captions / seconds, 1),
            "images": stats["images"], "seconds": round(seconds, 3),
            "peak_memory_mb": round(_peak_memory_mb(device), 1)}


def _time_extraction(model, loader, store: FeatureStore, device: torch.device) -> dict:
    started = time.perf_counter()
    count = fill_feature_store(model, loader, store, device)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": round(count / seconds, 1), "images": count, "seconds": round(seconds, 3)}


def run_train_benchmark(device: str = "auto", num_images: int = 256, batch_size: int = 32, batches: int = 6,
                        image_size: int = 224, workers: int = 2, finetune_batches: int = 2) -> dict:
    from ..training import resolve_device

    torch_device = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        records = coco_sized_images(Path(tmp) / "images", num_images)
        tokenizer = Tokenizer.train(c for r in records for c in r.captions)
        result = {"benchmark": "train", "device": _device_name(torch_device), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "images": num_images, "image_file_size": "640x480 JPEG",
                  "image_size": image_size, "batch_size": batch_size, "captions_per_image": 5,
                  "timed_batches": batches, "workers": workers,
                  "autocast": "bf16" if torch_device.type == "cuda" else "fp32"}
        frozen = _model(tokenizer.vocab_size, 0, torch_device)

        result["baseline"] = _time_training(frozen, _loader(records, tokenizer, image_size, batch_size, 0,
                                                            torch_device), batches, torch_device, autocast=False)
        result["frozen_from_jpeg"] = _time_training(
            frozen, _loader(records, tokenizer, image_size, batch_size, workers, torch_device), batches, torch_device)
        finetune = _model(tokenizer.vocab_size, 5, torch_device)
        result["finetune_from_jpeg"] = _time_training(
            finetune, _loader(records, tokenizer, image_size, batch_size, workers, torch_device),
            finetune_batches, torch_device)
        del finetune

        with torch.no_grad():
            shape = frozen.encoder.forward_prefix(torch.zeros(1, 3, image_size, image_size, device=torch_device)).shape
        store = FeatureStore.open(Path(tmp) / "features", {"benchmark": True}, len(records), shape[1:])
        result["extract"] = _time_extraction(frozen, _loader(records, tokenizer, image_size, batch_size, workers,
                                                        torch_device), store, torch_device)
        # Workers bring nothing to memory-mapped rows: they would only copy them between processes.
        result["cached_features"] = _time_training(
            frozen, _loader(records, tokenizer, image_size, batch_size, 0, torch_device, store), batches,
            torch_device, store)
    baseline = result["baseline"]["images_per_s"]
    for name in ("frozen_from_jpeg", "finetune_from_jpeg", "cached_features"):
        result[f"{name}_vs_baseline"] = round(result[name]["images_per_s"] / baseline, 2)
    result["coco_epoch_seconds_cached"] = round(COCO_TRAIN_IMAGES / result["cached_features"]["images_per_s"], 1)
    return result


def add_arguments(p) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=256, help="synthetic 640x480 JPEGs to generate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=6, help="timed batches per setting (after one warm-up batch)")
    p.add_argument("--finetune-batches", type=int, default=2, help="timed batches with the whole trunk trained")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the fast settings")
    p.add_argument("--out", help="also write the JSON here")


def run_from_args(args) -> int:
    result = run_train_benchmark(args.device, args.images, args.batch_size, args.batches, args.image_size,
                                 args.workers, args.finetune_batches)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
