"""Official COCO caption annotations (captions_train2017.json, captions_val2014.json, ...).

The JSON is validated here before pycocotools indexes it: pycocotools answers a missing key with a bare
KeyError from deep inside createIndex, while a user needs the file, the item and the key.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from ..errors import DatasetFormatError
from .records import ImageRecord, clean_captions, read_json, require


def load_coco(captions_json: str | Path, images_dir: str | Path) -> list[ImageRecord]:
    """Records for every image that has at least one non-empty caption, sorted by image id.

    `images_dir` is the folder holding the images (e.g. train2017/); each record's path is
    images_dir / file_name. Image files are not opened here. Raises DatasetFormatError naming the file
    and the offending key or id for a missing file, bad JSON, missing keys or captions of unknown images.
    """
    captions_json = Path(captions_json)
    dataset = read_json(captions_json, "COCO captions")
    _validate(dataset, captions_json)
    coco = _index(dataset)
    images_dir = Path(images_dir)
    records = []
    for image_id in sorted(coco.getImgIds()):
        captions = clean_captions(ann["caption"] for ann in coco.imgToAnns.get(image_id, []))
        if captions:
            path = images_dir / coco.imgs[image_id]["file_name"]
            records.append(ImageRecord(image_id=image_id, path=path, captions=captions))
    return records


def _index(dataset: dict[str, Any]) -> COCO:
    """Build pycocotools' index from an already-validated dict, silencing its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def _validate(dataset: Any, path: Path) -> None:
    """Check the parts of the schema that captions need; everything else (info, licenses, urls) is ignored."""
    if not isinstance(dataset, dict):
        raise DatasetFormatError(f"'{path}': expected a JSON object at the top level, got {type(dataset).__name__}")
    images = require(dataset, "images", list, "the top-level object", path)
    annotations = require(dataset, "annotations", list, "the top-level object", path)
    image_ids = _validate_images(images, path)
    _validate_annotations(annotations, image_ids, path)


def _validate_images(images: list[Any], path: Path) -> set[int]:
    image_ids: set[int] = set()
    for i, image in enumerate(images):
        image_id = require(image, "id", int, f"images[{i}]", path)
        require(image, "file_name", str, f"images[{i}]", path)
        if image_id in image_ids:
            raise DatasetFormatError(f"'{path}': images[{i}] repeats image id {image_id}")
        image_ids.add(image_id)
    return image_ids


def _validate_annotations(annotations: list[Any], image_ids: set[int], path: Path) -> None:
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        require(ann, "id", int, where, path)
        image_id = require(ann, "image_id", int, where, path)
        require(ann, "caption", str, where, path)
        if image_id not in image_ids:
            raise DatasetFormatError(
                f"'{path}': {where} refers to image_id {image_id}, which is not in 'images' "
                "(is this caption file from another split?)"
            )
