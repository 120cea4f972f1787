"""--trunk-pretrain-cache DIR: pre-trained trunks shared between runs that would train the same one.

An ablation trains many variants whose trunk pre-training is the same (same images, captions, seed and
pre-training flags) and whose captioning differs; each used to pre-train its own, and pre-training is most of a
Flickr8k recipe run. With a cache folder, the trunk a run needs is DIR/<key>.pt, `key` a hash of everything the
trunk depends on (pretrain.pretraining_settings, stored in the file and compared again when it is read). The first
run that needs it trains it and stores it; the others copy it into their own folder (RUN/trunk_pretrained.pt,
so a run folder stays complete without the cache).

Runs started together would all find the cache empty and all pre-train. An exclusive lock on DIR/<key>.lock
(fcntl.flock, released by the kernel if its holder dies) makes them take turns: the first pre-trains while the
others wait, then find the file. Runs needing different trunks use different locks and go on side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .atomic import copy_atomically
from .errors import CaptionerError

log = logging.getLogger(__name__)


def stored_settings(path: Path) -> dict[str, Any] | None:
    """The pre-training settings a trunk file was made with; None for a missing, torn or foreign file."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("settings")
    except Exception:
        return None


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def copy_file(source: Path, destination: Path) -> None:
    """Copy whole or not at all: a reader never sees half a trunk file."""
    try:
        copy_atomically(source, destination)
    except OSError as exc:
        raise CaptionerError(f"cannot copy the pre-trained trunk {source} to {destination}: "
                             f"{exc.strerror or exc}") from None


class SharedTrunk:
    """One trunk's place in the cache folder; entered (`with`), it holds the trunk's lock."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        self.settings = settings
        key = settings_key(settings)
        self.path, self.lock_path = folder / f"{key}.pt", folder / f"{key}.lock"

    def __enter__(self) -> "SharedTrunk":
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _exclusive_lock(self.lock_path)
        self._lock.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.__exit__(*exc_info)

    def copy_to(self, destination: Path) -> bool:
        """Copy the cached trunk to `destination` if the cache holds this one; False if it does not. Safe without
        the lock too: a stored trunk is always whole (copied atomically)."""
        if stored_settings(self.path) != self.settings:
            return False
        copy_file(self.path, destination)
        return True

    def store(self, trunk_file: Path) -> None:
        copy_file(trunk_file, self.path)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs started together may pre-train the same trunk twice
        yield
        return
    with open(path, "a") as handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another run pre-training the same trunk (%s)", path)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            raise CaptionerError(f"cannot lock {path} ({exc.strerror or exc}): --trunk-pretrain-cache needs a folder "
                                 "on a filesystem with file locks") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
