"""Bridges: trunk grid (B, 512, h, w) -> decoder memory tokens (B, N, D).

Every bridge keeps a spatial layout (N tokens, one per grid cell) and adds a 2-D position code, so the
decoder's cross-attention (or the LSTM's soft attention) can tell left from right. Grids are never padded,
so the memory padding mask is None for all of them.

- pool:      adaptive average pooling to a fixed g x g grid, then a linear projection.
- conv:      a 1x1 convolution (a per-cell linear projection) over the full grid.
- attention: the projection followed by Transformer encoder layers (self-attention across cells), default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .dropout import Dropout


def sincos_2d_positions(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine/cosine position code (h*w, dim): half the channels encode the row, half the column.
    Fixed rather than learned so that a model trained at one image size still works at another."""
    if dim % 4:
        raise ValueError(f"model dim {dim} must be divisible by 4 for 2-D positions")
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freqs  # (h, dim/4)
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freqs  # (w, dim/4)
    row_code = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    col_code = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([row_code, col_code], dim=2).reshape(height * width, dim)


class _GridProjection(nn.Module):
    """Shared tail: (B, C, h, w) grid -> (B, h*w, D) tokens with positions, normalised."""

    def __init__(self, in_channels: int, dim: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)
        self.dim = dim

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, c, h, w = grid.shape
        tokens = self.proj(grid.flatten(2).transpose(1, 2))  # (B, h*w, D)
        tokens = tokens + sincos_2d_positions(h, w, self.dim, grid.device).to(tokens.dtype)
        return self.dropout(self.norm(tokens))


class _Bridge(nn.Module):
    """What every bridge shares besides forward: where its tokens sit on the image. One token per grid cell
    unless a bridge resamples the grid (PoolBridge)."""

    def token_centres(self, cell_centres: list[float]) -> list[float]:
        """Centres of the tokens' cells along a side, from the grid cells' centres (see Captioner.token_centres)."""
        return cell_centres


class PoolBridge(_Bridge):
    def __init__(self, in_channels: int, dim: int, dropout: float = 0.1, pool_size: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.tail = _GridProjection(in_channels, dim, dropout)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.tail(self.pool(grid))  # (B, g*g, D)

    def token_centres(self, cell_centres: list[float]) -> list[float]:
        """Centres of the pooled cells along a side: adaptive pooling averages window i =
        cells floor(i n / g) .. ceil((i + 1) n / g) - 1 of n, so each token sits at its window's mean."""
        n, g = len(cell_centres), self.pool.output_size
        windows = [cell_centres[(i * n) // g: -((-(i + 1) * n) // g)] for i in range(g)]
        return [sum(w) / len(w) for w in windows]


class ConvBridge(_Bridge):
    def __init__(self, in_channels: int, dim: int, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.BatchNorm2d(in_channels), nn.ReLU())
        self.tail = _GridProjection(in_channels, dim, dropout)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv(grid))  # (B, h*w, D)


class AttentionBridge(_Bridge):
    def __init__(self, in_channels: int, dim: int, dropout: float = 0.1, num_layers: int = 1, num_heads: int = 4):
        super().__init__()
        self.tail = _GridProjection(in_channels, dim, dropout)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        # The layer's own dropouts (not the one inside its attention) get the cheaper CPU mask; they hold no
        # weights, so checkpoints keep their keys.
        layer.dropout, layer.dropout1, layer.dropout2 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(self.tail(grid)))  # (B, h*w, D)


BRIDGES = ("attention", "pool", "conv")


def build_bridge(kind: str, in_channels: int, dim: int, dropout: float, num_layers: int, num_heads: int) -> nn.Module:
    if kind == "attention":
        return AttentionBridge(in_channels, dim, dropout, num_layers, num_heads)
    if kind == "pool":
        return PoolBridge(in_channels, dim, dropout)
    if kind == "conv":
        return ConvBridge(in_channels, dim, dropout)
    raise ValueError(f"unknown bridge {kind!r}; choose one of {', '.join(BRIDGES)}")
