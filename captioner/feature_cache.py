"""On-disk cache of the frozen trunk prefix's output: after the first epoch, training never decodes a JPEG.

With a partly or fully frozen trunk (`--trainable-layers` < 5) and no augmentation, the frozen stages produce
the same features for an image every epoch, yet decoding the JPEG and running those stages is most of a
training step. `FeatureStore` keeps them in one fp16 memory-mapped array per (trunk prefix weights, image size,
dataset) in a folder named by a hash of exactly those things, so

- a changed image size, trunk (weights, BatchNorm statistics, frozen depth) or dataset (paths, sizes, mtimes)
  gives another folder: a stale cache is never used, it is simply not the one looked up;
- the folder's meta.json repeats the key, and a folder whose meta.json disagrees with its name (a torn or
  hand-edited cache) is rebuilt with a warning;
- DataLoader workers read rows through their own mapping of the same file (MAP_SHARED), so rows the training
  process fills during epoch 1 are visible to them at once.

Each row has a `filled` flag written after its features. The cache is derived data: deleting the folder is
always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors' names, dtypes, shapes and bytes (order-independent of dict insertion)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def records_digest(records: Sequence[Any]) -> str:
    """sha256 of each image's path, size and modification time, in order: a replaced image changes it."""
    h = hashlib.sha256()
    for r in records:
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{r.path}|{stamp}\n".encode())
    return h.hexdigest()


class FeatureStore:
    """Rows of fp16 features (C, h, w), one per dataset index, memory-mapped from `folder`/features.npy."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder, self.meta = folder, meta
        shape = (meta["num_items"], *meta["feature_shape"])
        self.features = np.lib.format.open_memmap(folder / "features.npy", mode="r+", dtype=np.float16, shape=shape)
        self.filled = np.lib.format.open_memmap(folder / "filled.npy", mode="r+", dtype=np.uint8,
                                                shape=(meta["num_items"],))

    @classmethod
    def open(cls, root: str | Path, key: dict[str, Any], num_items: int, feature_shape: Sequence[int],
             create: bool = True) -> "FeatureStore":
        """The store for `key` under `root` (created when absent and `create`; under torchrun rank 0 creates
        and the others open it after a barrier)."""
        meta = {"version": CACHE_VERSION, "key": key, "num_items": num_items, "feature_shape": list(feature_shape)}
        name = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        folder = Path(root) / name
        meta_path = folder / "meta.json"
        if folder.exists():
            try:
                found = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                found = None
            if found != meta:
                if not create:
                    raise FileNotFoundError(f"feature cache {folder} is incomplete or does not match its key")
                log.warning("feature cache %s does not match its key (torn or edited); rebuilding it", folder)
                shutil.rmtree(folder)
        if not folder.exists():
            if not create:
                raise FileNotFoundError(f"feature cache {folder} does not exist")
            tmp = folder.with_name(f".{name}.tmp{os.getpid()}")
            tmp.mkdir(parents=True)
            np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16,
                                      shape=(num_items, *feature_shape)).flush()
            np.lib.format.open_memmap(tmp / "filled.npy", mode="w+", dtype=np.uint8, shape=(num_items,)).flush()
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            os.replace(tmp, folder)
            log.info("feature cache %s: %d x %s fp16 (%.1f MB)", folder, num_items, tuple(feature_shape),
                     num_items * int(np.prod(feature_shape)) * 2 / 1e6)
        return cls(folder, meta)

    def __len__(self) -> int:
        return int(self.filled.sum())

    def has(self, index: int) -> bool:
        return bool(self.filled[index])

    def get(self, index: int) -> torch.Tensor:
        """fp16 (C, h, w), a copy (the mapping stays read-only to callers)."""
        return torch.from_numpy(np.array(self.features[index]))

    def put(self, indices: Sequence[int], features: torch.Tensor) -> None:
        """features (B, C, h, w) for dataset `indices`; the flag after the data."""
        values = features.detach().to("cpu", torch.float16).numpy()
        for row, index in enumerate(indices):
            self.features[index] = values[row]
        for index in indices:
            self.filled[index] = 1

    def flush(self) -> None:
        self.features.flush()
        self.filled.flush()

    # DataLoader workers receive a pickled copy: send the folder, map the file again on arrival.
    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["meta"])


def prefix_features(encoder, images: torch.Tensor, cached: torch.Tensor | None, has_cached: torch.Tensor | None,
                    indices: Sequence[int], store: FeatureStore | None) -> torch.Tensor:
    """The frozen prefix's output for a batch, (B, C, h, w) float on the images' device, channels_last.

    Rows whose features came from the store (`has_cached`) use them; the others are computed from their images
    and written to the store. Both are fp16-rounded, so epoch 1 and later epochs see the same values.
    """
    device = images.device
    if has_cached is None or not bool(has_cached.any()):
        computed = encoder.forward_prefix(images).half()  # (B, C, h, w)
        if store is not None:
            store.put(indices, computed)
        return computed.float().contiguous(memory_format=torch.channels_last)
    out = cached.to(device, non_blocking=True)  # (B, C, h, w) fp16, zeros where missing
    missing = (~has_cached).nonzero().flatten().tolist()
    if missing:
        rows = torch.tensor(missing, device=device)
        computed = encoder.forward_prefix(images.index_select(0, rows)).half()
        out = out.clone()
        out[rows] = computed
        if store is not None:
            store.put([indices[r] for r in missing], computed)
    return out.float().contiguous(memory_format=torch.channels_last)
