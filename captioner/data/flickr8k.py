"""Flickr8k as distributed by its authors (Hodosh, Young & Hockenmaier, 2013).

ROOT/Flickr8k_text/Flickr8k.token.txt holds "IMAGE.jpg#N<TAB>caption" lines; Flickr_8k.{train,dev,test}Images.txt
list one file name per line; the images sit in ROOT/Flicker8k_Dataset/ (the official spelling, typo included)
or ROOT/Images/ (the common Kaggle repackaging).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from ..errors import DatasetFormatError
from .records import ImageRecord, clean_captions

logger = logging.getLogger(__name__)

TEXT_DIR = "Flickr8k_text"
TOKEN_FILE = "Flickr8k.token.txt"
IMAGE_DIRS = ("Flicker8k_Dataset", "Images")
_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "val": "Flickr_8k.devImages.txt",  # most code calls the dev split "val"
    "test": "Flickr_8k.testImages.txt",
}


def load_flickr8k(root: str | Path, split: str) -> list[ImageRecord]:
    """Records of `split` (train, dev or its alias val, test), in the order of the split list.

    image_id is the file name (Flickr8k has no numeric ids). A listed image without captions is skipped
    and the count logged as a warning. Image files are not opened here: a missing one surfaces (as an
    ImageReadError) when the dataset loads it. Raises ValueError for an unknown split and
    DatasetFormatError naming the file for a missing folder or file, or a malformed token line.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"unknown Flickr8k split {split!r}: expected one of train, dev (or val), test")
    root = Path(root)
    image_dir = find_image_dir(root)
    captions = read_token_file(root / TEXT_DIR / TOKEN_FILE)
    split_file = root / TEXT_DIR / _SPLIT_FILES[split]
    records, missing = [], []
    for name in read_split_list(split_file):
        image_captions = clean_captions(captions.get(name, ()))
        if image_captions:
            records.append(ImageRecord(image_id=name, path=image_dir / name, captions=image_captions))
        else:
            missing.append(name)
    if missing:
        logger.warning(
            "%s: %d of the listed images have no caption in %s and were skipped (first: %s)",
            split_file, len(missing), TOKEN_FILE, missing[0],
        )
    return records


def find_image_dir(root: Path) -> Path:
    """The image folder under either of its two names (official first)."""
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    candidates = " or ".join(f"'{root / name}'" for name in IMAGE_DIRS)
    raise DatasetFormatError(f"Flickr8k image folder not found: expected {candidates}")


def read_token_file(path: Path) -> dict[str, list[str]]:
    """File name -> captions in file order. Blank lines are ignored; any other line must be
    "NAME#N<TAB>caption", otherwise DatasetFormatError names the file and the 1-based line number."""
    captions: dict[str, list[str]] = defaultdict(list)
    for lineno, line in enumerate(_read_lines(path, "Flickr8k caption"), start=1):
        if not line.strip():
            continue
        name, caption = _parse_token_line(line, path, lineno)
        captions[name].append(caption)
    return dict(captions)


def _parse_token_line(line: str, path: Path, lineno: int) -> tuple[str, str]:
    key, tab, caption = line.partition("\t")
    name, hash_, _number = key.rpartition("#")
    if not tab or not hash_ or not name.strip():
        raise DatasetFormatError(
            f"'{path}', line {lineno}: expected 'IMAGE.jpg#N<TAB>caption', got {line.strip()!r:.80}"
        )
    return name.strip(), caption


def read_split_list(path: Path) -> list[str]:
    """The file names listed in a split file, one per line, blank lines ignored; a name listed twice is an
    error (it would be trained on twice and collide with itself in results keyed by file name)."""
    names: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path, "Flickr8k split list"), start=1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise DatasetFormatError(f"'{path}', line {lineno}: {name} is already listed on line {names[name]}")
        names[name] = lineno
    return list(names)


def _read_lines(path: Path, what: str) -> list[str]:
    """Lines without their line endings (\\n or \\r\\n); a UTF-8 byte-order mark is dropped. Split on
    newlines only (not str.splitlines, which also splits on \\x1c, \\u2028, ... that captions may contain)."""
    if not path.is_file():
        raise DatasetFormatError(f"{what} file not found: expected '{path}'")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"cannot read {what} file '{path}': {exc}") from None
    return [line.rstrip("\r") for line in text.split("\n")]
