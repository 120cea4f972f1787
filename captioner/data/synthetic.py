"""Procedurally drawn scenes with captions: the built-in demo dataset and the test fixture.

Each scene is a plain background with a group of 1-3 identical objects (same shape, colour and size)
placed near each other in one region of the image. Five captions per image state the same facts in
different words: count, size, colour, shape, position and background colour. The words are chosen so
that a captioner must look at the image to get them right (nothing is predictable from the others).

Nuisance that keeps it from being trivial: jittered positions, sizes, gaps and rotations (sizes stay
unambiguous: a small object is at most 0.6 times as wide as a large one, under half its area), per-image colour shifts, pixel
noise and JPEG compression (quality 90) when written to disk.

`make_synthetic` writes the official COCO captions layout::

    out_dir/train/000000000001.jpg ...
    out_dir/val/000000000101.jpg ...
    out_dir/annotations/captions_train.json, captions_val.json

Output is a pure function of the arguments (same seed -> same bytes): every image draws from its own
`random.Random` seeded by (seed, image id).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COUNT_WORDS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEMPLATES",
    "SceneFacts",
    "SyntheticPaths",
    "caption_variants",
    "make_synthetic",
    "render_scene",
    "scene_captions",
]

# ---------------------------------------------------------------------------------------------------
# Vocabulary. Colour names are the words used in captions; RGB values are the nominal drawn colours.

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (150, 150, 150),
    "yellow": (250, 232, 140),  # pale yellow
    "blue": (150, 190, 240),  # light blue
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
}
SHAPES: dict[str, str] = {  # singular -> plural
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
}
SIZES: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
COUNT_WORDS: dict[int, tuple[str, ...]] = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
POSITIONS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"),
    "middle": ("in the middle", "in the center"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}

# Fields: {np} "two large red circles", {pos}, {bg} background colour, {a_bg} "a white",
# {be} is/are, {sits} sits/sit.
TEMPLATES: tuple[str, ...] = (
    "{np} {pos} of {a_bg} background",
    "{a_bg} image with {np} {pos}",
    "there {be} {np} {pos} and the background is {bg}",
    "on {a_bg} background {np} {sits} {pos}",
    "{np} {be} shown {pos} against {a_bg} background",
    "{a_bg} background with {np} {pos}",
    "{pos} of the {bg} image {be} {np}",
    "the image shows {np} {pos} against {a_bg} background",
)

# Smallest RGB distance allowed between an object colour and a background it may be drawn on.
_MIN_CONTRAST = 90.0
_ALLOWED_COLOURS: dict[str, tuple[str, ...]] = {
    bg: tuple(
        name
        for name, rgb in COLOURS.items()
        if name != bg and math.dist(rgb, bg_rgb) >= _MIN_CONTRAST
    )
    for bg, bg_rgb in BACKGROUNDS.items()
}

# Geometry at the reference size 320x240; scaled by min(width/320, height/240).
_REF_W, _REF_H = 320, 240
_RADIUS = {"small": (15.0, 19.0), "large": (33.0, 38.0)}  # circumradius range in pixels
_GAP = (8.0, 16.0)  # free space between neighbouring objects' circumcircles
_MARGIN = 3.0  # free space between any object and the image border
_JITTER = 1.5  # per-object position jitter, +- in x and y (2 * sqrt(2) * 1.5 < 8: gaps stay > 3px)
_ROTATION = 8.0  # degrees, +-
_BG_SHIFT, _FG_SHIFT = 6, 14  # per-image colour shift per channel, +-
_PIXEL_NOISE = 4  # per-pixel uniform noise, +-
_JPEG_QUALITY = 90

# Where the group's centre may lie, as fractions of (width, height): ((x0, x1), (y0, y1)).
_REGIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((0.0, 0.30), (0.42, 0.58)),
    "middle": ((0.42, 0.58), (0.42, 0.58)),
    "right": ((0.70, 1.0), (0.42, 0.58)),
    "top": ((0.40, 0.60), (0.0, 0.28)),
    "bottom": ((0.40, 0.60), (0.72, 1.0)),
}

# Group formations: object centres in units of the centre-to-centre distance s. Neighbours are at
# distance >= s, so objects of circumradius r never overlap when s >= 2r + gap.
_H3 = math.sqrt(3) / 2
_D2 = math.sqrt(0.5) / 2
_FORMATIONS: dict[str, tuple[tuple[float, float], ...]] = {
    "single": ((0.0, 0.0),),
    "pair_h": ((-0.5, 0.0), (0.5, 0.0)),
    "pair_v": ((0.0, -0.5), (0.0, 0.5)),
    "pair_d1": ((-_D2, -_D2), (_D2, _D2)),
    "pair_d2": ((-_D2, _D2), (_D2, -_D2)),
    "line_h": ((-1.0, 0.0), (0.0, 0.0), (1.0, 0.0)),
    "line_v": ((0.0, -1.0), (0.0, 0.0), (0.0, 1.0)),
    "tri_up": ((-0.5, _H3 / 2), (0.5, _H3 / 2), (0.0, -_H3 / 2)),
    "tri_down": ((-0.5, -_H3 / 2), (0.5, -_H3 / 2), (0.0, _H3 / 2)),
    "tri_left": ((_H3 / 2, -0.5), (_H3 / 2, 0.5), (-_H3 / 2, 0.0)),
    "tri_right": ((-_H3 / 2, -0.5), (-_H3 / 2, 0.5), (_H3 / 2, 0.0)),
}
# Groups on the left/right stack vertically, groups at the top/bottom spread horizontally, so the
# group stays in its region; the middle takes any formation.
_VERTICAL = {1: ["single"], 2: ["pair_v", "pair_d1", "pair_d2"], 3: ["line_v", "tri_left", "tri_right"]}
_HORIZONTAL = {1: ["single"], 2: ["pair_h", "pair_d1", "pair_d2"], 3: ["line_h", "tri_up", "tri_down"]}
_FORMATION_CHOICES: dict[str, dict[int, list[str]]] = {
    "left": _VERTICAL,
    "right": _VERTICAL,
    "top": _HORIZONTAL,
    "bottom": _HORIZONTAL,
    "middle": {n: sorted(set(_VERTICAL[n]) | set(_HORIZONTAL[n])) for n in (1, 2, 3)},
}


@dataclass(frozen=True)
class SceneFacts:
    """What a scene shows; every caption of the scene states all six facts."""

    count: int  # 1, 2 or 3 identical objects
    size: str  # key of SIZES: "small" | "large"
    colour: str  # key of COLOURS
    shape: str  # key of SHAPES
    position: str  # key of POSITIONS: "left" | "middle" | "right" | "top" | "bottom"
    background: str  # key of BACKGROUNDS


@dataclass(frozen=True)
class SyntheticPaths:
    """Where `make_synthetic` wrote a dataset (COCO layout)."""

    root: Path
    train_images: Path
    train_captions: Path
    val_images: Path
    val_captions: Path


# ---------------------------------------------------------------------------------------------------
# Drawing


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` with circumradius r centred at (cx, cy), rotated by `angle` radians."""
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "diamond":  # taller than wide, so it is not just a rotated square
        pts = [(0.0, -r), (0.62 * r, 0.0), (0.0, r), (-0.62 * r, 0.0)]
    elif shape == "triangle":  # equilateral, pointing up
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":  # five points, inner radius 0.45 r
        pts = [
            ((r if k % 2 == 0 else 0.45 * r) * math.cos(a), (r if k % 2 == 0 else 0.45 * r) * math.sin(a))
            for k, a in ((k, -math.pi / 2 + k * math.pi / 5) for k in range(10))
        ]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}; expected one of {sorted(SHAPES)}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _jittered(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def _place_group(
    rng: random.Random, count: int, position: str, r: float, scale: float, width: int, height: int
) -> list[tuple[float, float]]:
    """Object centres for a group of `count` objects of circumradius r in region `position`."""
    margin = _MARGIN * scale + _JITTER * scale + 1.0
    (fx0, fx1), (fy0, fy1) = _REGIONS[position]
    gaps = [rng.uniform(*_GAP) * scale, _GAP[0] * scale]  # fall back to the tightest gap if needed
    for gap in gaps:
        s = 2 * r + gap
        names = list(_FORMATION_CHOICES[position][count])
        rng.shuffle(names)
        for name in names:
            offsets = [(ox * s, oy * s) for ox, oy in _FORMATIONS[name]]
            xs, ys = [o[0] for o in offsets], [o[1] for o in offsets]
            # Range of group centres keeping every object inside the image and the centre in the region.
            x0 = max(fx0 * width, margin + r - min(xs))
            x1 = min(fx1 * width, width - margin - r - max(xs))
            y0 = max(fy0 * height, margin + r - min(ys))
            y1 = min(fy1 * height, height - margin - r - max(ys))
            if x0 <= x1 and y0 <= y1:
                cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
                j = _JITTER * scale
                return [(cx + ox + rng.uniform(-j, j), cy + oy + rng.uniform(-j, j)) for ox, oy in offsets]
    raise ValueError(
        f"cannot fit {count} {position} objects of radius {r:.1f}px in a {width}x{height} image; "
        f"use an image of at least 160x120 with an aspect ratio near 4:3"
    )


_NOISE_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _noise_tile(width: int, height: int) -> np.ndarray:
    """A fixed (height + 32, width + 32, 3) int16 noise tile; each image adds a random crop of it."""
    key = (width, height)
    if key not in _NOISE_CACHE:
        gen = np.random.default_rng(12345)
        _NOISE_CACHE[key] = gen.integers(-_PIXEL_NOISE, _PIXEL_NOISE + 1, (height + 32, width + 32, 3), dtype=np.int16)
    return _NOISE_CACHE[key]


def render_scene(rng: random.Random, width: int = 320, height: int = 240) -> tuple[Image.Image, SceneFacts]:
    """Draw one random scene; returns an RGB image of size (width, height) and the facts it shows."""
    if width < 160 or height < 120:
        raise ValueError(f"image size {width}x{height} is too small for synthetic scenes; use at least 160x120")
    background = rng.choice(sorted(BACKGROUNDS))
    facts = SceneFacts(
        count=rng.choice(sorted(COUNT_WORDS)),
        size=rng.choice(sorted(SIZES)),
        colour=rng.choice(_ALLOWED_COLOURS[background]),
        shape=rng.choice(sorted(SHAPES)),
        position=rng.choice(sorted(POSITIONS)),
        background=background,
    )
    scale = min(width / _REF_W, height / _REF_H)
    r = rng.uniform(*_RADIUS[facts.size]) * scale
    centres = _place_group(rng, facts.count, facts.position, r, scale, width, height)

    img = Image.new("RGB", (width, height), _jittered(BACKGROUNDS[background], rng, _BG_SHIFT))
    draw = ImageDraw.Draw(img)
    fill = _jittered(COLOURS[facts.colour], rng, _FG_SHIFT)
    angle = math.radians(rng.uniform(-_ROTATION, _ROTATION))  # identical objects share one rotation
    for cx, cy in centres:
        if facts.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(facts.shape, cx, cy, r, angle), fill=fill)

    tile = _noise_tile(width, height)
    dx, dy = rng.randrange(32), rng.randrange(32)
    arr = np.asarray(img, dtype=np.int16) + tile[dy : dy + height, dx : dx + width]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img, facts


# ---------------------------------------------------------------------------------------------------
# Captions


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption_variants(facts: SceneFacts) -> list[list[str]]:
    """Every caption the templates can give `facts`, one list per template (no duplicates)."""
    plural = facts.count > 1
    shape = SHAPES[facts.shape] if plural else facts.shape
    out: list[list[str]] = []
    seen: set[str] = set()
    for template in TEMPLATES:
        variants: list[str] = []
        for count_word in COUNT_WORDS[facts.count]:
            for size_word in SIZES[facts.size]:
                np_ = f"{size_word} {facts.colour} {shape}"
                np_ = _with_article(np_) if count_word == "a" else f"{count_word} {np_}"
                for pos in POSITIONS[facts.position]:
                    text = template.format(
                        np=np_,
                        pos=pos,
                        bg=facts.background,
                        a_bg=_with_article(facts.background),
                        be="are" if plural else "is",
                        sits="sit" if plural else "sits",
                    )
                    if text not in seen:
                        seen.add(text)
                        variants.append(text)
        out.append(variants)
    return out


def scene_captions(facts: SceneFacts, rng: random.Random, num_captions: int = 5) -> list[str]:
    """`num_captions` distinct captions of `facts`, each from a different template while templates last."""
    pools = [list(v) for v in caption_variants(facts)]
    total = sum(len(p) for p in pools)
    if not 1 <= num_captions <= total:
        raise ValueError(f"num_captions must be between 1 and {total} for {facts}, got {num_captions}")
    order = list(range(len(pools)))
    rng.shuffle(order)
    captions: list[str] = []
    while len(captions) < num_captions:
        for t in order:
            if pools[t] and len(captions) < num_captions:
                captions.append(pools[t].pop(rng.randrange(len(pools[t]))))
    return captions


# ---------------------------------------------------------------------------------------------------
# Dataset on disk


def _coco_document(split: str, seed: int, images: list[dict], annotations: list[dict]) -> dict:
    return {
        "info": {
            "description": f"captioner synthetic scenes ({split}, seed {seed})",
            "url": "",
            "version": "1.0",
            "year": 2024,
            "contributor": "captioner",
            "date_created": "2024/01/01",
        },
        "licenses": [{"url": "", "id": 1, "name": "Public domain (procedurally generated)"}],
        "images": images,
        "annotations": annotations,
    }


def make_synthetic(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    num_captions: int = 5,
) -> SyntheticPaths:
    """Write a synthetic COCO-captions dataset under `out_dir`; the same arguments give the same bytes.

    Image ids run 1..num_train (train) then num_train+1..num_train+num_val (val); caption ids are
    unique across both splits. Existing files with the same names are overwritten.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    root = Path(out_dir)
    paths = SyntheticPaths(
        root=root,
        train_images=root / "train",
        train_captions=root / "annotations" / "captions_train.json",
        val_images=root / "val",
        val_captions=root / "annotations" / "captions_val.json",
    )
    for d in (paths.train_images, paths.val_images, paths.train_captions.parent):
        d.mkdir(parents=True, exist_ok=True)

    next_image_id, next_ann_id = 1, 1
    for split, n, image_dir, ann_path in (
        ("train", num_train, paths.train_images, paths.train_captions),
        ("val", num_val, paths.val_images, paths.val_captions),
    ):
        images: list[dict] = []
        annotations: list[dict] = []
        for _ in range(n):
            image_id = next_image_id
            next_image_id += 1
            rng = random.Random(f"captioner-synthetic:{seed}:{image_id}")
            img, facts = render_scene(rng, width, height)
            file_name = f"{image_id:012d}.jpg"
            img.save(image_dir / file_name, "JPEG", quality=_JPEG_QUALITY)
            images.append(
                {
                    "license": 1,
                    "file_name": file_name,
                    "coco_url": "",
                    "height": height,
                    "width": width,
                    "date_captured": "2024-01-01 00:00:00",
                    "flickr_url": "",
                    "id": image_id,
                }
            )
            for caption in scene_captions(facts, rng, num_captions):
                annotations.append({"image_id": image_id, "id": next_ann_id, "caption": caption})
                next_ann_id += 1
        tmp = ann_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_coco_document(split, seed, images, annotations)), encoding="utf-8")
        tmp.replace(ann_path)
    return paths
