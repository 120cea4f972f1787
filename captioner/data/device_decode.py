"""JPEG decoding on the GPU: DataLoader workers only read file bytes; nvjpeg decodes a whole batch on the device.

Why: PIL decodes and resizes a 640x480 JPEG at a few hundred images/s per CPU core, far below what a GPU trains
at with a frozen trunk. With `CaptionDataset(..., encoded=True)` an item carries its file's bytes (`jpeg`)
instead of pixels, and `DeviceDecodingLoader` wraps the DataLoader: for each batch it decodes the bytes with
`torchvision.io.decode_jpeg(device="cuda")`, resizes on the GPU (bilinear with antialiasing, as PIL's bilinear
filter does when shrinking) and hands the training loop a batch whose `images` are already on the device.

What nvjpeg cannot be trusted with never reaches it: `encoded_jpeg` sends only plain JPEGs (RGB or grayscale,
no EXIF rotation, within the pixel limit) as bytes; PNGs, CMYK JPEGs and rotated photos are decoded on the CPU
by the usual path (`load_image`), whose errors name the file. A file that passes that check but fails on the
GPU (a truncated download) is retried on the CPU; if that fails too, its row is dropped from the batch and
counted in `batch.skipped`, exactly as an unreadable file is in the CPU path.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ImageReadError
from .collate import Batch
from .images import is_plain_jpeg, load_image_bytes
from .transforms import resize_to_tensor

log = logging.getLogger(__name__)


def encoded_jpeg(path: str | Path) -> torch.Tensor | None:
    """The file's bytes as a uint8 (N,) tensor when it is a JPEG that nvjpeg decodes to the same picture the
    CPU path would give; None otherwise (the caller decodes it on the CPU). Reads the header, not the pixels."""
    try:
        data = Path(path).read_bytes()  # read once: the header is parsed from memory
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as img:  # lazy: parses the header only
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # reported by the CPU path
            if not is_plain_jpeg(img):
                return None
    except Exception:  # unreadable: the CPU path raises the ImageReadError that names the problem
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def resize_on_device(images: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """uint8 (3, H_i, W_i) images on one device -> uint8 (B, 3, S, S), images of the same size resized together."""
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8, device=images[0].device)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row, image in enumerate(images):
        by_size[tuple(image.shape[1:])].append(row)
    for rows in by_size.values():
        stacked = torch.stack([images[r] for r in rows]).float()  # (b, 3, H, W)
        resized = F.interpolate(stacked, size=(image_size, image_size), mode="bilinear", antialias=True,
                                align_corners=False)
        out[torch.tensor(rows, device=out.device)] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


DECODE_THREADS = 1
"""Threads that share a batch's nvjpeg decoding (decode_jpeg is thread-safe on CUDA; each thread decodes a slice
of the batch on its own stream). Measured on an H100 with torchvision 0.26 (`captioner benchmark train
--decode-threads 4,8`), more threads were slower: frozen-trunk training from 640x480 JPEGs ran at 3,148
images/s with one thread, 2,341 with four and 2,158 with eight. Kept as an option to measure on other
machines and versions."""

_pools: dict[int, ThreadPoolExecutor] = {}
_local = threading.local()


def _decode_on_device(data: list[torch.Tensor], device: torch.device, threads: int = 1) -> list[torch.Tensor | None]:
    """nvjpeg decode of a list of JPEG byte tensors -> uint8 (3, H, W) on device, None where decoding failed.
    `threads` > 1 (CUDA): slices of the list decoded concurrently, each on its thread's own stream; the outputs
    are ready (that stream synchronised) and marked as used by the caller's stream."""
    if threads <= 1 or device.type != "cuda" or len(data) < 2 * threads:
        return _decode_list(data, device)
    pool = _pools.get(threads) or _pools.setdefault(threads, ThreadPoolExecutor(threads, "nvjpeg"))
    step = -(-len(data) // threads)
    futures = [pool.submit(_decode_on_own_stream, data[i : i + step], device) for i in range(0, len(data), step)]
    consumer = torch.cuda.current_stream(device)
    decoded: list[torch.Tensor | None] = []
    for future in futures:
        for image in future.result():
            if image is not None:
                image.record_stream(consumer)
            decoded.append(image)
    return decoded


def _decode_on_own_stream(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        decoded = _decode_list(data, device)
    stream.synchronize()
    return decoded


def _decode_list(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One batched decode_jpeg call; if it fails (one bad file fails the whole call), each image alone to find
    the bad ones."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 flags its image decoders as moving to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            log.warning("batched JPEG decode on %s failed (%s); decoding this batch image by image", device,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            decoded: list[torch.Tensor | None] = []
            for one in data:
                try:
                    decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def decode_batch_on_device(batch: Batch, device: torch.device, threads: int = 1) -> Batch:
    """A batch whose rows come as JPEG bytes -> the same batch with `images` uint8 (B, 3, S, S) on `device`.
    Rows that cannot be decoded at all are dropped and counted in `skipped`."""
    if not batch.jpegs:
        return batch
    decoded = _decode_on_device([data for _, data in batch.jpegs], device, threads)
    size = batch.image_size
    if batch.images.shape[-2:] == (size, size):  # some rows were decoded on the CPU (PNGs, rotated photos, ...)
        images = batch.images.to(device, non_blocking=True).clone()
    else:  # only JPEG rows, and perhaps rows that came as stored features (their pixels are never read)
        images = torch.zeros(len(batch.image_ids), 3, size, size, dtype=torch.uint8, device=device)
    good_rows, good_images, bad_rows = [], [], []
    for (row, data), image in zip(batch.jpegs, decoded):
        if image is None:
            image = _cpu_fallback(batch.paths[row], data, size, device)
            if image is None:
                bad_rows.append(row)
                continue
            images[row] = image
            continue
        good_rows.append(row)
        good_images.append(image)
    if good_images:
        images[torch.tensor(good_rows, device=device)] = resize_on_device(good_images, size)
    batch.images, batch.jpegs = images, None
    if bad_rows:
        batch = batch.without_rows(bad_rows)
    return batch


def _cpu_fallback(path: str, data: torch.Tensor, image_size: int, device: torch.device) -> torch.Tensor | None:
    try:
        return resize_to_tensor(load_image_bytes(data.numpy().tobytes(), path), image_size).to(device)
    except ImageReadError as exc:
        log.warning("skipping unreadable image: %s", exc)
        return None


class DeviceDecodingLoader:
    """Wraps a DataLoader of encoded batches; yields batches with `images` decoded on `device`.

    `prefetch=True` decodes the next batch in a background thread on its own CUDA stream while the training
    step runs on the default stream (nvjpeg's host-side work then overlaps the step's kernels). Length, and
    therefore progress bars and schedules, are the wrapped loader's."""

    def __init__(self, loader: Iterable[Batch], device: torch.device, prefetch: bool = True,
                 threads: int = DECODE_THREADS):
        self.loader, self.device, self.prefetch = loader, device, prefetch and device.type == "cuda"
        self.threads = threads

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # sampler, dataset, collate_fn, ...: the wrapped loader's
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Batch]:
        if not self.prefetch:
            for batch in self.loader:
                yield decode_batch_on_device(batch, self.device, self.threads)
            return
        yield from _prefetched(self.loader, self.device, self.threads)


_DONE = object()


def _prefetched(loader: Iterable[Batch], device: torch.device, threads: int) -> Iterator[Batch]:
    """Decode batch k+1 on a side stream while batch k trains; a batch is handed over only after its decode
    stream's work is done (event), and its tensors are marked as used by the consuming stream."""
    ready: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    stream = torch.cuda.Stream(device)

    def work() -> None:
        try:
            with torch.cuda.stream(stream):
                for batch in loader:
                    if stop.is_set():
                        return
                    decoded = decode_batch_on_device(batch, device, threads)
                    event = torch.cuda.Event()
                    event.record(stream)
                    ready.put((decoded, event))
            ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            ready.put(exc)

    thread = threading.Thread(target=work, name="gpu-jpeg-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            batch, event = item
            torch.cuda.current_stream(device).wait_event(event)
            batch.images.record_stream(torch.cuda.current_stream(device))
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
