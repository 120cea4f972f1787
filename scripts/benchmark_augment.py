"""Training augmentation in the DataLoader workers (`--augment-on workers`) against the same augmentation applied to
each batch on the training device (`--augment-on device`), in one process; prints JSON.

    python scripts/benchmark_augment.py                                  # Flickr8k from ../shared/data/flickr8k
    python scripts/benchmark_augment.py --root data/flickr8k-128 --device cuda --workers 2 --images 4096

Both settings read the same images, already decoded and kept by the workers (`cache_images`, as from a run's
second epoch on), with trunk pre-training's augmentation (crops down to 35% of the area, colour jitter 0.3,
mirroring) or the Flickr8k recipe's (`--augment recipe`: crops down to 77%). Per setting it reports:
- `worker_ms_per_image`: what one item costs a worker, timed in this process (the CPU time the setting takes
  from the cores that training processes share);
- `device_ms_per_batch`: the batch augmentation on the device (0 for the workers' setting);
- `images_per_s`: a whole pass of the loader with `--workers` workers, each batch moved to the device, augmented
  there if the setting says so, and normalised, as a training step receives it (no model: the most a step could
  be fed). The settings take turns for `--rounds` rounds; each figure is the median round.
- with `--step-batches N`, `pretraining_images_per_s`: N steps of trunk pre-training itself (pretrain.TagNet, a
  ResNet18 from scratch with a 100-tag head, AdamW, bf16 autocast on CUDA) fed by the setting's loader, after
  3 warm-up steps; the median of `--rounds` rounds. On a GPU this says whether the workers' augmentation held
  the steps back.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the captioner package of this checkout, installed or not

from captioner.data.collate import CaptionCollate  # noqa: E402
from captioner.data.dataset import CaptionDataset  # noqa: E402
from captioner.data.device_augment import augment_batch_on  # noqa: E402
from captioner.data.flickr8k import load_flickr8k  # noqa: E402
from captioner.data.sampling import EpochSampler  # noqa: E402
from captioner.data.transforms import TrainAugment  # noqa: E402
from captioner.engine import autocast_for, prepare_images  # noqa: E402
from captioner.pretrain import TagNet  # noqa: E402

SETTINGS = ("workers", "device")


def augmentation(kind: str, size: int) -> TrainAugment:
    if kind == "pretraining":  # pretrain.py's
        return TrainAugment(size, (0.35, 1.0), ratio=(3 / 4, 4 / 3), brightness=0.3, contrast=0.3, saturation=0.3,
                            hflip=True)
    return TrainAugment(size, (0.766, 1.0), brightness=0.0, contrast=0.0, saturation=0.0)  # the recipe's


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "flickr8k"), help="Flickr8k folder")
    p.add_argument("--images", type=int, default=1024, help="training images used (0: all)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--augment", choices=("pretraining", "recipe"), default="pretraining")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--step-batches", type=int, default=0, help="also time N pre-training steps per round (0: no)")
    return p.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_ms_per_image(dataset: CaptionDataset, sampler: EpochSampler, count: int = 256) -> float:
    keys = list(sampler)[:count]
    for key in keys:  # decoded into the cache first: a worker's steady state
        dataset[key]
    started = time.perf_counter()
    for key in keys:
        dataset[key]
    return (time.perf_counter() - started) / len(keys) * 1e3


def device_ms_per_batch(loader: DataLoader, device: torch.device, batches: int = 10) -> float:
    batch_list = [batch for _, batch in zip(range(batches), loader)]
    if batch_list[0].augment is None:
        return 0.0
    moved = [(b.images.to(device), b.augment) for b in batch_list]
    synchronize(device)
    started = time.perf_counter()
    for images, draws in moved:
        augment_batch_on(_Pixels(images, draws), device)
    synchronize(device)
    return (time.perf_counter() - started) / len(moved) * 1e3


class _Pixels:
    """The two fields augment_batch_on reads and writes, without a whole Batch."""

    def __init__(self, images: torch.Tensor, augment: torch.Tensor):
        self.images, self.augment = images, augment


def one_pass(loader: DataLoader, sampler: EpochSampler, epoch: int, device: torch.device) -> float:
    sampler.set_epoch(epoch)
    synchronize(device)
    started, seen = time.perf_counter(), 0
    for batch in loader:
        batch = augment_batch_on(batch, device)
        prepare_images(batch.images, device)
        seen += batch.images.shape[0]
    synchronize(device)
    return seen / (time.perf_counter() - started)


class PretrainingStep:
    """One step of trunk pre-training on random tag targets: what pretrain.py does per batch, without its data."""

    TAGS = 100

    def __init__(self, device: torch.device, images: int):
        torch.manual_seed(0)
        self.device = device
        self.model = TagNet("none", self.TAGS).to(device).to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.targets = (torch.rand(images, self.TAGS) < 0.05).float()  # (N, K), as sparse as caption words

    def __call__(self, images: torch.Tensor, rows: list[int]) -> torch.Tensor:
        with autocast_for(self.device):
            logits = self.model(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), self.targets[rows].to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


WARMUP_STEPS = 3  # pre-training steps per round before the clock starts (allocator, autotuning, first batches)


def pretraining_pass(loader: DataLoader, sampler: EpochSampler, epoch: int, device: torch.device,
                     step: PretrainingStep, batches: int, warmup: int = WARMUP_STEPS) -> float:
    sampler.set_epoch(epoch)
    seen, started = 0, None
    for done, batch in enumerate(itertools.islice(loader, warmup + batches)):
        if done == warmup:
            synchronize(device)
            started = time.perf_counter()
        batch = augment_batch_on(batch, device)
        step(prepare_images(batch.images, device), batch.indices)
        seen += batch.images.shape[0] if done >= warmup else 0
    synchronize(device)
    return seen / (time.perf_counter() - started) if started is not None else float("nan")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"no Flickr8k folder at {root} (give --root)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    records = load_flickr8k(root, "train")
    records = records[: args.images] if args.images else records
    available = math.ceil(len(records) / args.batch_size)  # batches in one pass over the images
    if args.step_batches and available < WARMUP_STEPS + args.step_batches:  # a pass would end before the clock did
        print(f"--step-batches {args.step_batches} needs {WARMUP_STEPS} + {args.step_batches} batches of "
              f"--batch-size {args.batch_size}: {len(records)} images give {available} (raise --images)",
              file=sys.stderr)
        return 2
    augment = augmentation(args.augment, args.image_size)
    loaders, results = {}, {}
    for setting in SETTINGS:
        dataset = CaptionDataset(records, args.image_size, augment=augment, cache_images=True,
                                 augment_later=setting == "device")
        sampler = EpochSampler(len(dataset), seed=0)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            collate_fn=CaptionCollate(None, 24), pin_memory=device.type == "cuda",
                            persistent_workers=args.workers > 0)
        one_pass(loader, sampler, 0, device)  # the workers decode every image once, as in a run's first epoch
        results[setting] = {"worker_ms_per_image": round(worker_ms_per_image(dataset, sampler), 4),
                            "device_ms_per_batch": round(device_ms_per_batch(loader, device), 4),
                            "images_per_s_rounds": []}
        loaders[setting] = (loader, sampler)
    for round_ in range(1, args.rounds + 1):
        for setting, (loader, sampler) in loaders.items():
            results[setting]["images_per_s_rounds"].append(round(one_pass(loader, sampler, round_, device), 1))
    if args.step_batches:
        step = PretrainingStep(device, len(records))
        for round_ in range(1, args.rounds + 1):
            for setting, (loader, sampler) in loaders.items():
                rate = pretraining_pass(loader, sampler, 100 + round_, device, step, args.step_batches)
                results[setting].setdefault("pretraining_images_per_s_rounds", []).append(round(rate, 1))
    for result in results.values():
        result["images_per_s"] = statistics.median(result["images_per_s_rounds"])
        if "pretraining_images_per_s_rounds" in result:
            result["pretraining_images_per_s"] = statistics.median(result["pretraining_images_per_s_rounds"])
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "images": len(records),
        "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
        "augment": args.augment, "settings": results,
        "worker_time_ratio": round(results["workers"]["worker_ms_per_image"]
                                   / max(results["device"]["worker_ms_per_image"], 1e-9), 2),
        "images_per_s_ratio": round(results["device"]["images_per_s"] / results["workers"]["images_per_s"], 3),
        **({"pretraining_images_per_s_ratio": round(results["device"]["pretraining_images_per_s"]
                                                    / results["workers"]["pretraining_images_per_s"], 3)}
           if args.step_batches else {}),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
