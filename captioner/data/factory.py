"""Dataset flags -> records, one place for every command (train, evaluate, benchmarks)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from ..errors import CaptionerError, DatasetFormatError
from .collate import CaptionCollate
from .dataset import CaptionDataset
from .coco import load_coco
from .flickr8k import load_flickr8k
from .karpathy import load_karpathy
from .records import ImageRecord

DATASETS = ("coco", "flickr8k", "karpathy")


def load_records(dataset: str, split: str, *, captions: str = "", images: str = "", root: str = "",
                 karpathy_json: str = "") -> list[ImageRecord]:
    """`split` is train/val/test. COCO files carry one split each (the caller passes that split's files);
    Flickr8k calls its validation split 'dev'; Karpathy files hold every split and fold restval into train."""
    if dataset == "coco":
        if not captions or not images:
            missing = " and ".join(what for what, given in (("caption JSON", captions), ("image folder", images))
                                   if not given)
            raise CaptionerError(f"--dataset coco needs the {split} split's caption JSON and image folder; no "
                                 f"{missing} was given")
        records = load_coco(captions, images)
        _require_folder(images, f"the {split} image folder of {captions}")
    elif dataset == "flickr8k":
        if not root:
            raise CaptionerError("--dataset flickr8k needs --root (the folder holding Flickr8k_text/)")
        records = load_flickr8k(root, "dev" if split == "val" else split)
    elif dataset == "karpathy":
        if not karpathy_json or not root:
            raise CaptionerError("--dataset karpathy needs --karpathy-json and --root (the image folder)")
        records = load_karpathy(karpathy_json, root, split)
        _require_folder(root, f"--root, the image folder of {karpathy_json}")
        for folder in sorted({str(Path(r.path).parent) for r in records} - {str(Path(root))}):
            _require_folder(folder, f"a \"filepath\" of the {split} split in {karpathy_json}, under --root")
    else:
        raise CaptionerError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not records:
        raise CaptionerError(f"the {dataset} {split} split has no images with captions")
    return records


def _require_folder(folder: str, what: str) -> None:
    """A missing image folder is one clear error, not a run that skips every image with a warning each."""
    if not Path(folder).is_dir():
        raise DatasetFormatError(f"image folder not found: {folder} ({what})")


def evaluation_loader(records, image_size: int, batch_size: int) -> DataLoader:
    """Images in order, no augmentation or caching, unreadable ones skipped and recorded (`dataset.failed_paths`).
    What `caption`, `evaluate` and the demo decode from."""
    dataset = CaptionDataset(records, image_size, augment=None, cache_images=False, strict=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=CaptionCollate(None, 0))
