"""What a training run reads: its records, its DataLoaders (augmentation in the workers or on the device, nvjpeg
decoding), the frozen trunk's BatchNorm calibration, and the feature cache of the frozen prefix."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .config import RunConfig
from .data.collate import CaptionCollate, stacked_draws
from .data.dataset import CaptionDataset, ignore_stop_signals
from .data.device_augment import DeviceAugmentLoader, augment_batch
from .data.device_decode import DeviceDecodingLoader
from .data.factory import load_records
from .data.sampling import EpochSampler
from .data.transforms import TrainAugment
from .distributed import Distributed
from .engine import fill_feature_store, prepare_images
from .errors import CaptionerError
from .feature_cache import FeatureStore, records_digest, tensors_digest
from .text import Tokenizer

log = logging.getLogger(__name__)


def split_records(cfg: RunConfig, split: str):
    d = cfg.data
    captions, images = (d.train_captions, d.train_images) if split == "train" else (d.val_captions, d.val_images)
    return load_records(d.dataset, split, captions=captions, images=images, root=d.root,
                        karpathy_json=d.karpathy_json)


def train_and_val_records(cfg: RunConfig):
    """The run's training records and its validation records (the first --val-limit of them, when set)."""
    train_records, val_records = split_records(cfg, "train"), split_records(cfg, "val")
    return train_records, val_records[: cfg.data.val_limit] if cfg.data.val_limit else val_records


AUGMENT_PLACES = ("auto", "workers", "device")


def make_loader(records, cfg: RunConfig, tokenizer: Tokenizer | None, train: bool, device: torch.device,
                dist: Distributed | None = None):
    """Training batches come in EpochSampler order (a function of seed and epoch, see data/sampling.py).
    The loader's own generator only seeds worker processes, so iterating never touches the global RNG,
    which a resumed run restores for dropout."""
    d, t = cfg.data, cfg.train
    augment = train_augment(cfg) if train else None
    if d.gpu_decode and device.type != "cuda":
        raise CaptionerError(f"--gpu-decode decodes JPEGs with nvjpeg on a CUDA device; this run uses {device}")
    on_device = augment_on_device(d.augment_on, device) and augment is not None  # the setting checked always
    encoded = d.gpu_decode and (augment is None or on_device)
    if d.gpu_decode and not encoded:
        log.warning("--gpu-decode with --augment-on workers: augmented training images are decoded on the CPU "
                    "(augmentation runs there); validation images are decoded on the GPU")
    dataset = CaptionDataset(records, d.image_size, augment=augment, cache_images=d.cache_images and not encoded,
                             strict=d.strict, encoded=encoded, augment_later=on_device)
    collate = CaptionCollate(tokenizer if train else None, cfg.model.max_len, t.captions_per_image)
    dist = dist or Distributed()
    sampler = EpochSampler(len(dataset), t.seed, shuffle=train, rank=dist.rank, world_size=dist.world_size)
    loader = DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, num_workers=t.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=t.workers > 0,
                        generator=torch.Generator().manual_seed(t.seed), worker_init_fn=ignore_stop_signals)
    if encoded:
        loader = DeviceDecodingLoader(loader, device)
    return DeviceAugmentLoader(loader, device) if on_device else loader


def augment_on_device(setting: str, device: torch.device) -> bool:
    """Whether --augment-on SETTING computes the training augmentation on `device` as a batch (auto: on CUDA,
    where it frees the workers' CPU time; on a CPU device the workers already run in parallel with the step)."""
    if setting not in AUGMENT_PLACES:
        raise CaptionerError(f"--augment-on must be one of {', '.join(AUGMENT_PLACES)}, got {setting!r}")
    return setting == "device" or (setting == "auto" and device.type == "cuda")


def train_augment(cfg: RunConfig) -> TrainAugment | None:
    """The training augmentation the data section asks for (None without --augment)."""
    d = cfg.data
    if not d.augment:
        if d.hflip:
            raise CaptionerError("--hflip is an option of --augment: add --augment (or drop --hflip)")
        return None
    try:
        return TrainAugment(d.image_size, (d.augment_scale_min, 1.0), brightness=d.color_jitter,
                            contrast=d.color_jitter, saturation=d.color_jitter, hflip=d.hflip)
    except ValueError as exc:
        raise CaptionerError(f"augmentation settings (--augment-scale-min, --color-jitter): {exc}") from None


def calibrate_frozen_trunk(model, dataset: CaptionDataset, seed: int, device: torch.device, num_images: int = 128,
                           chunk: int = 16) -> None:
    """Measure BatchNorm statistics for the frozen prefix of a randomly initialised trunk (see
    ResNet18Trunk.calibrate_prefix) on the first `num_images` of epoch 0's order, in chunks of `chunk`: the same
    images whatever the batch size or number of processes, so every process (and a single-process run with
    the same global batch) gets identical statistics.

    None of those images readable is an error, raised before the run changes anything in its folder: the
    statistics would stay those of an untouched BatchNorm and the epochs would skip every image anyway."""
    order = EpochSampler(len(dataset), seed).order()[:num_images]
    read = 0

    def batches():
        nonlocal read
        for start in range(0, len(order), chunk):
            items = [item for item in (dataset[i] for i in order[start : start + chunk]) if item is not None]
            read += len(items)
            if items:
                images = torch.stack([item["image"] for item in items])
                draws = stacked_draws(items)  # augmentation that would run on the device (augment_later)
                yield prepare_images(images if draws is None else augment_batch(images, draws), device)

    encoded, dataset.encoded = dataset.encoded, False  # pixels decoded here, whatever the loader does later
    try:
        model.encoder.calibrate_prefix(batches())
    finally:
        dataset.encoded = encoded
    if read == 0:
        raise CaptionerError(f"none of the {len(order)} training images read to calibrate the frozen trunk could be "
                             f"read (the first: {dataset.records[order[0]].path}); see the warnings above")
    log.info("calibrated the frozen trunk's BatchNorm statistics on %d images%s", read,
             f" ({len(order) - read} unreadable, skipped)" if read < len(order) else "")


def feature_cache_folder(cfg: RunConfig, out: Path) -> Path | None:
    """Where frozen-prefix features are cached, or None when they cannot be (nothing frozen, or augmented
    images, whose features differ every epoch) or the user turned the cache off."""
    setting = cfg.data.feature_cache
    if setting == "off" or cfg.model.trainable_layers >= cfg.model.trunk_stages or cfg.data.augment:
        return None
    return out / "feature_cache" if setting == "auto" else Path(setting)


def open_feature_store(cfg: RunConfig, model, records, folder: Path, device: torch.device,
                       create: bool = True) -> FeatureStore:
    """The FeatureStore of `records` for this model's frozen prefix, keyed by the prefix's weights and BatchNorm
    statistics (after calibration or a resume), the trunk split, the image size and the split's files."""
    size = cfg.data.image_size
    with torch.no_grad():
        probe = model.encoder.forward_prefix(torch.zeros(1, 3, size, size, device=device))  # (1, C, h, w)
    key = {"prefix": tensors_digest(model.encoder.prefix.state_dict()), "trainable_layers": cfg.model.trainable_layers,
           "trunk_stages": cfg.model.trunk_stages,
           "image_size": size, "records": records_digest(records)}
    return FeatureStore.open(folder, key, len(records), probe.shape[1:], create=create)


def existing_feature_store(cfg: RunConfig, model, records, device: torch.device) -> FeatureStore | None:
    """The store the training run of this checkpoint filled for these very images, if there is one (what lets
    `evaluate` skip the JPEGs of a validation split the run already cached)."""
    folder = feature_cache_folder(cfg, Path(cfg.train.out))
    if folder is None or not folder.is_dir():
        return None
    try:
        store = open_feature_store(cfg, model, records, folder, device, create=False)
    except FileNotFoundError:
        return None
    log.info("using cached features from %s (%d of %d images)", store.folder, len(store), len(records))
    return store


def attach_feature_stores(cfg: RunConfig, model, loaders: dict[str, DataLoader], out: Path, device: torch.device,
                          dist: Distributed) -> dict[str, FeatureStore]:
    """One FeatureStore per split (see open_feature_store), attached to the split's dataset. Under torchrun
    rank 0 creates them and the others open them after a barrier."""
    folder = feature_cache_folder(cfg, out)
    if folder is None:
        return {}
    stores = {}
    for split, loader in loaders.items():
        dataset = loader.dataset
        if dist.is_main:
            store = open_feature_store(cfg, model, dataset.records, folder, device)
        dist.barrier()
        if not dist.is_main:
            store = open_feature_store(cfg, model, dataset.records, folder, device, create=False)
        dataset.features = store
        dataset.cache_images = False  # pixels are needed once, for the features; no point keeping them
        stores[split] = store
        log.info("%s features: %s (%d of %d images cached)", split, store.folder, len(store), len(dataset))
    return stores


def extract_features(model, loaders: dict[str, DataLoader], stores: dict[str, FeatureStore], device: torch.device,
             dist: Distributed, progress: bool) -> dict[str, Any]:
    """`captioner extract-features`: fill every split's store (each process its share), without training."""
    if not stores:
        raise CaptionerError("nothing to cache: feature caching needs --trainable-layers below 5, no --augment, "
                             "and --feature-cache not 'off'")
    started = time.time()
    for split, loader in loaders.items():
        loader.sampler.set_epoch(1)
        fill_feature_store(model, loader, stores[split], device, progress, desc=f"features {split}")
    dist.barrier()
    return {"rank": dist.rank, "seconds": round(time.time() - started, 2),
            **{split: {"folder": str(s.folder), "cached": len(s), "images": s.meta["num_items"]}
               for split, s in stores.items()}}
