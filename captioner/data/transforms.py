"""Image -> tensor transforms, kept caption-safe.

Images stay uint8 until the batch reaches the model: a uint8 tensor is a quarter the size of float32,
which matters for the in-memory image cache and for what DataLoader workers copy between processes.
Nothing here changes hue (captions say "a red car"), and a mirrored image gets mirrored captions: "left" and
"right" swap places (swap_left_right), so "on the left" stays true.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """The whole image resized to image_size x image_size as uint8 (3, S, S).

    No centre crop: a crop cuts off the objects at the edges that the captions mention. The aspect ratio
    is not kept; the encoder sees slightly stretched images, in training and at inference alike.
    PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    resized = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return TF.pil_to_tensor(resized)  # (3, S, S) uint8


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) or (3, S, S) -> float32 scaled to [0, 1] then ImageNet mean/std normalised
    (what the ResNet18 trunk was trained on). Refuses float input so it cannot be applied twice."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects a uint8 image tensor, got {images_uint8.dtype}")
    if images_uint8.dim() not in (3, 4) or images_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects (3, S, S) or (B, 3, S, S), got {tuple(images_uint8.shape)}")
    mean, std = _mean_std(images_uint8.device)
    return (images_uint8.float().div_(255.0) - mean).div_(std)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) float32 mean and std on `device`, made once: not copied from the host at every batch."""
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float32).view(3, 1, 1).to(device)  # noqa: E731
    return as_tensor(IMAGENET_MEAN), as_tensor(IMAGENET_STD)


class AugmentDraw(NamedTuple):
    """One image's augmentation: the crop box in its pixels, the jitter factors, and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    brightness: float
    contrast: float
    saturation: float
    flipped: bool

    def as_tensor(self) -> torch.Tensor:
        """float32 (8,), in field order: what a DataLoader item carries to data/device_augment.py."""
        return torch.tensor([float(v) for v in self], dtype=torch.float32)


class TrainAugment:
    """Caption-safe augmentation on uint8 (3, H, W) tensors -> uint8 (3, S, S).

    A random resized crop keeping `scale` of the area (default 85-100%: objects near the edges survive) at a
    near-square aspect, then brightness, contrast and saturation jitter (factors drawn from [1 - s, 1 + s]; no
    hue change: captions name colours), then, with `hflip`, a mirror image half the time, whose captions the
    dataset mirrors too (swap_left_right). Randomness comes from `generator` when given (training passes one
    seeded per item and epoch, see data/sampling.py), else from torch's global RNG; the flip is drawn last, so
    turning `hflip` on changes no other choice.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.85, 1.0),
        *,
        ratio: tuple[float, float] = (0.9, 1.1),
        brightness: float = 0.1,
        contrast: float = 0.1,
        saturation: float = 0.0,
        hflip: bool = False,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        for name, strength in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= strength < 1.0:
                raise ValueError(f"{name} jitter must be in [0, 1), got {strength}")
        self.image_size = image_size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hflip = hflip

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(image, generator)[0]

    def apply(self, image: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, bool]:
        """-> (augmented image, whether it was mirrored: its captions must then go through swap_left_right)."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"TrainAugment expects a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
        drawn = self.draw(image.shape[1], image.shape[2], generator)
        size = [self.image_size, self.image_size]
        out = TF.resized_crop(image, drawn.top, drawn.left, drawn.height, drawn.width, size, antialias=True)
        if (drawn.brightness, drawn.contrast, drawn.saturation) != (1.0, 1.0, 1.0):
            out = _jitter(out, drawn.brightness, drawn.contrast, drawn.saturation)
        return (out.flip(-1) if drawn.flipped else out), drawn.flipped

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> "AugmentDraw":
        """The random choices for one image of height x width, without touching its pixels: what `apply` does
        to it, and what data/device_augment.py applies to a whole batch on the training device. Drawn in a
        fixed order (crop box, brightness, contrast, saturation, flip), so both places make the same choices
        from the same generator."""
        top, left, crop_height, crop_width = self._crop_box(height, width, generator)
        brightness = _uniform(1.0 - self.brightness, 1.0 + self.brightness, generator)
        contrast = _uniform(1.0 - self.contrast, 1.0 + self.contrast, generator)
        saturation = _uniform(1.0 - self.saturation, 1.0 + self.saturation, generator) if self.saturation else 1.0
        flipped = self.hflip and _uniform(0.0, 1.0, generator) < 0.5
        return AugmentDraw(top, left, crop_height, crop_width, brightness, contrast, saturation, flipped)

    def _crop_box(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a crop covering `scale` of the area at an aspect ratio in `ratio` (log-uniform);
        after ten misses (a box that does not fit), the whole image."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        return 0, 0, height, width

    def __repr__(self) -> str:
        return (
            f"TrainAugment(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
            f"hflip={self.hflip})"
        )


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def _jitter(image: torch.Tensor, brightness: float, contrast: float, saturation: float = 1.0) -> torch.Tensor:
    """uint8 -> uint8: contrast about the mean luma, then brightness, then saturation (a blend with each pixel's
    luma: 0 is grey, 1 unchanged), in one float pass.

    Equals torchvision's adjust_brightness, adjust_contrast and adjust_saturation in that order except that it
    clamps once at the end rather than in between; one pass instead of three saves about a millisecond per
    image on a CPU.
    """
    out = image.float()
    mean = (out * _LUMA).sum(dim=0).mean()
    out.sub_(mean).mul_(contrast).add_(mean).mul_(brightness)
    if saturation != 1.0:
        grey = (out * _LUMA).sum(dim=0, keepdim=True)
        out.mul_(saturation).add_(grey, alpha=1.0 - saturation)
    return out.clamp_(0.0, 255.0).round_().to(torch.uint8)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: the whole words "left" and "right" swapped, their case kept
    ("Left" -> "Right", "LEFT" -> "RIGHT"); "leftmost", "bright" and "upright" are left alone."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, caption)
