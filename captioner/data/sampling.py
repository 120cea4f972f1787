"""The training data order, as a pure function of (seed, epoch): what makes a killed run resumable exactly.

A DataLoader with `shuffle=True` draws its order from a generator whose state moves on every epoch and every
worker start, so after a crash nobody can say which images the interrupted epoch had still to see. Here the
order of epoch e is `randperm(n)` under a generator seeded from (seed, e), and every random choice made for
one item (which captions it trains on, its augmentation) comes from a seed derived from (seed, e, index).
Resuming at batch k of epoch e is then "start the same order at item k * batch_size": nothing to replay,
no image decoded for the batches already done, and the same result with 0 or 8 DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Sampler

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads consecutive seeds/epochs/indices far apart


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (deterministic across processes, unlike Python's hash())."""
    value = 0
    for part in parts:
        value = ((value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 1) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


class ItemKey(NamedTuple):
    """What the sampler hands the dataset: which item, and the seed for every random choice about it."""

    index: int
    seed: int


class EpochSampler(Sampler[ItemKey]):
    """Yields ItemKeys in the order of the current epoch, from position `start` on.

    `set_epoch(e)` selects the order; `start` (in items, a multiple of the batch size when resuming) skips
    what an interrupted run already trained on. With `shuffle=False` the order is 0..n-1 (item seeds still
    differ per epoch).

    Under torchrun, process `rank` of `world_size` takes every world_size-th item of the one global order
    (padded by wrapping around so all processes get the same count), so the first batch of size b on each of
    two processes holds the same 2b images as the first batch of size 2b of a single process.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_process = -(-num_items // world_size)  # ceil
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_process:
            raise ValueError(f"start {start} outside 0..{self.per_process}")
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The whole epoch's item order (including the part before `start`)."""
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self) -> Iterator[ItemKey]:
        order = self.order()
        order += order[: self.per_process * self.world_size - len(order)]  # pad (world_size > 1 only)
        for index in order[self.rank :: self.world_size][self.start :]:
            yield ItemKey(index, mix_seed(self.seed, self.epoch, index))

    def __len__(self) -> int:
        return self.per_process - self.start
