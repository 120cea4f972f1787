"""BLEU-1..4 exactly as the coco-caption toolkit (pycocoevalcap's `Bleu` scorer) computes it.

Corpus level: clipped n-gram matches and hypothesis n-gram counts are summed over all images (every reference
of an image counts), the brevity penalty compares the summed hypothesis length with the summed closest
reference lengths (ties go to the shorter reference), and BLEU-n is the geometric mean of the precisions of
orders 1..n (uniform weights: BLEU-2 = (1/2, 1/2), not BLEU-4's weights).

Why not call nltk's `corpus_bleu` directly: on ordinary corpora the two agree (the tests check it), but nltk
counts a hypothesis too short to have any n-gram as one n-gram guess, and returns 0 where an order has no
match, while coco-caption counts no guess and smooths every precision as (matches + 1e-15) / (guesses + 1e-9).
Published numbers come from coco-caption, so this module follows it, counting n-grams with nltk.

References and hypotheses go through the same `caption_words` normalisation (lowercase, no punctuation).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

from nltk.util import ngrams

from .text import caption_words

MAX_ORDER = 4
_TINY, _SMALL = 1e-15, 1e-9  # coco-caption's smoothing constants


@dataclass
class BleuStats:
    """Sufficient statistics of BLEU for one image or a whole corpus (they add up)."""

    hyp_len: int = 0
    ref_len: int = 0  # closest reference length (summed over images for a corpus)
    guesses: list[int] = field(default_factory=lambda: [0] * MAX_ORDER)  # hypothesis n-grams per order
    matches: list[int] = field(default_factory=lambda: [0] * MAX_ORDER)  # clipped matches per order

    def __iadd__(self, other: "BleuStats") -> "BleuStats":
        self.hyp_len += other.hyp_len
        self.ref_len += other.ref_len
        self.guesses = [a + b for a, b in zip(self.guesses, other.guesses)]
        self.matches = [a + b for a, b in zip(self.matches, other.matches)]
        return self

    def scores(self) -> dict[str, float]:
        """BLEU-1..4 from the statistics, with coco-caption's smoothing and brevity penalty."""
        ratio = (self.hyp_len + _TINY) / (self.ref_len + _SMALL)
        penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
        out, product = {}, 1.0
        for k in range(MAX_ORDER):
            product *= (self.matches[k] + _TINY) / (self.guesses[k] + _SMALL)
            out[f"Bleu_{k + 1}"] = product ** (1.0 / (k + 1)) * penalty
        return out


def image_stats(hypothesis: Sequence[str], references: Sequence[Sequence[str]]) -> BleuStats:
    """Words of one hypothesis and its references -> BLEU statistics."""
    if not references:
        raise ValueError("an image needs at least one reference")
    stats = BleuStats(hyp_len=len(hypothesis))
    stats.ref_len = min((len(r) for r in references), key=lambda n: (abs(n - len(hypothesis)), n))  # closest
    for k in range(1, MAX_ORDER + 1):
        hyp_counts = Counter(ngrams(hypothesis, k))
        max_ref = Counter()
        for ref in references:
            max_ref |= Counter(ngrams(ref, k))  # union = element-wise maximum count
        stats.guesses[k - 1] = sum(hyp_counts.values())
        stats.matches[k - 1] = sum(min(count, max_ref[gram]) for gram, count in hyp_counts.items())
    return stats


def _checked_ids(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]) -> list:
    ids = list(hypotheses)
    if not ids:
        raise ValueError("no hypotheses to score")
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} hypotheses have no references, e.g. image id {missing[0]!r}")
    return ids


def bleu_from_words(references: Mapping[Hashable, Sequence[Sequence[str]]],
                    hypotheses: Mapping[Hashable, Sequence[str]]) -> tuple[dict[str, float], dict[Hashable, dict]]:
    """Already tokenised words: image id -> reference word lists / hypothesis words.
    -> (corpus BLEU-1..4, per-image BLEU-1..4)."""
    corpus, per_image = BleuStats(), {}
    for i in _checked_ids(references, hypotheses):
        stats = image_stats(hypotheses[i], references[i])
        per_image[i] = stats.scores()
        corpus += stats
    return corpus.scores(), per_image


def normalised_words(references, hypotheses):
    """Raw captions -> (reference word lists, hypothesis words) per image id, normalised as BLEU sees them."""
    ids = _checked_ids(references, hypotheses)
    return ({i: [caption_words(r) for r in references[i]] for i in ids},
            {i: caption_words(hypotheses[i]) for i in ids})


def bleu_scores(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]) -> dict[str, float]:
    """references: image id -> reference captions; hypotheses: image id -> one caption (raw text).
    Scores the images present in `hypotheses`; each must have at least one reference."""
    return bleu_from_words(*normalised_words(references, hypotheses))[0]


def per_image_bleu(references: Mapping[Hashable, Sequence[str]],
                   hypotheses: Mapping[Hashable, str]) -> dict[Hashable, dict[str, float]]:
    """BLEU-1..4 of each image on its own (coco-caption's per-image scores), for error analysis."""
    return bleu_from_words(*normalised_words(references, hypotheses))[1]
