"""CIDEr-D of single captions against a fixed corpus, computed as coco-caption's scorer computes it, for rewards.

coco_eval.py scores a whole evaluation with pycocoevalcap, whose document frequencies come from the references
being scored. Self-critical training needs the score of one sampled caption at a time, thousands per second,
against document frequencies fixed once (those of the training captions), which that scorer cannot give. This
is the same arithmetic, in-process: n-grams of orders 1-4, tf-idf vectors with idf = log(images) - log(df) (an
n-gram no reference uses counts as df 1), per-order cosine similarity with the hypothesis' weights clipped at the
reference's, a Gaussian penalty on the length difference (sigma 6; lengths counted as the scorer counts them, in
bigrams), averaged over orders and references, times 10.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

MAX_ORDER = 4
SIGMA = 6.0

NgramVector = tuple[list[dict[tuple[str, ...], float]], list[float], int]  # per order: weights, norms; length


def ngram_counts(words: Sequence[str]) -> Counter:
    """Every n-gram of orders 1..4 in `words` with its count."""
    return Counter(tuple(words[i : i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(words) - n + 1))


class CiderD:
    """CIDEr-D with document frequencies from `corpus`: per image, the word lists of its reference captions."""

    def __init__(self, corpus: Sequence[Sequence[Sequence[str]]]):
        if not corpus:
            raise ValueError("CIDEr-D needs the reference captions of at least one image")
        self.document_frequency: Counter = Counter()
        for references in corpus:
            self.document_frequency.update({gram for ref in references for gram in ngram_counts(ref)})
        self.log_images = math.log(len(corpus))

    def vector(self, words: Sequence[str]) -> NgramVector:
        """-> (per order the n-grams' tf-idf weights, per order the vector norms, length in bigrams)."""
        weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_ORDER)]
        norms = [0.0] * MAX_ORDER
        length = 0
        for gram, count in ngram_counts(words).items():
            order = len(gram) - 1
            weight = count * (self.log_images - math.log(max(1.0, self.document_frequency[gram])))
            weights[order][gram] = weight
            norms[order] += weight * weight
            if order == 1:
                length += count
        return weights, [math.sqrt(n) for n in norms], length

    def score(self, hypothesis: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """CIDEr-D of one caption's words against its image's reference word lists (0 for an empty caption)."""
        if not references:
            raise ValueError("an image needs at least one reference")
        return self.score_vectors(self.vector(hypothesis), [self.vector(r) for r in references])

    def score_vectors(self, hypothesis: NgramVector, references: Sequence[NgramVector]) -> float:
        """As score, from vectors already made (a caller scoring many captions per image makes the references' once)."""
        weights, norms, length = hypothesis
        total = 0.0
        for ref_weights, ref_norms, ref_length in references:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
            for order in range(MAX_ORDER):
                overlap = sum(min(w, ref_weights[order].get(gram, 0.0)) * ref_weights[order].get(gram, 0.0)
                              for gram, w in weights[order].items())
                if norms[order] and ref_norms[order]:
                    overlap /= norms[order] * ref_norms[order]
                total += overlap * penalty
        return 10.0 * total / (MAX_ORDER * len(references))
