"""Tests for the synthetic scene dataset: COCO format, determinism, captions and rendered pixels."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioner.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    SceneFacts,
    SyntheticPaths,
    caption_variants,
    make_synthetic,
    render_scene,
    scene_captions,
)

W, H = 320, 240


def _load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _words(text: str) -> list[str]:
    return text.split()


def _scenes(n: int, seed: int = 0, width: int = W, height: int = H):
    rng = random.Random(seed)
    return [(*render_scene(rng, width, height), rng) for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> SyntheticPaths:
    return make_synthetic(tmp_path_factory.mktemp("syn"), num_train=12, num_val=5, seed=3)


# ---------------------------------------------------------------------------------------------------
# Files on disk


def test_layout_and_official_coco_schema(dataset: SyntheticPaths):
    assert dataset.train_images == dataset.root / "train"
    assert dataset.val_images == dataset.root / "val"
    assert dataset.train_captions == dataset.root / "annotations" / "captions_train.json"
    assert dataset.val_captions == dataset.root / "annotations" / "captions_val.json"
    for ann_path, image_dir, n in ((dataset.train_captions, dataset.train_images, 12), (dataset.val_captions, dataset.val_images, 5)):
        doc = json.loads(ann_path.read_text())
        assert set(doc) == {"info", "licenses", "images", "annotations"}
        assert {"description", "url", "version", "year", "contributor", "date_created"} <= set(doc["info"])
        assert all(set(lic) == {"url", "id", "name"} for lic in doc["licenses"])
        assert len(doc["images"]) == n and len(doc["annotations"]) == 5 * n
        for im in doc["images"]:
            assert set(im) == {"id", "file_name", "width", "height", "license", "date_captured", "coco_url", "flickr_url"}
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            assert (im["width"], im["height"]) == (W, H)
            with Image.open(image_dir / im["file_name"]) as img:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == (W, H)
        for ann in doc["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"}
            assert isinstance(ann["id"], int) and isinstance(ann["caption"], str) and ann["caption"]
        # No stray files: exactly the listed images.
        assert sorted(p.name for p in image_dir.iterdir()) == sorted(im["file_name"] for im in doc["images"])


def test_pycocotools_reads_it_with_five_distinct_captions(dataset: SyntheticPaths):
    for ann_path, n in ((dataset.train_captions, 12), (dataset.val_captions, 5)):
        coco = _load_coco(ann_path)
        assert len(coco.getImgIds()) == n
        for image_id in coco.getImgIds():
            caps = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            assert len(caps) == 5 and len(set(caps)) == 5


def test_ids_unique_across_splits(dataset: SyntheticPaths):
    train = json.loads(dataset.train_captions.read_text())
    val = json.loads(dataset.val_captions.read_text())
    image_ids = [im["id"] for im in train["images"] + val["images"]]
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(image_ids)) == len(image_ids) == 17
    assert len(set(ann_ids)) == len(ann_ids) == 85
    assert image_ids == list(range(1, 18))
    assert {a["image_id"] for a in train["annotations"]} == {im["id"] for im in train["images"]}
    assert {a["image_id"] for a in val["annotations"]} == {im["id"] for im in val["images"]}


def _snapshot(paths: SyntheticPaths) -> dict[str, bytes]:
    return {str(p.relative_to(paths.root)): p.read_bytes() for p in sorted(paths.root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path: Path):
    a = _snapshot(make_synthetic(tmp_path / "a", 6, 3, seed=11))
    b = _snapshot(make_synthetic(tmp_path / "b", 6, 3, seed=11))
    c = _snapshot(make_synthetic(tmp_path / "c", 6, 3, seed=12))
    assert a == b
    assert set(a) == set(c)
    ann = "annotations/captions_train.json"
    assert json.loads(a[ann])["annotations"] != json.loads(c[ann])["annotations"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".jpg")) >= 8


def test_rejects_bad_counts(tmp_path: Path):
    with pytest.raises(ValueError, match="num_train"):
        make_synthetic(tmp_path, -1, 2)
    with pytest.raises(ValueError, match="too small"):
        render_scene(random.Random(0), 64, 48)


# ---------------------------------------------------------------------------------------------------
# Facts and captions


def test_facts_cover_vocabulary_and_object_colour_differs_from_background():
    seen: dict[str, set] = {f: set() for f in ("count", "size", "colour", "shape", "position", "background")}
    for _, facts, _ in _scenes(300):
        assert facts.colour != facts.background
        assert math.dist(COLOURS[facts.colour], BACKGROUNDS[facts.background]) >= 90
        for f in seen:
            seen[f].add(getattr(facts, f))
    assert seen["count"] == set(COUNT_WORDS) == {1, 2, 3}
    assert seen["size"] == set(SIZES)
    assert seen["colour"] == set(COLOURS)
    assert seen["shape"] == set(SHAPES)
    assert seen["position"] == set(POSITIONS)
    assert seen["background"] == set(BACKGROUNDS)


def _check_caption(caption: str, facts: SceneFacts) -> None:
    words = _words(caption)
    assert caption == caption.strip() and "  " not in caption and caption == caption.lower()
    # count
    if facts.count == 1:
        assert "a" in words or "one" in words
        assert "two" not in words and "three" not in words
    else:
        assert {"one", "two", "three"} & set(words) == {COUNT_WORDS[facts.count][0]}
    # size
    assert set(SIZES[facts.size]) & set(words)
    other_size = next(s for s in SIZES if s != facts.size)
    assert not set(SIZES[other_size]) & set(words)
    # colour: the object colour and the background colour, and no other colour word
    colour_words = (set(COLOURS) | set(BACKGROUNDS)) & set(words)
    assert colour_words == {facts.colour, facts.background}
    assert re.search(rf"\b{facts.colour} (circle|square|triangle|star|diamond)s?\b", caption)
    # shape, singular or plural as the count demands
    shape_word = SHAPES[facts.shape] if facts.count > 1 else facts.shape
    assert shape_word in words
    assert not ({*SHAPES, *SHAPES.values()} - {shape_word}) & set(words)
    # position
    assert any(phrase in caption for phrase in POSITIONS[facts.position])
    for other, phrases in POSITIONS.items():
        if other != facts.position:
            assert not any(re.search(rf"\b{p}\b", caption) for p in phrases), (caption, other)
    # background named as such
    assert re.search(rf"\b{facts.background} (background|image)\b|background is {facts.background}$", caption)
    # grammar: articles and agreement
    for i, w in enumerate(words[:-1]):
        if w == "a":
            assert words[i + 1][0] not in "aeiou", caption
        if w == "an":
            assert words[i + 1][0] in "aeiou", caption
    verbs = set(_words(caption.replace(f"the background is {facts.background}", "")))
    assert not verbs & ({"is", "sits"} if facts.count > 1 else {"are", "sit"}), caption


def test_captions_state_all_facts_grammatically():
    for _, facts, rng in _scenes(300, seed=5):
        caps = scene_captions(facts, rng)
        assert len(caps) == 5 and len(set(caps)) == 5
        for c in caps:
            _check_caption(c, facts)


def test_every_template_variant_is_valid_for_every_fact_combination():
    # Every count, size, position and background; colours and shapes cycle so each one appears often.
    combos = [(c, s, p, b) for c in COUNT_WORDS for s in SIZES for p in POSITIONS for b in BACKGROUNDS]
    colours, shapes = sorted(COLOURS), sorted(SHAPES)
    for i, (count, size, position, background) in enumerate(combos):
        colour = [c for c in colours if c != background][i % (len(colours) - 1)]
        facts = SceneFacts(count, size, colour, shapes[i % len(shapes)], position, background)
        variants = caption_variants(facts)
        assert len(variants) == len(TEMPLATES)
        flat = [c for v in variants for c in v]
        assert len(flat) == len(set(flat)) >= 5
        for c in flat:
            _check_caption(c, facts)


def test_captions_use_a_small_vocabulary_and_varied_templates():
    vocab: set[str] = set()
    starts: set[str] = set()
    for _, facts, rng in _scenes(300, seed=9):
        for c in scene_captions(facts, rng):
            vocab.update(_words(c))
            starts.add(" ".join(_words(c)[:2]))
    assert len(vocab) <= 60, sorted(vocab)
    assert len(starts) >= 8


def test_scene_captions_count_and_determinism():
    facts = SceneFacts(2, "large", "red", "circle", "left", "white")
    a = scene_captions(facts, random.Random(1), num_captions=5)
    assert a == scene_captions(facts, random.Random(1), num_captions=5)
    total = sum(len(v) for v in caption_variants(facts))
    many = scene_captions(facts, random.Random(1), num_captions=total)
    assert len(set(many)) == total
    # While templates last, every caption comes from a different template.
    template_of = {c: t for t, v in enumerate(caption_variants(facts)) for c in v}
    assert len({template_of[c] for c in scene_captions(facts, random.Random(2), len(TEMPLATES))}) == len(TEMPLATES)
    with pytest.raises(ValueError, match="num_captions"):
        scene_captions(facts, random.Random(1), num_captions=total + 1)
    with pytest.raises(ValueError, match="num_captions"):
        scene_captions(facts, random.Random(1), num_captions=0)


# ---------------------------------------------------------------------------------------------------
# Rendered pixels


def _object_mask(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(mask of object pixels, estimated background RGB); objects never touch the border."""
    arr = np.asarray(img, dtype=np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    return np.linalg.norm(arr - bg, axis=2) > 30, bg


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a boolean mask."""
    seen = np.zeros_like(mask)
    sizes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, n = deque([(y, x)]), 0
        while queue:
            cy, cx = queue.popleft()
            n += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        sizes.append(n)
    return sizes


_CENTROID_ZONE = {  # (x range, y range) of the object pixels' centroid, as fractions of the image
    "left": ((0.0, 0.35), (0.35, 0.65)),
    "middle": ((0.35, 0.65), (0.35, 0.65)),
    "right": ((0.65, 1.0), (0.35, 0.65)),
    "top": ((0.35, 0.65), (0.0, 0.35)),
    "bottom": ((0.35, 0.65), (0.65, 1.0)),
}


@pytest.mark.parametrize("size", [(320, 240), (224, 224), (640, 480), (160, 120)])
def test_rendered_objects_match_their_facts(size):
    width, height = size
    areas: dict[tuple[str, str], list[float]] = {}
    for img, facts, _ in _scenes(80 if size == (320, 240) else 25, seed=width, width=width, height=height):
        assert img.mode == "RGB" and img.size == (width, height)
        mask, bg = _object_mask(img)
        # background is the named colour (within the per-image shift)
        assert np.abs(bg - np.array(BACKGROUNDS[facts.background])).max() <= 12
        # every object fully inside the image: a 2px frame is background only
        assert not mask[:2].any() and not mask[-2:].any() and not mask[:, :2].any() and not mask[:, -2:].any()
        # object pixels carry the named colour
        mean = np.asarray(img, dtype=np.float32)[mask].mean(axis=0)
        nearest = min(COLOURS, key=lambda c: math.dist(COLOURS[c], mean))
        assert nearest == facts.colour, (facts, mean)
        # count: separate, non-overlapping objects
        parts = _components(mask)
        assert sum(n >= 0.1 * max(parts) for n in parts) == facts.count, (facts, parts)
        # position: centroid in the stated region, nothing in the opposite third
        ys, xs = np.nonzero(mask)
        (x0, x1), (y0, y1) = _CENTROID_ZONE[facts.position]
        assert x0 <= xs.mean() / width <= x1 and y0 <= ys.mean() / height <= y1, (facts, xs.mean(), ys.mean())
        opposite = {
            "left": mask[:, 2 * width // 3 :],
            "right": mask[:, : width // 3],
            "top": mask[2 * height // 3 :],
            "bottom": mask[: height // 3],
        }.get(facts.position)
        if opposite is not None:
            assert not opposite.any(), facts
        areas.setdefault((facts.shape, facts.size), []).append(mask.sum() / facts.count / (width * height))
    # size: every small object is clearly smaller than every large one of the same shape
    for shape in SHAPES:
        small, large = areas.get((shape, "small")), areas.get((shape, "large"))
        if small and large:
            assert max(small) * 2 < min(large), (shape, max(small), min(large))


def test_jpeg_on_disk_keeps_the_scene(dataset: SyntheticPaths):
    doc = json.loads(dataset.train_captions.read_text())
    for im in doc["images"]:
        with Image.open(dataset.train_images / im["file_name"]) as img:
            mask, _ = _object_mask(img.convert("RGB"))
        assert 0 < mask.sum() < 0.5 * W * H
        assert not mask[:2].any() and not mask[-2:].any() and not mask[:, :2].any() and not mask[:, -2:].any()
