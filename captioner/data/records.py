"""The one record every dataset loader returns, plus the small helpers the loaders share.

Every format (COCO JSON, Karpathy JSON, Flickr8k token file) is reduced to `ImageRecord`s so that the
dataset, the vocabulary trainer and the scorer never need to know which format the captions came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetFormatError


@dataclass(frozen=True)
class ImageRecord:
    """One image and its reference captions.

    `image_id` is the id the format's own tools use (an int for COCO and Karpathy, the file name for
    Flickr8k), so results files can be written in the official format. `captions` are raw text, only
    stripped: normalisation belongs to the text module so training and scoring share it.
    """

    image_id: int | str
    path: Path
    captions: tuple[str, ...]


def clean_captions(captions: Iterable[str]) -> tuple[str, ...]:
    """Strip each caption and drop the empty ones: an empty reference would score as a zero-length
    sentence and an empty training target teaches the model to stop at once."""
    stripped = (caption.strip() for caption in captions)
    return tuple(caption for caption in stripped if caption)


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON annotation file, turning I/O and syntax problems into one DatasetFormatError that
    names the file (and the line/column for syntax errors) instead of a bare traceback."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{what} file not found: '{path}'")
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{what} file '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"cannot read {what} file '{path}': {exc}") from None


def require(item: Any, key: str, kind: type | tuple[type, ...], where: str, path: str | Path) -> Any:
    """Return `item[key]`, checking that `item` is an object, `key` is present and the value has type
    `kind`. `where` says which item it is (e.g. "annotations[3]") so the message points at it."""
    if not isinstance(item, dict):
        raise DatasetFormatError(f"'{path}': {where} should be a JSON object, got {type(item).__name__}")
    if key not in item:
        raise DatasetFormatError(f"'{path}': {where} is missing key '{key}'")
    value = item[key]
    if not _has_type(value, kind):
        raise DatasetFormatError(
            f"'{path}': {where}['{key}'] should be {_type_names(kind)}, got {type(value).__name__} ({value!r:.60})"
        )
    return value


def _has_type(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool does not count as an int (JSON `true` is not an id)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
