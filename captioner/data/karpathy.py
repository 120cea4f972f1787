"""Karpathy split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json).

These are the splits most captioning papers report on. Each image carries its own split label; "restval"
(the COCO val2014 images not held out for val/test) is training data by convention, so "train" includes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import DatasetFormatError
from .records import ImageRecord, clean_captions, read_json, require

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_FILE_SPLITS = ("train", "val", "test", "restval")
_SPLIT_MEMBERS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}


def load_karpathy(karpathy_json: str | Path, root: str | Path, split: str) -> list[ImageRecord]:
    """Records of one split, in file order.

    path = root / filepath / filename when the item has "filepath" (COCO: "train2014"/"val2014"), else
    root / filename (Flickr). image_id is "cocoid" when present (so COCO results files use COCO ids),
    else "imgid". Images with no non-empty sentence are skipped with a logged warning. `split` must be
    train, val or test (ValueError); a malformed file raises DatasetFormatError naming it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r}: expected one of {', '.join(SPLITS)}")
    karpathy_json = Path(karpathy_json)
    data = read_json(karpathy_json, "Karpathy split")
    if not isinstance(data, dict):
        raise DatasetFormatError(
            f"'{karpathy_json}': expected a JSON object at the top level, got {type(data).__name__}"
        )
    images = require(data, "images", list, "the top-level object", karpathy_json)
    records, skipped, seen = [], 0, {}
    for i, item in enumerate(images):
        record = _record(item, i, Path(root), karpathy_json, _SPLIT_MEMBERS[split])
        if record is None:
            continue
        if record.image_id in seen:  # results files and scores are keyed by image id: two would collide
            raise DatasetFormatError(f"'{karpathy_json}': images[{i}] repeats image id {record.image_id} of "
                                     f"images[{seen[record.image_id]}]")
        seen[record.image_id] = i
        if record.captions:
            records.append(record)
        else:
            skipped += 1
    if skipped:
        logger.warning("%s: skipped %d %s image(s) with no non-empty sentence", karpathy_json, skipped, split)
    return records


def _record(item: Any, i: int, root: Path, path: Path, wanted: set[str]) -> ImageRecord | None:
    """The item's record, or None when it belongs to another split (validated either way, so a broken
    file fails on every split rather than only on the one that happens to contain the bad item)."""
    where = f"images[{i}]"
    filename = require(item, "filename", str, where, path)
    item_split = require(item, "split", str, where, path)
    if item_split not in _FILE_SPLITS:
        raise DatasetFormatError(
            f"'{path}': {where}['split'] is {item_split!r}, expected one of {', '.join(_FILE_SPLITS)}"
        )
    image_id = require(item, "imgid", int, where, path)
    if "cocoid" in item:
        image_id = require(item, "cocoid", int, where, path)
    sentences = require(item, "sentences", list, where, path)
    raws = [require(s, "raw", str, f"{where}['sentences'][{j}]", path) for j, s in enumerate(sentences)]
    if item_split not in wanted:
        return None
    folder = root / require(item, "filepath", str, where, path) if "filepath" in item else root
    return ImageRecord(image_id=image_id, path=folder / filename, captions=clean_captions(raws))
