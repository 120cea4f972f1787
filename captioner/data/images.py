"""Reading image files safely: every failure becomes an ImageReadError naming the file.

Real image folders contain empty files, truncated downloads, HTML error pages saved as .jpg, CMYK JPEGs,
16-bit PNGs and phone photos whose pixels are stored sideways with an EXIF orientation tag. One bad file
should cost one skipped sample with a clear message, not a crashed epoch or a silently sideways image.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageReadError
from .transforms import resize_to_tensor

MAX_IMAGE_PIXELS = 89_478_485
"""Largest width*height we decode (PIL's default bomb limit): a tiny file can claim a huge canvas and
exhaust memory when decoded. Read at call time, so tests and users may lower it."""

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path: str | Path) -> Image.Image:
    """Open, apply EXIF orientation, convert to 8-bit RGB and fully decode the image at `path`.

    Decoding happens here (not lazily at first pixel access) so a truncated file fails inside this call,
    where the path is known. Raises ImageReadError, whose message names the path and the problem, for a
    missing, empty, truncated or unrecognised file, and for an image larger than MAX_IMAGE_PIXELS.
    """
    path = Path(path)
    _check_file(path)
    try:
        with path.open("rb") as handle:
            return _decode(handle, path)
    except ImageReadError:
        raise
    except Exception as exc:  # opening the file
        raise ImageReadError(f"cannot read image '{path}': {_describe(exc)}") from None


def load_image_tensor(path: str | Path, image_size: int) -> torch.Tensor:
    """The image at `path` as training and captioning see it: uint8 (3, S, S) = resize_to_tensor(load_image(path)).

    A plain JPEG already stored at S x S (what `pack-images --square` writes) has nothing to resize, so it is
    decoded by torchvision's decode_jpeg straight into a tensor: the same libjpeg-turbo decoding as PIL's, and the
    same pixels (tests/test_datasets.py compares them), in 0.21 ms instead of PIL's 0.47 ms at 224 px on the
    development CPU, since no PIL image is built and copied. Anything else, and any file decode_jpeg fails on,
    takes the load_image path, whose errors name the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        _check_file(path)  # raises the plain-words ImageReadError for a missing file or a folder
        raise ImageReadError(f"cannot read image '{path}': {exc.strerror or exc}") from None
    if not data:
        raise ImageReadError(f"cannot read image '{path}': file is empty (0 bytes)")
    if _jpeg_size(data) == (image_size, image_size) and decoders_agree():
        pixels = _decode_plain_jpeg(data, image_size)
        if pixels is not None:
            return pixels
    return resize_to_tensor(_decode(io.BytesIO(data), path), image_size)


_EXIF_ORIENTATION = 0x0112
_START_OF_FRAME = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7 and SOI: markers without a length field


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None for anything else: a walk over the segments before
    the first scan, a few microseconds (PIL's lazy open costs ten times that, and most files fail this test)."""
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 2 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _NO_LENGTH:
            at += 2
            continue
        if marker in (0xD9, 0xDA) or at + 4 > len(data):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _START_OF_FRAME:
            if at + 9 > len(data):
                return None
            return int.from_bytes(data[at + 7 : at + 9], "big"), int.from_bytes(data[at + 5 : at + 7], "big")
        if length < 2:  # a broken length
            return None
        at += 2 + length
    return None


def is_plain_jpeg(img: Image.Image) -> bool:
    """Whether an opened (header-only) image is a JPEG that a plain decoder, torchvision's decode_jpeg on the CPU or
    nvjpeg on a GPU, turns into the picture load_image gives: RGB or grayscale (no CMYK), no EXIF rotation to
    apply, and within the pixel limit (beyond it, load_image names the file as a decompression bomb)."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and img.size[0] * img.size[1] <= MAX_IMAGE_PIXELS
            and img.getexif().get(_EXIF_ORIENTATION, 1) == 1)


def _decode_plain_jpeg(data: bytes, image_size: int) -> torch.Tensor | None:
    """uint8 (3, S, S) decoded by torchvision when `data` is an RGB or grayscale JPEG of S x S pixels with no EXIF
    rotation; else None. (torchvision >= 0.29 flags its decoders as deprecated, a warning Python's default filters
    do not show outside __main__.)"""
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: parses the header only
            if img.size != (image_size, image_size) or not is_plain_jpeg(img):
                return None
        from torchvision.io import ImageReadMode, decode_jpeg

        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:  # a truncated or odd file: load_image's path decodes it and names the problem
        return None
    return pixels if pixels.shape == (3, image_size, image_size) else None


@functools.cache
def decoders_agree() -> bool:
    """Whether torchvision's decode_jpeg gives PIL's pixels in this installation, checked once per process on
    small JPEGs in each chroma subsampling and in grayscale. Both are normally built on libjpeg-turbo, and then
    agree to the bit; a build on another libjpeg (some conda packages) may upsample colour differently, and then
    every image takes the PIL path, so training and captioning always see the same pixels."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        rng = np.random.default_rng(0)
        smooth = np.linspace(0, 255, 48, dtype=np.float64)
        base = (smooth[None, :, None] + smooth[:, None, None] * np.array([0.5, 1.0, -0.5])) % 256
        rgb = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)  # (48, 48, 3)
        samples = [(Image.fromarray(rgb), {"subsampling": s}) for s in (0, 1, 2)]
        samples.append((Image.fromarray(rgb[..., 0]), {}))  # grayscale
        for image, options in samples:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85, **options)
            ours = decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), mode=ImageReadMode.RGB)
            with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
                theirs = torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1)
            if not torch.equal(ours, theirs):
                return False
        return True
    except Exception:  # no usable torchvision decoder
        return False


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """As load_image, for an image already in memory (a web upload); error messages call it `name`."""
    if not data:
        raise ImageReadError(f"cannot read image '{name}': file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name)


def _decode(handle: BinaryIO, name: str | Path) -> Image.Image:
    try:
        with Image.open(handle) as img:
            _check_pixels(name, img)
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image '{name}': not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the latter under -W error
        raise ImageReadError(f"cannot read image '{name}': decompression bomb ({exc})") from None
    except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageReadError(f"cannot read image '{name}': {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    """PIL words truncation several ways ("image file is truncated", "Truncated File Read", ...)."""
    if "truncated" in str(exc).lower():
        return f"file is truncated (an incomplete download or copy?): {exc}"
    return f"{type(exc).__name__}: {exc}"


def _check_file(path: Path) -> None:
    """Give the commonest failures a plain-words message before PIL sees the file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image '{path}': file not found") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read image '{path}': {exc.strerror or exc}") from None
    if path.is_dir():
        raise ImageReadError(f"cannot read image '{path}': it is a folder, not a file")
    if size == 0:
        raise ImageReadError(f"cannot read image '{path}': file is empty (0 bytes)")


def _check_pixels(path: str | Path, img: Image.Image) -> None:
    """Refuse to decode an image whose header claims more pixels than the limit: the smaller of
    MAX_IMAGE_PIXELS and PIL's own Image.MAX_IMAGE_PIXELS (PIL merely warns up to twice its limit)."""
    limit = MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS is None else min(MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS)
    width, height = img.size
    if width * height > limit:
        raise ImageReadError(
            f"cannot read image '{path}': decompression bomb ({width}x{height} = {width * height} pixels "
            f"exceeds the limit of {limit})"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode. Transparent pixels become white (what a viewer shows), not whatever colour
    happens to be stored under alpha 0; 16-bit values are rescaled, since PIL's convert clips them at 255."""
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_to_eight_bit(img)
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def _sixteen_to_eight_bit(img: Image.Image) -> Image.Image:
    """Map 0..65535 onto 0..255 (divide by 257, rounded): the full range maps onto the full range."""
    values = np.asarray(img).astype(np.float64)
    eight = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(eight)  # a 2-D uint8 array becomes mode 'L'


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files exactly as given (whatever their extension: the user asked for them) and folders expanded
    recursively, sorted, to their image files by extension (hidden files such as macOS '._x.jpg' skipped).

    A path that does not exist raises FileNotFoundError naming it, before any work is done.
    """
    result: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            result.extend(_images_in(path))
        elif path.exists():
            result.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: '{path}'")
    return result


def _images_in(folder: Path) -> list[Path]:
    found = (
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    return sorted(found)
