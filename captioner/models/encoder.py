"""ResNet18 trunk: image -> spatial feature grid (B, C, H/s, W/s).

The classifier head (avgpool + fc) is dropped: attention needs the grid, not one pooled vector. The whole trunk
gives (B, 512, H/32, W/32); a trunk cut after an earlier stage gives a finer, narrower grid (after layer2:
(B, 128, H/8, W/8)), optionally followed by small trained convolutions (`grid_convs`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from ..errors import WeightsUnavailableError

def _imagenet_weights_file() -> Path:
    """Where torchvision's download cache keeps the ImageNet ResNet18 file (what an offline user must place)."""
    url = ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_resnet18(weights: str) -> nn.Module:
    """`weights`: 'imagenet' (torchvision's ResNet18_Weights.IMAGENET1K_V1), 'none' (random init) or a file path
    holding a ResNet18 state dict (torchvision's own file, or any with the same keys; an 'fc.' head is optional)."""
    if weights == "none":
        return resnet18(weights=None)
    if weights == "imagenet":
        try:
            return resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
        except Exception as exc:  # offline: URLError, socket errors, partial downloads
            target = _imagenet_weights_file()
            raise WeightsUnavailableError(
                f"--encoder-weights imagenet: could not load {ResNet18_Weights.IMAGENET1K_V1.url} ({exc}). "
                f"Offline, place that file at {target} (or pass --encoder-weights PATH to a ResNet18 state dict, "
                "or --encoder-weights none to train from scratch)."
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"--encoder-weights {weights}: no such file (expected 'imagenet', 'none' or a ResNet18 state-dict file)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler raises anything from KeyError to RuntimeError on foreign bytes
        raise WeightsUnavailableError(f"--encoder-weights {path}: not a state dict written by torch.save "
                                      f"({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and "config" in state:
        raise WeightsUnavailableError(f"--encoder-weights {path}: a captioner checkpoint, not a trunk's weights; "
                                      f"--init-from {path} starts a run from its whole model")
    if isinstance(state, dict) and "state_dict" in state:  # e.g. `captioner pretrain-trunk`'s file
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"--encoder-weights {path}: holds a {type(state).__name__}, not a state dict "
                                      "(parameter name -> tensor)")
    model = resnet18(weights=None)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"--encoder-weights {path}: not a ResNet18 state dict "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
        )
    return model


# Stage names from the input end, as torchvision's `trainable_backbone_layers` counts them from the output end.
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")
STAGE_CHANNELS = {"conv1": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
STAGE_STRIDES = {"conv1": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def grid_convolutions(in_channels: int, width: int, count: int, pool: int = 1) -> nn.Sequential:
    """`count` trained 3x3 convolution + BatchNorm + ReLU blocks at the grid's resolution, then a `pool` x `pool`
    max pool: (B, C, h, w) -> (B, width, ceil(h/pool), ceil(w/pool)).

    Over a frozen random trunk cut early, such blocks learn far faster than the trunk's own deep stages trained
    from scratch: on the synthetic scenes two of them (width 128) over layer2 told the five shapes apart 85% of
    the time after 4 epochs, where layer3 + layer4 trained from random weights reached 40%. They run at full
    resolution because a strided convolution loses the fine outline that tells a star from a diamond (73%);
    the max pool after them keeps what was detected in each block while cutting the memory tokens that the
    bridge and the decoder pay for."""
    layers: list[nn.Module] = []
    for i in range(count):
        layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    if count and pool > 1:
        layers.append(nn.MaxPool2d(pool, ceil_mode=True))
    return nn.Sequential(*layers)


class ResNet18Trunk(nn.Module):
    """The convolutional part of ResNet18, split into a frozen prefix and a trainable suffix.

    `stages` (1..5) keeps the trunk's first stages and drops the rest: 5 is the whole ResNet18 (stride 32,
    512 channels), 3 ends after layer2 (stride 8, 128 channels). `trainable_layers` (0..stages, torchvision's
    convention) counts trainable stages from the output end of what is kept: with all five, 5 fine-tunes
    everything, 1 trains only layer4, 0 freezes the whole trunk. `grid_convs` trained 3x3 convolutions of width
    `grid_width` and a `grid_pool` max pool follow the last kept stage (see grid_convolutions). The frozen prefix
    stays in eval mode (fixed BatchNorm statistics) and runs without gradients, so its output is a pure function of
    the image: that is what lets the training loop cache it and skip the prefix after the first epoch.
    """

    def __init__(self, weights: str = "none", trainable_layers: int = 5, stages: int = 5, grid_convs: int = 0,
                 grid_width: int = 256, grid_pool: int = 1):
        super().__init__()
        if not 1 <= stages <= len(STAGES):
            raise ValueError(f"--trunk-stages must be in 1..{len(STAGES)}, got {stages}")
        if not 0 <= trainable_layers <= stages:
            raise ValueError(f"--trainable-layers must be in 0..{stages} (--trunk-stages {stages} keeps {stages} "
                             f"stages), got {trainable_layers}; for more, keep more with --trunk-stages")
        if grid_convs < 0 or (grid_convs and (grid_width < 1 or grid_pool < 1)):
            raise ValueError(f"--grid-convs must be >= 0, --grid-width and --grid-pool >= 1; got {grid_convs}, "
                             f"{grid_width}, {grid_pool}")
        net = load_resnet18(weights)
        modules = {"conv1": nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), "layer1": net.layer1,
                   "layer2": net.layer2, "layer3": net.layer3, "layer4": net.layer4}
        kept = STAGES[:stages]
        split = stages - trainable_layers
        self.prefix = nn.Sequential(*(modules[name] for name in kept[:split]))  # frozen
        self.suffix = nn.Sequential(*(modules[name] for name in kept[split:]))  # trained
        last_channels = STAGE_CHANNELS[kept[-1]]
        self.grid_convs = grid_convolutions(last_channels, grid_width, grid_convs, grid_pool)  # trained
        self.out_channels = grid_width if grid_convs else last_channels
        self.trunk_stride = STAGE_STRIDES[kept[-1]]
        self.pool = grid_pool if grid_convs else 1
        self.stride = self.trunk_stride * self.pool
        self.prefix.requires_grad_(False)
        self.prefix.eval()  # from the start: a forward before .train()/.eval() must not move its BatchNorm statistics
        self.trainable_layers = trainable_layers

    def cell_centres(self, image_size: int) -> list[float]:
        """Where the output grid's cells are centred along a side of an image_size input, in input pixels.

        A ResNet's padded, strided convolutions centre cell j of a stride-s stage on input pixel s * j (the
        top-left corner of its s-pixel block, not its middle), and the stage's side is ceil(image_size / s). A
        k x k max pool in ceil mode merges cells k*i .. k*i + k - 1 (fewer at the far edge), so pooled cell i
        sits at their mean: at 160px, layer2's 20 cells pool 3x3 into 6 cells 24 pixels apart and a 7th of two
        cells, centred at 148, whose window reaches past the image."""
        side = math.ceil(image_size / self.trunk_stride)
        centres = [float(self.trunk_stride * j) for j in range(side)]
        windows = [centres[i:i + self.pool] for i in range(0, side, self.pool)]
        return [sum(w) / len(w) for w in windows]

    @property
    def has_frozen_prefix(self) -> bool:
        return len(self.prefix) > 0

    def train(self, mode: bool = True) -> "ResNet18Trunk":
        super().train(mode)
        self.prefix.eval()
        return self

    def forward_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> frozen-prefix features (no gradient)."""
        with torch.no_grad():
            return self.prefix(images)

    def forward_suffix(self, features: torch.Tensor) -> torch.Tensor:
        """frozen-prefix features -> grid (B, out_channels, ceil(H/stride), ceil(W/stride))."""
        return self.grid_convs(self.suffix(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_suffix(self.forward_prefix(images))

    @torch.no_grad()
    def calibrate_prefix(self, batches) -> None:
        """Re-estimate the frozen prefix's BatchNorm statistics on real images (cumulative average).

        A randomly initialised trunk has running mean 0 and variance 1 everywhere, so its frozen features drift
        in scale from stage to stage; measured statistics make them well-conditioned for the trained part.
        Only sensible for a random trunk: pretrained statistics are already right.

        They are measured in float64, on a copy, then stored in the prefix's own dtype. In float32 a
        convolution's sums come out in an order that depends on the thread count and memory layout (and on CUDA
        the algorithm picked, TF32): the same images gave statistics differing in their last bits between a
        2-thread process and a 1-thread one (as under torchrun), which is enough to change the feature cache's
        key (training_data.open_feature_store) and miss the cache `captioner extract-features` had filled. float64's
        own rounding is far below float32's, so the stored values no longer depend on how they were computed.
        (128 images at 160 px took 5.3 s on 2 CPU cores instead of 0.8 s, once per run.)"""
        device = next(self.prefix.parameters()).device
        measure_on = torch.device("cpu") if device.type == "mps" else device  # no float64 on Apple's GPUs
        measuring = copy.deepcopy(self.prefix).to(measure_on, torch.float64)
        for m in measuring.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over all calibration batches
        measuring.train()
        for images in batches:
            measuring(images.to(measure_on, torch.float64))
        own = self.prefix.state_dict()
        self.prefix.load_state_dict({name: value.to(own[name].device, own[name].dtype)
                                     for name, value in measuring.state_dict().items()})
        self.prefix.eval()
