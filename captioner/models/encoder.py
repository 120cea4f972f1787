"""ResNet18 trunk: image -> spatial feature grid (B, 512, H/32, W/32).

The classifier head (avgpool + fc) is dropped: attention needs the grid, not one pooled vector.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from ..errors import WeightsUnavailableError

TRUNK_CHANNELS = 512


def _imagenet_weights_file() -> Path:
    """Where torchvision's download cache keeps the ImageNet ResNet18 file (what an offline user must place)."""
    url = ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _load_resnet18(weights: str) -> nn.Module:
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
    except Exception as exc:
        raise WeightsUnavailableError(f"--encoder-weights {path}: not a loadable state dict ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
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


class ResNet18Trunk(nn.Module):
    """The convolutional part of ResNet18, split into a frozen prefix and a trainable suffix.

    `trainable_layers` (0..5, torchvision's convention) counts trainable stages from the output end:
    5 fine-tunes everything, 1 trains only layer4, 0 freezes the whole trunk. The frozen prefix stays in eval
    mode (fixed BatchNorm statistics) and runs without gradients, so its output is a pure function of the
    image: that is what lets the training loop cache it and skip the prefix after the first epoch.
    """

    def __init__(self, weights: str = "none", trainable_layers: int = 5):
        super().__init__()
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        net = _load_resnet18(weights)
        stages = {"conv1": nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), "layer1": net.layer1,
                  "layer2": net.layer2, "layer3": net.layer3, "layer4": net.layer4}
        split = len(STAGES) - trainable_layers
        self.prefix = nn.Sequential(*(stages[name] for name in STAGES[:split]))  # frozen
        self.suffix = nn.Sequential(*(stages[name] for name in STAGES[split:]))  # trained
        self.prefix.requires_grad_(False)
        self.prefix.eval()  # from the start: a forward before .train()/.eval() must not move its BatchNorm statistics
        self.trainable_layers = trainable_layers

    def train(self, mode: bool = True) -> "ResNet18Trunk":
        super().train(mode)
        self.prefix.eval()
        return self

    def forward_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> frozen-prefix features (no gradient)."""
        with torch.no_grad():
            return self.prefix(images)

    def forward_suffix(self, features: torch.Tensor) -> torch.Tensor:
        """frozen-prefix features -> grid (B, 512, ceil(H/32), ceil(W/32))."""
        return self.suffix(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_suffix(self.forward_prefix(images))

    @torch.no_grad()
    def calibrate_prefix(self, batches) -> None:
        """Re-estimate the frozen prefix's BatchNorm statistics on real images (cumulative average).

        A randomly initialised trunk has running mean 0 and variance 1 everywhere, so its frozen features drift
        in scale from stage to stage; measured statistics make them well-conditioned for the trained part.
        Only sensible for a random trunk: pretrained statistics are already right."""
        norms = [m for m in self.prefix.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over all calibration batches
        self.prefix.train()
        for images in batches:
            self.prefix(images)
        self.prefix.eval()
