"""Attention figures: the image, then one panel per generated word with where the decoder looked, upsampled over it.

Shared by `captioner caption --attention`, the web page of `captioner serve` and the README figure, so all three
draw the same picture. Figures are built with matplotlib's object API on the Agg canvas (no pyplot): no global
figure state, so the server can draw figures in several threads at once.

Where the maps come from: the bridges hand the decoder one memory token per cell of the trunk's grid, in
row-major order, and images are resized to a square before encoding, so N attention weights reshape to a
square (h, w) grid over the image (stretched back to the image's own aspect ratio here). Where on the image
each cell sits is what the model's geometry says (see `CellPlacement` and `upsample`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .decoding import Hypothesis
from .errors import CaptionerError
from .text import Tokenizer

WORD_START = "\u2581"  # SentencePiece's mark of a piece that begins a word
DISPLAY_SIZE = 224  # longest side of the image in each panel, in pixels: keeps figures small
COLUMNS = 5


@dataclass
class WordAttention:
    """Where the decoder looked for each word of one caption."""

    words: list[str]
    maps: np.ndarray  # (W, h, w) float32; each map sums to 1 over the grid


@dataclass(frozen=True)
class CellPlacement:
    """Where the cells of the attention grid sit along each side of the (square) model input: cell i is
    centred at centres[i] of the side's length, rows and columns alike. None: cell i at i / cells, where a
    grid that tiles the image evenly puts it (see upsample).

    The centres come from the model (Captioner.token_centres), because an even tiling is not always what the
    encoder built: at 160px a 3x3 max pool in ceil mode makes layer2's 20 cells into 6 cells 24 pixels apart
    and a 7th from the last two, so the grid spans 168 pixels of 160, and the pool bridge averages overlapping
    windows of whatever grid it gets."""

    centres: tuple[float, ...] | None = None

    def along(self, cells: int) -> np.ndarray:
        """(cells,) centres as fractions of the side, checked against the attention grid's side."""
        centres = np.arange(cells) / cells if self.centres is None else np.asarray(self.centres, dtype=np.float64)
        if len(centres) != cells:
            raise ValueError(f"the placement has {len(centres)} cell centres per side, the attention grid {cells}")
        return centres


def cell_placement(model, image_size: int) -> CellPlacement:
    """The placement of `model`'s memory tokens (a Captioner) for an image_size x image_size input."""
    return CellPlacement(tuple(c / image_size for c in model.token_centres(image_size)))


def attention_layer_count(model) -> int:
    """How many layers can show their attention: every Transformer decoder layer, or the LSTM's one."""
    return model.cfg.decoder_layers if model.cfg.decoder == "transformer" else 1


def check_attention_layer(model, layer: int) -> int:
    """`layer` (-1 = last) if the model has it; otherwise a CaptionerError saying which layers exist."""
    n = attention_layer_count(model)
    if not -n <= layer < n:
        raise CaptionerError(f"--attention-layer {layer}: this {model.cfg.decoder} decoder has {n} attention "
                             f"layer(s) (use 0..{n - 1}, or -1 for the last)")
    return layer


def grid_shape(num_tokens: int) -> tuple[int, int]:
    """Memory tokens -> the (h, w) grid they came from. Images are square when encoded, so the grid is too."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} memory tokens do not form a square grid; cannot place attention on the image")
    return side, side


def word_attention(pieces: list[str], attention: torch.Tensor) -> WordAttention:
    """Group subword pieces into words and average their attention rows (a mean of distributions is one).

    pieces: one SentencePiece piece per generated token; attention (L, N), one row per token."""
    if len(pieces) != attention.shape[0]:
        raise ValueError(f"{len(pieces)} tokens but {attention.shape[0]} attention rows")
    words: list[str] = []
    rows: list[list[int]] = []
    for i, piece in enumerate(pieces):
        if piece.startswith(WORD_START) or not words:
            words.append("")
            rows.append([])
        words[-1] += piece.replace(WORD_START, "")
        rows[-1].append(i)
    h, w = grid_shape(attention.shape[1])
    attention = attention.float()
    maps = np.stack([attention[r].mean(dim=0).numpy() for r in rows]) if rows else np.zeros((0, h * w))
    return WordAttention(words, maps.reshape(len(words), h, w).astype(np.float32))


def hypothesis_attention(tokenizer: Tokenizer, hypothesis: Hypothesis) -> WordAttention:
    """The words of a decoded hypothesis with their attention maps (decoding must have kept attention)."""
    if hypothesis.attention is None:
        raise ValueError("the hypothesis has no attention: decode with DecodeOptions(attention_layer=...)")
    return word_attention(tokenizer.pieces(hypothesis.tokens), hypothesis.attention)


def upsample(grid: np.ndarray, width: int, height: int, placement: CellPlacement = CellPlacement()) -> np.ndarray:
    """(h, w) map -> (height, width), bilinear between the points of the image the cells are centred on.

    A ResNet's padded, strided convolutions centre output cell i on input pixel 32 * i, the top-left corner
    of its 32-pixel block, not the block's middle (conv1 and every stride-2 stage map i to 2i). So on a grid
    that tiles the image, cell (r, c) of h x w sits at (r / h, c / w) of the image (the default placement),
    and a plain image resize, which centres it at ((r + 0.5) / h, (c + 0.5) / w), would draw every map half a
    cell too far right and down. Pooling after the trunk moves the centres again (see CellPlacement and
    ResNet18Trunk.cell_centres). Beyond the first and last centres the map keeps the edge cell's value."""
    rows = _interpolation(grid.shape[0], height, placement)
    return rows @ grid.astype(np.float32) @ _interpolation(grid.shape[1], width, placement).T


def _interpolation(cells: int, pixels: int, placement: CellPlacement) -> np.ndarray:
    """(pixels, cells) linear interpolation weights between the cells' centres (fractions of the length)."""
    centres = placement.along(cells)
    fraction = (np.arange(pixels) + 0.5) / pixels  # of the length, at each pixel's centre
    position = np.interp(fraction, centres, np.arange(cells, dtype=np.float64))  # in cells, held beyond the ends
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, cells - 1)
    weights = np.zeros((pixels, cells), dtype=np.float32)
    np.add.at(weights, (np.arange(pixels), low), 1.0 - (position - low))
    np.add.at(weights, (np.arange(pixels), high), position - low)
    return weights


def highlight(pixels: np.ndarray, heat: np.ndarray, floor: float = 0.15) -> np.ndarray:
    """uint8 (H, W, 3) image lit by an (H, W) attention map: full brightness at the map's peak, `floor` where
    it is 0, as in Show, Attend and Tell's figures. Unlike a colour overlay it leaves the object's own colours
    visible where the decoder looked."""
    light = floor + (1.0 - floor) * heat / max(float(heat.max()), 1e-12)
    return (pixels.astype(np.float32) * light[..., None]).round().clip(0, 255).astype(np.uint8)


def _display_image(image: Image.Image) -> Image.Image:
    scale = DISPLAY_SIZE / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR)


def attention_figure(image: Image.Image, caption: str, attention: WordAttention,
                     placement: CellPlacement = CellPlacement()):
    """A matplotlib Figure: the image with its caption, then a panel per word with the image lit by the
    word's attention map. Each panel is lit relative to its own peak, and the title gives the peak cell's
    share of the attention, so a flat map can be told apart from a focused one. `placement`: see upsample."""
    from matplotlib.figure import Figure

    shown = _display_image(image.convert("RGB"))
    pixels = np.asarray(shown)
    panels = 1 + len(attention.words)
    columns = min(COLUMNS, panels)
    rows = math.ceil(panels / columns)
    aspect = shown.height / shown.width
    panel_width, title_height, caption_height = 2.0, 0.3, 0.4  # inches
    height = rows * (panel_width * aspect + title_height) + caption_height
    fig = Figure(figsize=(panel_width * columns, height))
    # fixed margins instead of a layout engine: same look, a fraction of the drawing time
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - caption_height / height, wspace=0.04,
                        hspace=title_height / (panel_width * aspect))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    axes[0].imshow(pixels)
    axes[0].set_title("image", fontsize=9)
    for ax, word, grid in zip(axes[1:], attention.words, attention.maps):
        ax.imshow(highlight(pixels, upsample(grid, shown.width, shown.height, placement)))
        ax.set_title(f"{word}  ({float(grid.max()):.0%})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(caption, fontsize=10)
    return fig


def figure_png(fig, dpi: int = 80) -> bytes:
    """Render a Figure to PNG bytes on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def attention_png(image: Image.Image, tokenizer: Tokenizer, hypothesis: Hypothesis,
                  placement: CellPlacement = CellPlacement()) -> bytes:
    """The attention figure of a decoded hypothesis as PNG bytes."""
    caption = tokenizer.decode(hypothesis.tokens)
    return figure_png(attention_figure(image, caption, hypothesis_attention(tokenizer, hypothesis), placement))


def figure_path(out_dir: Path, image_path: str | Path, used: set[str]) -> Path:
    """OUT_DIR/<image stem>.png, with -2, -3, ... added when two images share a name (a/x.jpg and b/x.jpg)."""
    stem, name, n = Path(image_path).stem, f"{Path(image_path).stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return out_dir / name
