"""Pre-training the trunk on the captions' words before captioning: `captioner pretrain-trunk`, and
`train --trunk-pretrain-epochs N`, which runs it first inside the run.

Trained from scratch on a few thousand photos, a captioner's decoder learns the captions' language long before
its trunk learns to see: validation BLEU peaks after a few epochs and then falls while the training loss keeps
dropping (README, "Flickr8k from scratch"). This stage trains the trunk alone first, on a task that needs the
photos and nothing but the training captions: which content words the captions of an image use (multi-label
tagging, a soft target per word: the share of the image's captions that use it). Captioning then starts from a
trunk that already tells a dog from a beach. No outside data or weights are involved.

The result is a ResNet18 state dict under "state_dict" (torchvision's key names, no `fc`), with the tag
vocabulary and per-epoch history beside it: any `--encoder-weights PATH` loads it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .atomic import write_atomically
from .config import RunConfig
from .data.collate import stacked_draws
from .data.dataset import CaptionDataset, ignore_stop_signals, stop_workers
from .data.device_augment import augment_batch
from .data.records import ImageRecord
from .data.transforms import TrainAugment
from .feature_cache import records_digest
from .engine import autocast_for, prepare_images, warmup_cosine
from .errors import CaptionerError
from .models.encoder import load_resnet18
from .training import make_optimizer
from .training_data import augment_on_device

log = logging.getLogger(__name__)

# Words that say nothing about what is in the picture; every other word used by enough images is a tag.
STOPWORDS = frozenset(
    "a an the and or but of in on at to into onto from with without by for as is are be being been was were "
    "it its his her their them they he she him this that these those there here while some other another "
    "who which what where has have having up down out over off near next through".split()
)
# Mirrored training images would contradict these (the captions are not swapped here, unlike in captioning).
MIRRORED_WORDS = frozenset({"left", "right"})
_WORD = re.compile(r"[a-z]+")


def caption_words(caption: str) -> set[str]:
    return set(_WORD.findall(caption.lower()))


def tag_vocabulary(records: Sequence[ImageRecord], size: int, min_images: int = 5,
                   exclude: frozenset[str] = frozenset()) -> list[str]:
    """The `size` content words used by the captions of the most images (at least `min_images`), most used first,
    ties alphabetical, so the list is a function of the records alone."""
    counts: Counter[str] = Counter()
    for record in records:
        counts.update(set().union(*(caption_words(c) for c in record.captions)) if record.captions else set())
    usable = [(w, n) for w, n in counts.items() if n >= min_images and w not in STOPWORDS and w not in exclude]
    usable.sort(key=lambda wn: (-wn[1], wn[0]))
    return [w for w, _ in usable[:size]]


def tag_targets(records: Sequence[ImageRecord], tags: Sequence[str]) -> torch.Tensor:
    """(N, K) float: the share of record n's captions that use tag k (0 where none do)."""
    column = {t: k for k, t in enumerate(tags)}
    rows, columns, shares = [], [], []  # filled in Python, written once: element-wise tensor writes took 1.4 s
    for n, record in enumerate(records):
        uses = Counter(column[w] for c in record.captions for w in caption_words(c) if w in column)
        for k, count in uses.items():
            rows.append(n)
            columns.append(k)
            shares.append(count / len(record.captions))
    targets = torch.zeros(len(records), len(tags))
    targets[torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)] = torch.tensor(shares)
    return targets


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over tags of the average precision of ranking the images by `scores` (N, K) for `labels` (N, K) bool;
    tags without a positive image are left out. 1.0 ranks every positive first; random scores give about the
    tag's share of positives."""
    order = scores.argsort(dim=0, descending=True)  # (N, K) image rows, best first, per tag
    hits = labels.gather(0, order).float()  # (N, K)
    positives = hits.sum(0)  # (K,)
    precision_at = hits.cumsum(0) / torch.arange(1, hits.shape[0] + 1, dtype=torch.float32).unsqueeze(1)
    per_tag = (precision_at * hits).sum(0) / positives.clamp(min=1)
    present = positives > 0
    return float(per_tag[present].mean()) if present.any() else float("nan")


TAG_LOSSES = ("sigmoid", "softmax")


def tag_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """logits, targets (B, K) -> scalar. "sigmoid": binary cross-entropy per tag against the soft targets, mean
    over tags and images. "softmax": cross-entropy of one softmax over the tags against the image's targets
    scaled to sum to 1, mean over the images that have a tag (large-scale weakly supervised pre-training on
    hashtags found it better than per-tag sigmoids: a positive tag's gradient is not diluted by the many
    absent ones)."""
    logits = logits.float()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if kind != "softmax":
        raise ValueError(f"tag loss must be one of {', '.join(TAG_LOSSES)}, got {kind!r}")
    totals = targets.sum(1)  # (B,)
    tagged = totals > 0
    if not tagged.any():
        return logits.sum() * 0.0  # no tag in the batch: nothing to learn, but a graph to step through
    distribution = targets[tagged] / totals[tagged].unsqueeze(1)
    return -(distribution * F.log_softmax(logits[tagged], dim=1)).sum(1).mean()


class _ImagesAndRows:
    """Collate: (uint8 images (B, 3, S, S), dataset rows (B,), augmentation draws (B, 8) or None when the images
    come augmented already), dropping unreadable images (None items)."""

    def __call__(self, items: list[dict[str, Any] | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        items = [item for item in items if item is not None]
        if not items:
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), None
        return (torch.stack([item["image"] for item in items]), torch.tensor([item["index"] for item in items]),
                stacked_draws(items))


def _pixels(images: torch.Tensor, draws: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A collated batch -> normalised images on `device`, augmented there first when they come with draws."""
    images = images.to(device, non_blocking=True)
    return prepare_images(images if draws is None else augment_batch(images, draws), device)


class TagNet(nn.Module):
    """ResNet18 with a linear tag head on its globally pooled layer4 features: images (B, 3, S, S) -> (B, K)."""

    def __init__(self, weights: str, num_tags: int, dropout: float = 0.1):
        super().__init__()
        self.net = load_resnet18(weights)
        self.net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.net.fc.in_features, num_tags))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """What `--encoder-weights` loads: torchvision's ResNet18 keys, without the head."""
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items() if not k.startswith("fc.")}


def _loader(records, cfg: RunConfig, augment: TrainAugment | None, shuffle: bool, device: torch.device) -> DataLoader:
    """Batches of (images, rows, draws); with --augment-on resolving to the device, the workers only draw each
    image's augmentation and the training step applies it (data/device_augment.py)."""
    later = augment is not None and augment_on_device(cfg.data.augment_on, device)
    dataset = CaptionDataset(records, cfg.data.image_size, augment=augment, cache_images=cfg.data.cache_images,
                             strict=cfg.data.strict, augment_later=later)
    t = cfg.train
    return DataLoader(dataset, batch_size=t.batch_size, shuffle=shuffle, num_workers=t.workers,
                      collate_fn=_ImagesAndRows(), pin_memory=device.type == "cuda",
                      persistent_workers=t.workers > 0, generator=torch.Generator().manual_seed(t.seed),
                      worker_init_fn=ignore_stop_signals,
                      drop_last=shuffle and len(dataset) > t.batch_size)


@torch.no_grad()
def _score(model: TagNet, loader: DataLoader, targets: torch.Tensor, device: torch.device) -> float:
    model.eval()
    scores = torch.zeros_like(targets)
    seen = torch.zeros(len(targets), dtype=torch.bool)
    for images, rows, draws in loader:
        if len(rows):
            with autocast_for(device):
                scores[rows] = model(_pixels(images, draws, device)).float().cpu()
            seen[rows] = True
    return mean_average_precision(scores[seen], targets[seen] > 0)


def pretraining_settings(cfg: RunConfig, train_records: Sequence[ImageRecord],
                         val_records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Everything the pre-trained trunk depends on, stored with it: a run reuses RUN/trunk_pretrained.pt only
    when these are equal (images by path, size and modification time, captions by their text, the validation
    split too since it picks the epoch kept)."""
    t = cfg.train
    start = cfg.model.encoder_weights
    return {"epochs": t.trunk_pretrain_epochs, "lr": t.trunk_pretrain_lr, "tags": t.trunk_pretrain_tags,
            "crop": t.trunk_pretrain_crop, "loss": t.trunk_pretrain_loss, "image_size": cfg.data.image_size,
            "batch_size": t.batch_size, "weight_decay": t.weight_decay, "clip_grad": t.clip_grad, "seed": t.seed,
            "start_weights": start if start in ("none", "imagenet") else records_digest([ImageRecord(0, start, ())]),
            "train": _records_and_captions_digest(train_records), "val": _records_and_captions_digest(val_records)}


def _records_and_captions_digest(records: Sequence[ImageRecord]) -> str:
    captions = hashlib.sha256("\n".join("\t".join(r.captions) for r in records).encode()).hexdigest()
    return f"{records_digest(records)}:{captions}"


def pretrain_trunk(cfg: RunConfig, train_records: Sequence[ImageRecord], val_records: Sequence[ImageRecord],
                   out_path: str | Path, device: torch.device, progress: bool = True,
                   settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ResNet18 (from cfg.model.encoder_weights) to predict the training captions' content words for
    cfg.train.trunk_pretrain_epochs epochs (AdamW at trunk_pretrain_lr, warm-up then cosine, bf16 on CUDA), with
    random crops down to trunk_pretrain_crop of the area, colour jitter 0.3 and mirroring; at the end, write the
    epoch with the best validation mean average precision to `out_path` (an interrupted pre-training starts over:
    it takes seconds per epoch on a GPU). `settings`: pretraining_settings of these arguments, when the caller
    has them already. Returns the summary (also stored in the file)."""
    t = cfg.train
    if t.trunk_pretrain_epochs < 1:
        raise CaptionerError(f"--trunk-pretrain-epochs must be at least 1 here, got {t.trunk_pretrain_epochs}")
    if t.trunk_pretrain_loss not in TAG_LOSSES:
        raise CaptionerError(f"--trunk-pretrain-loss must be one of {', '.join(TAG_LOSSES)}, "
                             f"got {t.trunk_pretrain_loss!r}")
    if not 0 < t.trunk_pretrain_crop <= 1:
        raise CaptionerError(f"--trunk-pretrain-crop must be in (0, 1], got {t.trunk_pretrain_crop}")
    tags = tag_vocabulary(train_records, t.trunk_pretrain_tags, exclude=MIRRORED_WORDS)
    if not tags:
        raise CaptionerError("trunk pre-training: no caption word is used by 5 or more training images; "
                             "there is nothing to learn tags from")
    train_targets, val_targets = tag_targets(train_records, tags), tag_targets(val_records, tags)
    augment = TrainAugment(cfg.data.image_size, (t.trunk_pretrain_crop, 1.0), ratio=(3 / 4, 4 / 3), brightness=0.3,
                           contrast=0.3, saturation=0.3, hflip=True)
    train_loader = _loader(train_records, cfg, augment, shuffle=True, device=device)
    val_loader = _loader(val_records, cfg, None, shuffle=False, device=device)
    torch.manual_seed(t.seed)
    model = TagNet(cfg.model.encoder_weights, len(tags)).to(device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = make_optimizer([{"params": decay, "weight_decay": t.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], t.trunk_pretrain_lr)
    steps = t.trunk_pretrain_epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, len(train_loader))))
    log.info("pre-training the trunk on %d caption words (%s, ...) for %d epochs: %d training images, %d validation",
             len(tags), ", ".join(tags[:8]), t.trunk_pretrain_epochs, len(train_records), len(val_records))
    out_path = Path(out_path)
    settings = settings or pretraining_settings(cfg, train_records, val_records)
    max_norm = t.clip_grad if t.clip_grad > 0 else math.inf  # 0 = no clipping, as in captioning
    best, history = -math.inf, []
    try:
        for epoch in range(1, t.trunk_pretrain_epochs + 1):
            started, batches, skipped = time.time(), 0, 0
            model.train()
            total = torch.zeros((), device=device)  # summed on the device: a loss read per step would wait for it
            for images, rows, draws in _progress(train_loader, progress, f"trunk pre-training {epoch}"):
                if not len(rows):
                    continue
                with autocast_for(device):
                    logits = model(_pixels(images, draws, device))
                loss = tag_loss(logits, train_targets[rows].to(device, non_blocking=True), t.trunk_pretrain_loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                # The step's wait for the GPU (its only one with the sigmoid loss): a NaN/inf loss or gradient
                # never reaches the weights
                if not bool(torch.isfinite(loss.detach() + norm)):
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    continue
                optimizer.step()
                scheduler.step()
                total += loss.detach()
                batches += 1
            if skipped:
                log.warning("trunk pre-training epoch %d: skipped %d steps with a non-finite loss or gradient", epoch,
                            skipped)
            if batches == 0:
                raise CaptionerError(f"trunk pre-training epoch {epoch}: no step had a finite loss and gradient")
            val_map = _score(model, val_loader, val_targets, device)
            record = {"epoch": epoch, "loss": round(float(total) / max(1, batches), 5), "val_map": round(val_map, 4),
                      "seconds": round(time.time() - started, 1)}
            history.append(record)
            log.info("trunk pre-training epoch %d: loss %.4f, validation tag mAP %.4f%s, %.0f s", epoch, record["loss"],
                     val_map, " (best)" if val_map > best else "", record["seconds"])
            if val_map > best or (math.isnan(val_map) and epoch == t.trunk_pretrain_epochs):  # no validation: the last
                best = val_map if val_map > best else best
                kept = {"state_dict": model.trunk_state_dict(), "best_epoch": epoch, "best_val_map": round(val_map, 4)}
    finally:
        stop_workers(train_loader, val_loader)  # however the pre-training ends
    # Written once, complete: a file from a run killed half-way would otherwise pass for a finished one
    summary = {"tags": tags, "best_epoch": kept["best_epoch"], "best_val_map": kept["best_val_map"],
               "settings": settings, "history": history}
    _save(out_path, {"state_dict": kept["state_dict"], **summary})
    return {**summary, "path": str(out_path)}


def _save(path: Path, payload: dict[str, Any]) -> None:
    try:
        write_atomically(path, lambda handle: torch.save(payload, handle), durable=True)
    except OSError as exc:
        raise CaptionerError(f"cannot write the pre-trained trunk {path}: {exc}") from None


def _progress(loader, enabled: bool, description: str):
    return tqdm(loader, desc=description, disable=None if enabled else True, leave=False, dynamic_ncols=True)
