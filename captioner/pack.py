"""`captioner pack-images`: a copy of a dataset folder with its images shrunk, for machines and disks that
cannot take the originals.

Why: a GPU machine that receives the working tree takes at most 64 MiB, and a slow disk pays for every byte
an epoch reads. Training resizes every image to --image-size (160 by default) anyway, so pixels beyond that
are only carried to be thrown away. Flickr8k at 128 px and JPEG quality 85 is 22% of its size.

The copy is a mirror: same relative paths and file names, caption and split files copied byte for byte, so
every loader (COCO JSON, Karpathy JSON, Flickr8k token file) reads it exactly as it read the original and
only the root changes (`--root DST`, `--train-images DST/train2017`, ...). Images are read with the loader
training uses (load_image: EXIF orientation applied, 8-bit RGB, every failure an ImageReadError naming the
file), so the packed copy holds what training would have seen, only smaller.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .atomic import write_atomically
from .data.images import load_image
from .errors import CaptionerError, ImageReadError, PackWriteError

logger = logging.getLogger(__name__)

FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
"""Extensions (any case) that are packed, and the format each is written in: its own, so a file keeps its
name and the annotation files that name it stay valid. GIF, which the loader also reads, is copied as it is:
written again from RGB it would have to be quantised back to 256 colours, changing what training sees."""

TEMP_SUFFIX = ".pack-tmp"
"""Files are written as DIR/.NAME.XXXX.pack-tmp and renamed over DIR/NAME, so a killed pack leaves no torn
image under an image's name; leftovers of a killed run are deleted when the next run passes their folder."""


@dataclass
class PackSummary:
    """What a pack did. `images` = packed + up_to_date + unreadable. The byte counts cover every file the
    mirror holds (images and other files): what SRC weighs, and what DST weighs for the same files (an
    unreadable image counts in bytes_before only, since it is not written)."""

    source: str
    destination: str
    images: int = 0
    packed: int = 0
    up_to_date: int = 0
    unreadable: int = 0
    other_files: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    unreadable_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON the command prints (unreadable_files are named on stderr as they are met instead)."""
        return {key: value for key, value in vars(self).items() if key != "unreadable_files"}


def pack_images(source: str | Path, destination: str | Path, *, size: int = 128, quality: int = 85,
                workers: int | None = None, progress: bool = True, square: bool = False) -> PackSummary:
    """Mirror `source` into `destination`, images resized so their shorter side is `size` (never enlarged), or with
    `square` to exactly `size` x `size` (see shrink_to_square).

    Runs are incremental: a DST file newer than its SRC file is kept (a non-empty one for images; one of the
    same size for other files), so a second run after an interrupted or finished one only does what is left,
    and an image changed in SRC since is packed again. An unreadable image is logged with its name and the
    reason, counted and not written; the run goes on. Files in DST that SRC does not have are left alone.

    DST remembers how it was packed (SETTINGS_FILE): a later run with another --size, --quality or --square is
    refused, since keeping the files already there would leave a copy packed two ways.

    Raises CaptionerError (exit status 2) for bad arguments, a missing SRC, a DST that is SRC or lies inside it
    (the walk would pack its own output), or a DST packed with other settings; PackWriteError (exit status 1)
    when DST cannot be written.
    """
    src, dst = _check_paths(source, destination)
    _check_options(size, quality, workers)
    settings = {"size": size, "quality": quality, "square": square}
    _check_settings(dst, settings)
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    summary = PackSummary(source=str(source), destination=str(destination))
    pending: list[tuple[str, str, int, int]] = []
    folders: set[Path] = set()
    for relative in _walk(src):
        if relative == Path(SETTINGS_FILE):  # SRC is itself a packed copy: DST gets its own settings
            continue
        src_file, dst_file = src / relative, dst / relative
        if dst_file.parent not in folders:  # here, not in the workers: one would delete another's temporary
            _prepare_folder(dst_file.parent)
            folders.add(dst_file.parent)
        if relative.suffix.lower() in FORMATS and not relative.name.startswith("."):
            summary.images += 1
            summary.bytes_before += _size(src_file)
            if _up_to_date(src_file, dst_file, same_size=False):
                summary.up_to_date += 1
                summary.bytes_after += dst_file.stat().st_size
            else:
                pending.append((str(src_file), str(dst_file), size, quality, square))
        else:  # caption and split files, annotation JSON, and hidden files such as macOS's ._x.jpg
            summary.other_files += 1
            summary.bytes_before += _size(src_file)
            if not _up_to_date(src_file, dst_file, same_size=True):
                _copy_file(src_file, dst_file)
            summary.bytes_after += dst_file.stat().st_size
    _write_settings(dst, settings)  # before any image: a killed run is resumed only with the same settings
    with logging_redirect_tqdm(), tqdm(total=len(pending), desc="packing", unit="img", dynamic_ncols=True,
                                       disable=None if progress else True) as bar:
        for written, error in _run(pending, workers):
            if error is None:
                summary.packed += 1
                summary.bytes_after += written
            else:
                summary.unreadable += 1
                summary.unreadable_files.append(error)
                logger.warning("not packed: %s", error)
            bar.update()
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


def _check_paths(source: str | Path, destination: str | Path) -> tuple[Path, Path]:
    """SRC must be a folder; DST must not be SRC or inside it (followed through symbolic links)."""
    src, dst = Path(source), Path(destination)
    if not src.is_dir():
        what = "is not a folder" if src.exists() else "does not exist"
        raise CaptionerError(f"source '{src}' {what}: expected the dataset folder to pack")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src:
        raise CaptionerError(f"destination '{dst}' is the source '{src}': packing would overwrite the originals")
    if real_dst.is_relative_to(real_src):
        raise CaptionerError(f"destination '{dst}' lies inside the source '{src}': the packed copy would be "
                             "packed again and become part of the dataset; choose a folder outside it")
    if dst.exists() and not dst.is_dir():
        raise CaptionerError(f"destination '{dst}' exists and is not a folder")
    return src, dst


def _check_options(size: int, quality: int, workers: int | None) -> None:
    if size < 1:
        raise CaptionerError(f"--size must be a positive number of pixels, got {size}")
    if not 1 <= quality <= 100:
        raise CaptionerError(f"--quality must be between 1 and 100, got {quality}")
    if workers is not None and workers < 1:
        raise CaptionerError(f"--workers must be at least 1, got {workers}")


SETTINGS_FILE = ".captioner-pack.json"
"""In DST: the settings its images were packed with (JSON). Hidden, so no loader or walk takes it for data."""


def _check_settings(dst: Path, settings: dict) -> None:
    """Refuse to add to a DST packed with other settings, or to a non-empty DST that does not say how it was
    packed (an older captioner's copy, or files put there by hand): its files would be kept as up to date."""
    path = dst / SETTINGS_FILE
    if not path.is_file():
        if dst.is_dir() and any(dst.iterdir()):
            raise CaptionerError(f"'{dst}' is not empty and has no {SETTINGS_FILE} saying how it was packed: pack "
                                 "into a new folder (or an empty one)")
        return
    try:
        packed_with = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CaptionerError(f"cannot read '{path}' (how '{dst}' was packed): {exc}; delete it if the copy is "
                             "known to match this run's settings") from None
    if packed_with != settings:
        def flags(s: dict) -> str:
            return f"--size {s.get('size')} --quality {s.get('quality')}" + (" --square" if s.get("square") else "")

        raise CaptionerError(f"'{dst}' was packed with {flags(packed_with)}, this run asks for {flags(settings)}; "
                             "pack into a new folder (or delete this one) rather than mix the two in one copy")


def _write_settings(dst: Path, settings: dict) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    _write_atomically(dst / SETTINGS_FILE, lambda handle: handle.write(json.dumps(settings).encode() + b"\n"))


def _walk(root: Path) -> Iterator[Path]:
    """Paths (relative to `root`) of every non-folder entry below it, sorted, following symbolic links to
    folders (a Flickr8k root whose image folder is a link is packed in full) but never round a loop."""

    def visit(folder: Path, relative: Path, chain: frozenset[str]) -> Iterator[Path]:
        with os.scandir(folder) as entries:
            ordered = sorted(entries, key=lambda entry: entry.name)
        for entry in ordered:
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if real in chain:
                    logger.warning("not following %s: it leads back to a folder above it", entry.path)
                    continue
                yield from visit(Path(entry.path), relative / entry.name, chain | {real})
            else:
                yield relative / entry.name

    return visit(root, Path(), frozenset({os.path.realpath(root)}))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # a dangling link: reported when it is packed (an image) or copied (anything else)
        return 0


def _up_to_date(src: Path, dst: Path, *, same_size: bool) -> bool:
    """DST newer than SRC (so an edited source is packed again) and not empty (what a crash between a write
    and its reaching the disk tends to leave); copies of other files must also match SRC's size."""
    try:
        dst_stat, src_stat = dst.stat(), src.stat()
    except OSError:
        return False
    if dst_stat.st_mtime_ns <= src_stat.st_mtime_ns or dst_stat.st_size == 0:
        return False
    return not same_size or dst_stat.st_size == src_stat.st_size


def _run(tasks: list[tuple[str, str, int, int, bool]], workers: int) -> Iterator[tuple[int, str | None]]:
    """(bytes written, None) or (0, error message) per task, in order; a process pool when it pays.

    Workers ignore SIGINT: Ctrl-C stops the parent, which cancels what has not started, lets each worker
    finish the image in hand (writes are atomic either way) and exits with the usual 'interrupted'."""
    if workers == 1 or len(tasks) < 2:
        yield from map(_pack_one, tasks)
        return
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), initializer=_ignore_sigint)
    try:
        yield from pool.map(_pack_one, tasks, chunksize=8)
    finally:  # also on an error or an interrupt: do not wait for thousands of queued images
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pack_one(task: tuple[str, str, int, int, bool]) -> tuple[int, str | None]:
    """Read one image as training does, shrink it, write it in its own format. Runs in a worker process."""
    src, dst, size, quality, square = task
    try:
        image = load_image(src)
    except ImageReadError as exc:
        return 0, str(exc)
    small = shrink_to_square(image, size) if square else shrink(image, size)
    data = encode(small, FORMATS[Path(dst).suffix.lower()], quality)
    _write_atomically(Path(dst), lambda handle: handle.write(data))
    return len(data), None


def shrink(image: Image.Image, size: int) -> Image.Image:
    """`image` with its shorter side `size` pixels and its aspect ratio kept; returned as it is when that side
    is already `size` or less (enlarging adds bytes, not detail). Lanczos after an integer box reduction
    (reducing_gap): antialiased, and fast on large photos."""
    width, height = image.size
    shorter = min(width, height)
    if shorter <= size:
        return image
    scale = size / shorter
    new_size = (size, max(1, round(height * scale))) if width == shorter else (max(1, round(width * scale)), size)
    return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def shrink_to_square(image: Image.Image, size: int) -> Image.Image:
    """`image` stretched to exactly `size` x `size`, as training's resize_to_tensor stretches every image (no crop,
    aspect ratio not kept); returned as it is when neither side exceeds `size` (training then enlarges it).

    Why: a copy at the training size in both directions leaves the data loader only the decoding to do, since
    resizing an image to its own size is a copy, and a plain JPEG at that size skips PIL altogether
    (data/images.py, load_image_tensor). On the development CPU, one DataLoader worker read 2,181 images/s from
    224 x 224 copies and 1,064 from copies with a 224 px shorter side."""
    if max(image.size) <= size:
        return image
    return image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode(image: Image.Image, image_format: str, quality: int) -> bytes:
    """`image` as a file of `image_format`. No EXIF is carried over: the orientation is already applied to
    the pixels, and a kept orientation tag would make loaders turn the image a second time."""
    options = {"JPEG": {"quality": quality, "optimize": True}, "WEBP": {"quality": quality}}
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options.get(image_format, {}))
    return buffer.getvalue()


def _copy_file(src: Path, dst: Path) -> None:
    """Byte-for-byte copy (atomic, like the images). An unreadable source here is an input error."""
    try:
        source = src.open("rb")
    except OSError as exc:
        raise CaptionerError(f"cannot read '{src}': {exc.strerror or exc}") from None
    with source:
        _write_atomically(dst, lambda handle: shutil.copyfileobj(source, handle))


def _write_atomically(path: Path, write) -> None:
    """Replace `path` atomically (see atomic.py). Files are not fsynced one by one (a cost a copy that can be made
    again need not pay): after a power cut, a file may be left empty, and the next run writes it again. Raises
    PackWriteError naming the file when it cannot be written (full disk, no permission), since every later
    write would fail the same way."""
    try:
        write_atomically(path, write, temp_suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise PackWriteError(f"cannot write '{path}': {exc.strerror or exc}") from None


def _prepare_folder(folder: Path) -> None:
    """Create a DST folder, and delete the temporaries a killed run left in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackWriteError(f"cannot create folder '{folder}': {exc.strerror or exc}") from None
    for stale in folder.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()
