"""`fit(cfg)`: the whole training run — data, vocabulary, model, epochs, validation BLEU, checkpoints, logs.

Run folder: config.json (resolved config), log.jsonl (one JSON line per epoch), last.pt (every epoch),
best.pt (best validation BLEU-4 by real decoding).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .checkpoint import clean_state_dict, load_checkpoint, rng_state, save_checkpoint, set_rng_state, \
    tokenizer_from_payload, tokenizer_payload
from .config import RunConfig
from .curves import TENSORBOARD_DIR, write_epoch_scalars
from .data.collate import CaptionCollate
from .data.dataset import CaptionDataset
from .data.factory import load_records
from .data.transforms import TrainAugment
from .decoding import DecodeOptions
from .engine import evaluate, prepare_images, train_one_epoch, warmup_cosine
from .feature_cache import PrefixFeatureCache
from .errors import CaptionerError
from .models.captioner import Captioner
from .text import Tokenizer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionerError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def make_optimizer(param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where this torch supports it (CPU and CUDA since torch 2.4):
    on 2 CPU cores the per-parameter loop cost 64 ms a step against 18 ms fused, a tenth of a training step."""
    try:
        return torch.optim.AdamW(param_groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without a fused kernel
        return torch.optim.AdamW(param_groups, lr=lr)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def split_records(cfg: RunConfig, split: str):
    d = cfg.data
    captions, images = (d.train_captions, d.train_images) if split == "train" else (d.val_captions, d.val_images)
    return load_records(d.dataset, split, captions=captions, images=images, root=d.root,
                        karpathy_json=d.karpathy_json)


def make_loader(records, cfg: RunConfig, tokenizer: Tokenizer | None, train: bool, device: torch.device):
    d, t = cfg.data, cfg.train
    augment = TrainAugment(d.image_size) if train and d.augment else None
    dataset = CaptionDataset(records, d.image_size, augment=augment, cache_images=d.cache_images, strict=d.strict)
    collate = CaptionCollate(tokenizer if train else None, cfg.model.max_len, t.captions_per_image)
    generator = torch.Generator().manual_seed(t.seed)
    return DataLoader(dataset, batch_size=t.batch_size, shuffle=train, num_workers=t.workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", persistent_workers=t.workers > 0, generator=generator)


def calibrate_frozen_trunk(model, loader, device: torch.device, num_batches: int = 8) -> None:
    """Measure BatchNorm statistics for the frozen prefix of a randomly initialised trunk (see
    ResNet18Trunk.calibrate_prefix). Uses the first few training batches; the data order RNG advances."""
    def batches():
        for i, batch in enumerate(loader):
            if i >= num_batches:
                break
            if batch.images.shape[0]:
                yield prepare_images(batch.images, device)
    model.encoder.calibrate_prefix(batches())
    log.info("calibrated the frozen trunk's BatchNorm statistics on %d batches", num_batches)


def fit(cfg: RunConfig, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train per `cfg`; with `resume`, continue from that checkpoint (its config wins for model and data)."""
    payload = load_checkpoint(resume) if resume else None
    if payload is not None:
        saved = RunConfig.from_dict(payload["config"], source=f"checkpoint {resume}")
        # What a resume may change: how long, where to write, which device.
        saved.train.epochs, saved.train.out, saved.train.device = cfg.train.epochs, cfg.train.out, cfg.train.device
        cfg = saved
    out = Path(cfg.train.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    train_records, val_records = split_records(cfg, "train"), split_records(cfg, "val")
    if cfg.data.val_limit:
        val_records = val_records[: cfg.data.val_limit]
    if payload is not None:
        tokenizer = tokenizer_from_payload(payload)
    else:
        tokenizer = Tokenizer.train((c for r in train_records for c in r.captions), cfg.train.vocab_size)
        cfg.model.vocab_size = tokenizer.vocab_size
    cfg.save(out / "config.json")
    log.info("train %d images, val %d images, vocabulary %d, device %s", len(train_records), len(val_records),
             tokenizer.vocab_size, device)

    model = Captioner(cfg.model, load_encoder_weights=payload is None).to(device)
    model = model.to(memory_format=torch.channels_last)
    train_loader = make_loader(train_records, cfg, tokenizer, train=True, device=device)
    val_loader = make_loader(val_records, cfg, None, train=False, device=device)
    t = cfg.train
    optimizer = make_optimizer(model.param_groups(t.lr, t.encoder_lr, t.weight_decay), t.lr)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(t.epochs * steps_per_epoch, max(1, int(t.warmup_epochs * steps_per_epoch))))

    start_epoch, best = 1, float("-inf")
    if payload is None and cfg.model.encoder_weights == "none" and cfg.model.trainable_layers < 5:
        calibrate_frozen_trunk(model, train_loader, device)
    prefix_cache = None
    if cfg.model.trainable_layers < 5 and not cfg.data.augment and cfg.data.cache_images:
        prefix_cache = PrefixFeatureCache()
    if payload is not None:
        model.load_state_dict(clean_state_dict(payload["model"]))
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        start_epoch, best = payload["epoch"] + 1, payload["best_metric"]
        set_rng_state(payload["rng"])

    val_options = DecodeOptions(beam_size=t.val_beam_size, max_len=cfg.model.max_len)
    history = []
    for epoch in range(start_epoch, t.epochs + 1):
        started = time.time()
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, device, epoch, t.label_smoothing,
                                t.clip_grad, progress, prefix_cache)
        train_seconds = time.time() - started
        evaluation = evaluate(model, val_loader, tokenizer, device, val_options, progress=progress)
        metrics, captions = evaluation.metrics, evaluation.captions
        record = {"epoch": epoch, **stats, **{f"val_{k}": v for k, v in metrics.items()},
                  "lr": scheduler.get_last_lr()[-1], "train_seconds": round(train_seconds, 2),
                  "images_per_second": round(stats["images"] / max(train_seconds, 1e-9), 2),
                  "epoch_seconds": round(time.time() - started, 2),
                  "example": next(iter(captions.values()))}
        is_best = metrics["Bleu_4"] > best
        best = max(best, metrics["Bleu_4"])
        ckpt = {"model": clean_state_dict(model.state_dict()), "config": cfg.to_dict(),
                "tokenizer": tokenizer_payload(tokenizer), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step": epoch * steps_per_epoch,
                "best_metric": best, "metrics": {k: v for k, v in metrics.items()}, "rng": rng_state()}
        save_checkpoint(out / "last.pt", ckpt)
        if is_best:
            save_checkpoint(out / "best.pt", ckpt)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        history.append(record)
        log.info("epoch %d: loss %.4f, val BLEU-4 %.4f%s, %.1f img/s, e.g. %r", epoch, stats["train_loss"],
                 metrics["Bleu_4"], " (best)" if is_best else "", record["images_per_second"], record["example"])
        if t.tensorboard:
            write_epoch_scalars(out / TENSORBOARD_DIR, record)
    return {"out": str(out), "best_bleu_4": best, "history": history}
