"""How much of each word's attention falls on the grid cells that hold the objects, on synthetic scenes.

A number behind the README's attention figure, so "the map highlights the object" is measured rather than
eyeballed on one image. The objects of a synthetic scene are found from its pixels: the background is one
colour (the median of the border pixels), and pixels far from it are object. A grid cell holds the object when
more than 2% of the area it stands for is object. Words are grouped into shape nouns, colour words and the rest; for each
group the script prints the mean attention mass on object cells next to the object cells' share of the grid,
which is what a map that ignores the image would score.

    python scripts/attention_on_objects.py --checkpoint runs/syn/best.pt --images /tmp/syn/val --limit 100
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioner import visualize
from captioner.checkpoint import load_model
from captioner.data.images import list_images, load_image
from captioner.data.synthetic import COLOURS, SHAPES
from captioner.data.transforms import resize_to_tensor
from captioner.decoding import DecodeOptions
from captioner.engine import decode_images

SHAPE_WORDS = set(SHAPES) | set(SHAPES.values())
OBJECT_DISTANCE = 90  # summed |RGB difference| from the background beyond which a pixel is object


def object_cells(image: Image.Image, grid: tuple[int, int],
                 placement: visualize.CellPlacement = visualize.CellPlacement()) -> np.ndarray:
    """(h, w) boolean: cells of the encoder grid that hold part of an object. Cell (r, c) is centred at
    (centres[r], centres[c]) of the image, as visualize.CellPlacement explains, and reaches half way to its
    neighbours' centres (as far the other way at the first and last cell)."""
    pixels = np.asarray(image).astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    is_object = np.abs(pixels - np.median(border, axis=0)).sum(axis=-1) > OBJECT_DISTANCE
    height, width = is_object.shape
    rows, cols = _cell_bounds(placement, grid[0], height), _cell_bounds(placement, grid[1], width)
    cells = np.zeros(grid, dtype=bool)
    for r, (top, bottom) in enumerate(rows):
        for c, (left, right) in enumerate(cols):
            cells[r, c] = is_object[top:bottom, left:right].mean() > 0.02
    return cells


def _cell_bounds(placement: visualize.CellPlacement, cells: int, pixels: int) -> list[tuple[int, int]]:
    """[start, end) pixel range of each cell along a side: half way to the neighbouring centres."""
    centres = placement.along(cells)
    if cells == 1:
        return [(0, pixels)]
    edges = np.concatenate([[1.5 * centres[0] - 0.5 * centres[1]], (centres[1:] + centres[:-1]) / 2,
                            [1.5 * centres[-1] - 0.5 * centres[-2]]])
    edges = np.clip(np.round(edges * pixels), 0, pixels).astype(int)
    return [(int(a), max(int(b), int(a) + 1)) for a, b in zip(edges[:-1], edges[1:])]


def word_kind(word: str) -> str:
    return "shape noun" if word in SHAPE_WORDS else "colour word" if word in COLOURS else "other word"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", required=True, help="folder of synthetic scenes (e.g. OUT/val)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--attention-layer", type=int, default=-1)
    args = parser.parse_args()

    device = torch.device("cpu")
    model, tokenizer, cfg = load_model(args.checkpoint, device)
    options = DecodeOptions(attention_layer=visualize.check_attention_layer(model, args.attention_layer))
    on_object, share = defaultdict(list), defaultdict(list)
    for path in list_images([args.images])[: args.limit]:
        image = load_image(path)
        best = decode_images(model, resize_to_tensor(image, cfg.data.image_size)[None], device, options)[0][0]
        words = visualize.hypothesis_attention(tokenizer, best)
        cells = object_cells(image, words.maps.shape[1:], visualize.cell_placement(model, cfg.data.image_size))
        for word, grid in zip(words.words, words.maps):
            on_object[word_kind(word)].append(float(grid[cells].sum()))
            share[word_kind(word)].append(float(cells.mean()))
    report = {kind: {"words": len(values), "attention_on_object_cells": round(float(np.mean(values)), 3),
                     "object_cells_share_of_grid": round(float(np.mean(share[kind])), 3)}
              for kind, values in sorted(on_object.items())}
    print(json.dumps({"checkpoint": str(Path(args.checkpoint)), "layer": args.attention_layer, **report}, indent=2))


if __name__ == "__main__":
    main()
