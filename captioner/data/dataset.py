"""ImageRecords -> training/evaluation items (uint8 image tensor + raw captions).

Tokenisation is left to the collate step (it needs the SentencePiece model); this dataset only owns the
pixels: reading, resizing, optional caching and augmentation.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageReadError
from .device_decode import encoded_jpeg
from .images import load_image_tensor
from .records import ImageRecord
from .sampling import ItemKey
from .transforms import TrainAugment, swap_left_right

logger = logging.getLogger(__name__)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGINT and SIGTERM are left to the main process.

    Ctrl-C and cluster schedulers (Slurm's time limit, scancel) signal every process of the job, the loader's
    workers included. A worker that died of it would take the run down with "DataLoader worker exited
    unexpectedly" in the middle of a batch; ignored here, the main process finishes its batch, writes last.pt
    and stops the workers itself (they also exit on their own once the main process is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(*loaders) -> None:
    """Stops the loaders' persistent worker processes now; called by a run as it ends, on an error above all.

    Workers ignore SIGTERM (ignore_stop_signals), and the terminate that multiprocessing sends its children at
    interpreter exit is a SIGTERM: a run ending on an error while the error's traceback still holds a loader's
    iterator (whose clean-up then never runs) would wait for its workers forever. The iterator's own shutdown
    asks them to exit through their queues, which they obey. Wrappers (DeviceDecodingLoader,
    DeviceAugmentLoader) are followed to their DataLoader through `loader`."""
    for loader in loaders:
        while not isinstance(loader, DataLoader) and hasattr(loader, "loader"):
            loader = loader.loader
        iterator = getattr(loader, "_iterator", None)  # where a DataLoader keeps its persistent workers' iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


class CaptionDataset(Dataset):
    """Items: dict(image=uint8 (3, S, S), captions=list[str], image_id=..., path=str, index=i, seed=s|None,
    flipped=bool). A mirrored item (TrainAugment with hflip) carries its captions mirrored as well ("left" and
    "right" swapped), which is what the collate tokenises.

    Indexed by an int, or by an ItemKey(index, seed) from EpochSampler: then the augmentation and the
    collate's caption choice draw from generators seeded by `seed`, so an item's randomness depends only on
    (run seed, epoch, index), not on worker processes or on where a resumed run restarted.

    An unreadable image (ImageReadError) yields None instead of an item, so one bad file in 100k costs
    one sample rather than the run; the collate function must drop the Nones. Its path is appended once to
    `failed_paths` and logged. With `strict=True` the error is re-raised instead (for evaluation, where a
    silently missing image would change the score). `failed_paths` only sees the process it lives in:
    with DataLoader workers, each worker has its own copy.

    `cache_images=True` keeps each resized uint8 tensor (3*S*S bytes: 150 KB at S=224) after its first
    read, so JPEGs are decoded once per run instead of once per epoch; augmentation runs after the cache,
    so it still differs per epoch. The cache lives in the process that reads: use num_workers=0, or
    persistent_workers=True (otherwise workers, and their caches, are rebuilt every epoch).

    With `features` set to a FeatureStore, an item whose frozen-prefix features are stored comes with
    `features` (fp16 (C, h, w)) and image None, without opening its file.

    `encoded=True` (GPU decoding, see data/device_decode.py): a plain JPEG comes as its file bytes (`jpeg`,
    uint8 (N,)) with image None and `image_size`, for nvjpeg to decode; other files are decoded here as usual.
    It caches nothing, and takes augmentation only with `augment_later`.

    `augment_later=True` leaves the pixels alone: each item carries the augmentation `augment` would apply
    (`augment`: AugmentDraw.as_tensor(), drawn from the item's seed exactly as `augment` draws it) with its
    captions already mirrored when the draw says so, and data/device_augment.py applies the batch's draws on the
    training device.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        augment: TrainAugment | None = None,
        cache_images: bool = False,
        strict: bool = False,
        encoded: bool = False,
        augment_later: bool = False,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if encoded and augment is not None and not augment_later:
            raise ValueError("encoded=True (GPU decoding) cannot be combined with CPU augmentation; "
                             "use augment_later=True (augmentation on the device)")
        self.records = list(records)
        self.image_size = image_size
        self.augment = augment
        self.cache_images = cache_images
        self.strict = strict
        self.encoded = encoded
        self.augment_later = augment_later and augment is not None
        if self.augment_later and augment.image_size != image_size:
            raise ValueError(f"augment_later: the augmentation's size ({augment.image_size}) must be the images' "
                             f"({image_size}); on the device each crop is resized back to the image's size")
        self.failed_paths: list[str] = []
        self.features = None  # a FeatureStore (feature_cache.py): items it holds come as features, not pixels
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | ItemKey) -> dict[str, Any] | None:
        index, seed = (key.index, key.seed) if isinstance(key, ItemKey) else (key, None)
        index = range(len(self.records))[index]  # IndexError out of range; -1 shares index n-1's cache slot
        record = self.records[index]
        if self.features is not None and self.features.has(index):  # no JPEG decoded at all
            return {"image": None, "features": self.features.get(index), "captions": list(record.captions),
                    "image_id": record.image_id, "path": str(record.path), "index": index, "seed": seed}
        if self.encoded:
            data = encoded_jpeg(record.path)
            if data is not None:  # for the GPU decoder; anything else is decoded below
                item = {"image": None, "jpeg": data, "image_size": self.image_size, "captions": list(record.captions),
                        "image_id": record.image_id, "path": str(record.path), "index": index, "seed": seed}
                return self._drawn(item, self.image_size, self.image_size)  # decoded at image_size x image_size
        image = self._image(index, record)
        if image is None:
            return None
        item = {"image": image, "captions": list(record.captions), "image_id": record.image_id,
                "path": str(record.path), "index": index, "seed": seed, "flipped": False}
        if self.augment_later:
            return self._drawn(item, image.shape[1], image.shape[2])
        if self.augment is not None:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            item["image"], item["flipped"] = self.augment.apply(image, generator)
            if item["flipped"]:  # a mirrored image: its captions' left and right trade places too
                item["captions"] = [swap_left_right(c) for c in item["captions"]]
        return item

    def _drawn(self, item: dict[str, Any], height: int, width: int) -> dict[str, Any]:
        """`item` with its augmentation draw (`augment`) when augmentation runs later, on the device; its captions
        mirrored when the draw mirrors the image."""
        if not self.augment_later:
            return item
        seed = item["seed"]
        drawn = self.augment.draw(height, width, None if seed is None else torch.Generator().manual_seed(seed))
        item["augment"], item["flipped"] = drawn.as_tensor(), drawn.flipped
        if drawn.flipped:
            item["captions"] = [swap_left_right(c) for c in item["captions"]]
        return item

    def _image(self, index: int, record: ImageRecord) -> torch.Tensor | None:
        """The resized uint8 tensor, from the cache when enabled; None (or raise, if strict) when unreadable."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        try:
            image = load_image_tensor(record.path, self.image_size)
        except ImageReadError as exc:
            if self.strict:
                raise
            self._record_failure(str(record.path), exc)
            return None
        if self.cache_images:
            self._cache[index] = image
        return image

    def _record_failure(self, path: str, exc: ImageReadError) -> None:
        """Remember and log each bad path once (not once per epoch)."""
        if path not in self.failed_paths:
            self.failed_paths.append(path)
            logger.warning("skipping unreadable image: %s", exc)

    @property
    def cached_bytes(self) -> int:
        """Memory held by the image cache, for logging."""
        return sum(t.numel() * t.element_size() for t in self._cache.values())
