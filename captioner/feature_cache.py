"""In-memory cache of the frozen trunk prefix's output, keyed by dataset index.

With a partly frozen trunk, the frozen stages cost most of a training step's forward pass yet produce the
same features every epoch (no augmentation, fixed BatchNorm statistics). Caching them in fp16 turns every
epoch after the first into "run the trainable stages only". Entries past `max_bytes` are not stored (those
images are simply recomputed), so a large dataset degrades to the uncached speed instead of running out of RAM.
"""

from __future__ import annotations

from typing import Sequence

import torch


class PrefixFeatureCache:
    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._store: dict[int, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def features(self, encoder, images: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """images (B, 3, H, W) normalised on the compute device; indices (B,) -> prefix features (B, C, h, w),
        fp16-rounded whether they came from the cache or not, so epoch 1 and later epochs see the same values."""
        missing = [row for row, key in enumerate(indices) if key not in self._store]
        self.misses += len(missing)
        self.hits += len(indices) - len(missing)
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            rows = torch.tensor(missing, device=images.device)
            computed = encoder.forward_prefix(images.index_select(0, rows)).half()  # (M, C, h, w)
            for out_row, row in enumerate(missing):
                fresh[row] = computed[out_row]
                self._remember(indices[row], computed[out_row])
        parts = [fresh[row] if row in fresh else self._store[key].to(images.device, non_blocking=True)
                 for row, key in enumerate(indices)]
        return torch.stack(parts).float().contiguous(memory_format=torch.channels_last)

    def _remember(self, key: int, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if self.bytes + size <= self.max_bytes:
            self._store[key] = features.cpu()
            self.bytes += size
