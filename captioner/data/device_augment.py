"""Training augmentation applied to a whole batch on the training device, instead of image by image in workers.

Why: TrainAugment costs a DataLoader worker about 0.3 ms of CPU per 112 px image (a resized crop, then
brightness, contrast and saturation jitter). A GPU does a batch's worth in a few small kernels. On a machine
whose CPU cores are shared between several training processes (an ablation's runs sharing one GPU), that CPU
time is what the runs compete for.

The choices stay where they were made before: `CaptionDataset(..., augment_later=True)` draws each item's
`AugmentDraw` from the item's own seeded generator (data/sampling.py), mirrors its captions when the draw says so,
and sends the un-augmented image with the draw (`item["augment"]`, float32 (8,)); the collate stacks the draws
(`Batch.augment`, (B, 8)). `augment_batch` then produces the same pixels TrainAugment would have, up to one or
two grey levels at the few pixels where float rounding falls the other way, because training's crops never
shrink: the crop comes from an image already at training size and is resized back to that size, so bilinear
interpolation (grid_sample) equals torchvision's antialiased resize. `DeviceAugmentLoader` wraps a training
loader and does this per batch.
"""

from __future__ import annotations

import functools
from typing import Iterable, Iterator

import torch
from torch.nn import functional as F

from .collate import Batch

# Rec. 601 luma weights, as torchvision's rgb_to_grayscale and transforms._jitter use
_LUMA = (0.299, 0.587, 0.114)


def augment_batch(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) images and their draws (B, 8) (AugmentDraw.as_tensor rows: top, left, height, width,
    brightness, contrast, saturation, flipped) -> uint8 (B, 3, S, S) augmented images, on the images' device.

    Each output pixel samples the crop bilinearly at the position torchvision's resize (align_corners=False)
    maps it to, clamped to the crop's edge pixels as that resize does; it is rounded to a grey level, then
    jittered as transforms._jitter does (contrast about the mean luma, brightness, saturation), rounded again,
    and mirrored by reading the columns backwards. Crops must not be larger than S (they never are in training:
    see the module docstring); a larger one would need antialiasing, which this does not do."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"augment_batch expects uint8 (B, 3, S, S) images, got {images.dtype} {tuple(images.shape)}")
    if draws.shape != (images.shape[0], 8):
        raise ValueError(f"augment_batch expects ({images.shape[0]}, 8) draws, got {tuple(draws.shape)}")
    count, size = images.shape[0], images.shape[-1]
    if count == 0:
        return images
    if bool((draws[:, 2:4] > size).any()):  # draws come from the host: checked there, no wait for the GPU
        raise ValueError(f"augment_batch: a crop larger than the {size} px image (it would need antialiasing)")
    draws = draws.to(device=images.device, dtype=torch.float32, non_blocking=True)
    top, left, height, width, brightness, contrast, saturation, flipped = draws.unbind(1)  # each (B,)
    columns = _source_positions(left, width, size)  # (B, S) in pixels of the image
    columns = torch.where(flipped.unsqueeze(1) > 0.5, columns.flip(1), columns)
    rows = _source_positions(top, height, size)  # (B, S)
    # grid_sample's coordinates, align_corners=False: -1 and 1 are the outer edges of the first and last pixel
    grid = torch.stack(torch.broadcast_tensors(((2 * columns + 1) / size - 1).unsqueeze(1),
                                               ((2 * rows + 1) / size - 1).unsqueeze(2)), dim=-1)  # (B, S, S, 2)
    cropped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    cropped = cropped.round_()  # (B, 3, S, S): the grey levels the resized crop has in the workers' path
    luma = _luma(images.device)  # (1, 3, 1, 1)
    mean = (cropped * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
    view = lambda factor: factor.view(count, 1, 1, 1)  # noqa: E731
    out = cropped.sub_(mean).mul_(view(contrast)).add_(mean).mul_(view(brightness))
    grey = (out * luma).sum(1, keepdim=True)  # (B, 1, S, S)
    out = out.mul_(view(saturation)).add_(grey * (1 - view(saturation)))
    return out.clamp_(0.0, 255.0).round_().to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _luma(device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) float32 luma weights on `device`, made once: a tensor copied from the host at every batch would
    make the host wait for the GPU each time (a blocking copy synchronises the stream)."""
    return torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1).to(device)


def _source_positions(start: torch.Tensor, extent: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) crop starts and extents -> (B, size): where output pixel j samples the image along one axis,
    start + (j + 0.5) * extent / size - 0.5 (torchvision's resize, align_corners=False), kept inside the crop."""
    steps = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5  # (S,)
    positions = start.unsqueeze(1) + steps * (extent / size).unsqueeze(1) - 0.5
    return torch.minimum(torch.maximum(positions, start.unsqueeze(1)), (start + extent - 1).unsqueeze(1))


def augment_batch_on(batch: Batch, device: torch.device) -> Batch:
    """A batch whose images come with draws (`batch.augment`) -> the same batch, images augmented on `device`."""
    if batch.augment is None:
        return batch
    batch.images = augment_batch(batch.images.to(device, non_blocking=True), batch.augment)
    batch.augment = None
    return batch


class DeviceAugmentLoader:
    """Wraps a training loader whose batches carry draws; yields them with `images` augmented on `device`.
    Length, sampler and dataset are the wrapped loader's (the training loop sets the sampler's epoch)."""

    def __init__(self, loader: Iterable[Batch], device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # sampler, dataset, collate_fn, ...: the wrapped loader's
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield augment_batch_on(batch, self.device)
