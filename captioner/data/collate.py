"""Batching: images stacked, every caption of every image tokenised and right-padded.

All captions of an image train against one encoder pass (`caption_image_index` maps each caption row to its
image row). The trunk is the expensive part, so this gets five captions' worth of supervision per image for
roughly the cost of one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import default_collate

from ..text import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from .sampling import mix_seed

_CAPTION_STREAM = 1  # keeps the caption choice's random stream apart from the augmentation's


class JpegBytes:
    """The JPEG files of a batch's rows for the GPU decoder (data/device_decode.py), held as one uint8 tensor.

    Why one tensor: a DataLoader worker hands its batch to the training process through shared memory, one
    shared segment and one file descriptor per tensor. As a tensor per file, 256 of them a batch, the handover
    cost more than reading the files: on the development CPU one worker delivered 1,530 images/s that way and
    4,070 as one tensor (two workers: 2,070 and 6,740). Iterating gives (image row, that file's bytes as a uint8
    (N_i,) view)."""

    def __init__(self, rows: Sequence[int], files: Sequence[torch.Tensor]):
        self.rows = list(rows)
        self.data = torch.cat(list(files)) if files else torch.empty(0, dtype=torch.uint8)  # (sum N_i,)
        self.ends = list(itertools.accumulate(f.numel() for f in files))  # where each file's bytes end

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        start = 0
        for row, end in zip(self.rows, self.ends):
            yield row, self.data[start:end]
            start = end


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) uint8
    tokens_in: torch.Tensor  # (C, T) bos + caption, PAD after
    targets: torch.Tensor  # (C, T) caption + eos, PAD after
    caption_image_index: torch.Tensor  # (C,) row of `images` each caption belongs to
    captions: list[list[str]]  # raw references per image
    image_ids: list[Any]
    paths: list[str]
    indices: list[int]  # dataset index of each image (its row in the feature cache)
    skipped: int  # items in this batch whose image could not be read
    bow_targets: torch.Tensor | None = None  # (B, V) 1.0 where the token occurs in any caption of the image
    features: torch.Tensor | None = None  # (B, C, h, w) fp16 frozen-prefix features from a FeatureStore, 0 where absent
    has_features: torch.Tensor | None = None  # (B,) bool: which rows of `features` are real (their images are zeros)
    # JPEG files for the GPU decoder (data/device_decode.py), iterated as (image row, uint8 (N,) file bytes); those
    # rows of `images` are placeholders until DeviceDecodingLoader decodes them to image_size x image_size.
    jpegs: JpegBytes | None = None
    image_size: int = 0
    # (C,) float: each caption's weight in the loss, for captions sampled from the model (scst.py: their
    # advantages, which may be negative); None for human captions, which all weigh the same
    row_weights: torch.Tensor | None = None
    # (B, 8) float: each image's augmentation draw (transforms.AugmentDraw), when `images` are not augmented yet
    # because augmentation runs on the training device (data/device_augment.py); None otherwise
    augment: torch.Tensor | None = None

    def _map(self, fn, move_has_features: bool = True) -> "Batch":
        maybe = lambda t: None if t is None else fn(t)  # noqa: E731
        has_features = maybe(self.has_features) if move_has_features else self.has_features
        return Batch(fn(self.images), fn(self.tokens_in), fn(self.targets), fn(self.caption_image_index),
                     self.captions, self.image_ids, self.paths, self.indices, self.skipped, maybe(self.bow_targets),
                     maybe(self.features), has_features, self.jpegs, self.image_size,
                     maybe(self.row_weights), maybe(self.augment))

    def to(self, device: torch.device) -> "Batch":
        """Tensors to `device`. JPEG bytes stay on the CPU, where nvjpeg reads them, and so does `has_features`:
        it only steers host-side choices (which rows to compute), and read on a GPU it would make the host wait."""
        return self._map(lambda t: t.to(device=device, non_blocking=True), move_has_features=False)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def without_rows(self, rows: Sequence[int]) -> "Batch":
        """The batch minus image rows `rows` (and their captions), which count as skipped: an image found
        unreadable after collation (on the GPU decoder) costs its sample, as in the CPU path."""
        dropped = set(rows)
        keep = [r for r in range(len(self.image_ids)) if r not in dropped]
        device = self.images.device
        keep_index = torch.tensor(keep, dtype=torch.long, device=device)
        new_row = torch.full((len(self.image_ids),), -1, dtype=torch.long, device=self.caption_image_index.device)
        new_row[keep] = torch.arange(len(keep), device=new_row.device)
        owners = new_row[self.caption_image_index]
        caption_keep = (owners >= 0).nonzero().flatten()
        pick = lambda t: None if t is None else t.index_select(0, keep_index.to(t.device))  # noqa: E731
        return Batch(self.images.index_select(0, keep_index), self.tokens_in.index_select(0, caption_keep),
                     self.targets.index_select(0, caption_keep), owners.index_select(0, caption_keep),
                     [self.captions[r] for r in keep], [self.image_ids[r] for r in keep],
                     [self.paths[r] for r in keep], [self.indices[r] for r in keep], self.skipped + len(dropped),
                     pick(self.bow_targets), pick(self.features), pick(self.has_features), None, self.image_size,
                     None if self.row_weights is None else self.row_weights.index_select(0, caption_keep),
                     pick(self.augment))


class CaptionCollate:
    """Collate function for `CaptionDataset` items (dicts, or None for an unreadable image, which is counted)."""

    def __init__(self, tokenizer: Tokenizer | None, max_len: int, captions_per_image: int = 0):
        """max_len counts bos; captions longer than max_len - 1 tokens are truncated (eos still added).
        captions_per_image 0 keeps all; tokenizer None skips tokenisation (evaluation batches)."""
        self.tokenizer, self.max_len, self.captions_per_image = tokenizer, max_len, captions_per_image

    def _sample(self, encoded: list[list[int]], seed: int | None) -> list[list[int]]:
        """The captions this step trains on: all, or `captions_per_image` drawn without replacement (from
        the item's own seed when it has one, see data/sampling.py; else from torch's global RNG)."""
        if self.captions_per_image:
            generator = None if seed is None else torch.Generator().manual_seed(mix_seed(seed, _CAPTION_STREAM))
            picks = torch.randperm(len(encoded), generator=generator)[: self.captions_per_image].tolist()
            encoded = [encoded[i] for i in picks]
        return [ids[: self.max_len - 1] for ids in encoded]

    def __call__(self, items: Sequence[dict | None]) -> Batch:
        good = [it for it in items if it is not None]
        skipped = len(items) - len(good)
        images, features, has_features = _stack_pixels_and_features(good)
        rows, owners, bow = [], [], None
        if self.tokenizer is not None:
            bow_rows, bow_ids = [], []  # (image row, token id) of every token of every caption: one scatter
            for image_row, it in enumerate(good):
                encoded = [self.tokenizer.encode(c) for c in it["captions"]]
                for ids in encoded:
                    bow_rows += [image_row] * len(ids)
                    bow_ids += ids
                chosen = self._sample(encoded, it.get("seed"))
                rows += chosen
                owners += [image_row] * len(chosen)
            bow = torch.zeros(len(good), self.tokenizer.vocab_size)
            bow[torch.tensor(bow_rows, dtype=torch.long), torch.tensor(bow_ids, dtype=torch.long)] = 1.0
        tokens_in, targets = teacher_forcing_tensors(rows)
        jpeg_rows = [row for row, it in enumerate(good) if it.get("jpeg") is not None]
        jpegs = JpegBytes(jpeg_rows, [good[row]["jpeg"] for row in jpeg_rows]) if jpeg_rows else None
        return Batch(images, tokens_in, targets, torch.tensor(owners, dtype=torch.long),
                     [list(it["captions"]) for it in good], [it["image_id"] for it in good],
                     [it["path"] for it in good], [it["index"] for it in good], skipped, bow, features, has_features,
                     jpegs, max((it.get("image_size", 0) for it in good), default=0), augment=stacked_draws(good))


def stacked_draws(items: Sequence[dict]) -> torch.Tensor | None:
    """(B, 8) float: the items' augmentation draws, when they carry them (augmentation on the training device,
    see data/device_augment.py; every training item then does); None when none does."""
    draws = [it.get("augment") for it in items]
    if all(draw is None for draw in draws):
        return None
    if any(draw is None for draw in draws):
        raise ValueError("a batch mixes items with and without augmentation draws: "
                         f"{', '.join(it['path'] for it, draw in zip(items, draws) if draw is None)[:300]} have none")
    return torch.stack(draws)


def teacher_forcing_tensors(captions: Sequence[Sequence[int]], ended: Sequence[bool] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of C captions (no bos/eos) -> tokens_in (C, T) = bos + caption and targets (C, T) = caption + eos,
    right-padded with PAD to T = longest + 1. `ended[i]` False leaves caption i without its eos target (a caption
    cut off at a length limit never chose to end); by default every caption ends."""
    length = max((len(ids) for ids in captions), default=0) + 1
    # Rows built as Python lists and converted once: a tensor per caption cost ~25 us each, 30 ms a batch
    rows_in, rows_out = [], []
    for row, ids in enumerate(captions):
        ids = list(ids)
        padding = [PAD_ID] * (length - 1 - len(ids))
        rows_in.append([BOS_ID] + ids + padding)
        rows_out.append(ids + [EOS_ID if ended is None or ended[row] else PAD_ID] + padding)
    tokens_in = torch.tensor(rows_in, dtype=torch.long).view(len(captions), length)
    targets = torch.tensor(rows_out, dtype=torch.long).view(len(captions), length)
    return tokens_in, targets


def _stack_pixels_and_features(items: Sequence[dict]):
    """-> images (B, 3, S, S) uint8, features (B, C, h, w) fp16 or None, has_features (B,) bool or None.

    Items from a FeatureStore carry features instead of pixels, and items for the GPU decoder JPEG bytes; a batch
    may mix them (epoch 1 of a partly filled cache). Missing rows are zeros: images of featured and JPEG rows
    (a (3, 1, 1) placeholder when no row has pixels), features of the others."""
    if not items:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), None, None
    featured = [it.get("features") is not None for it in items]
    pixels = [it["image"] for it in items if it["image"] is not None]
    blank = torch.zeros_like(pixels[0]) if pixels else torch.zeros(3, 1, 1, dtype=torch.uint8)
    images = _stack([blank if it["image"] is None else it["image"] for it in items])
    if not any(featured):
        return images, None, None
    template = next(it["features"] for it in items if it.get("features") is not None)
    features = _stack([it["features"] if f else torch.zeros_like(template) for it, f in zip(items, featured)])
    return images, features, torch.tensor(featured)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, except that in a DataLoader worker the result is made in shared memory (as default_collate
    makes it), where the handover to the training process finds it: otherwise the handover copies the whole
    batch once more. With two workers on the development CPU, 224 px batches arrived 20% faster."""
    return default_collate(tensors)
