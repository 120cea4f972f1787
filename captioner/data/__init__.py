"""Data: caption files of every supported format -> ImageRecords -> CaptionDataset items.

Loaders (COCO, Karpathy, Flickr8k) only parse annotations; images are read lazily, one at a time, by
CaptionDataset via load_image, so a bad image costs one sample rather than the whole load.
"""

from .coco import load_coco
from .dataset import CaptionDataset
from .flickr8k import load_flickr8k
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, list_images, load_image
from .karpathy import load_karpathy
from .records import ImageRecord
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, normalize, resize_to_tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "CaptionDataset",
    "ImageRecord",
    "TrainAugment",
    "list_images",
    "load_coco",
    "load_flickr8k",
    "load_image",
    "load_karpathy",
    "normalize",
    "resize_to_tensor",
]
