"""Batching: images stacked, every caption of every image tokenised and right-padded.

All captions of an image train against one encoder pass (`caption_image_index` maps each caption row to its
image row). The trunk is the expensive part, so this gets five captions' worth of supervision per image for
roughly the cost of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..text import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from .sampling import mix_seed

_CAPTION_STREAM = 1  # keeps the caption choice's random stream apart from the augmentation's


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) uint8
    tokens_in: torch.Tensor  # (C, T) bos + caption, PAD after
    targets: torch.Tensor  # (C, T) caption + eos, PAD after
    caption_image_index: torch.Tensor  # (C,) row of `images` each caption belongs to
    captions: list[list[str]]  # raw references per image
    image_ids: list[Any]
    paths: list[str]
    indices: list[int]  # dataset index of each image (keys of in-memory feature caches)
    skipped: int  # items in this batch whose image could not be read
    bow_targets: torch.Tensor | None = None  # (B, V) 1.0 where the token occurs in any caption of the image

    def to(self, device: torch.device) -> "Batch":
        move = dict(device=device, non_blocking=True)
        return Batch(self.images.to(**move), self.tokens_in.to(**move), self.targets.to(**move),
                     self.caption_image_index.to(**move), self.captions, self.image_ids, self.paths, self.indices, self.skipped,
                     None if self.bow_targets is None else self.bow_targets.to(**move))


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
        images = torch.stack([it["image"] for it in good]) if good else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        rows, owners, bow = [], [], None
        if self.tokenizer is not None:
            bow = torch.zeros(len(good), self.tokenizer.vocab_size)
            for image_row, it in enumerate(good):
                encoded = [self.tokenizer.encode(c) for c in it["captions"]]
                for ids in encoded:
                    bow[image_row, ids] = 1.0
                chosen = self._sample(encoded, it.get("seed"))
                rows += chosen
                owners += [image_row] * len(chosen)
        length = max((len(r) for r in rows), default=0) + 1
        tokens_in = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        targets = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for i, ids in enumerate(rows):
            tokens_in[i, 0] = BOS_ID
            tokens_in[i, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
            targets[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            targets[i, len(ids)] = EOS_ID
        return Batch(images, tokens_in, targets, torch.tensor(owners, dtype=torch.long),
                     [list(it["captions"]) for it in good], [it["image_id"] for it in good],
                     [it["path"] for it in good], [it["index"] for it in good], skipped, bow)
