"""BLEU-1..4 with nltk's corpus_bleu on normalised words (coco-caption conventions).

Corpus-level, every reference of an image counts, brevity penalty against the closest reference length.
BLEU-n uses uniform weights over orders 1..n (BLEU-2 = (1/2, 1/2), not (1, 1) or BLEU-4's weights).
References and hypotheses go through the same `caption_words` normalisation (lowercase, no punctuation).
"""

from __future__ import annotations

import warnings
from typing import Hashable, Mapping, Sequence

from nltk.translate.bleu_score import corpus_bleu

from .text import caption_words

BLEU_WEIGHTS = {
    "Bleu_1": (1.0,),
    "Bleu_2": (0.5, 0.5),
    "Bleu_3": (1 / 3, 1 / 3, 1 / 3),
    "Bleu_4": (0.25, 0.25, 0.25, 0.25),
}


def bleu_scores(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]) -> dict[str, float]:
    """references: image id -> reference captions; hypotheses: image id -> one caption (raw text).
    Scores the images present in `hypotheses`; each must have at least one reference."""
    ids = list(hypotheses)
    if not ids:
        raise ValueError("no hypotheses to score")
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} hypotheses have no references, e.g. image id {missing[0]!r}")
    refs = [[caption_words(r) for r in references[i]] for i in ids]
    hyps = [caption_words(hypotheses[i]) for i in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on zero n-gram matches; a 0 score is the honest answer
        return {name: float(corpus_bleu(refs, hyps, weights=w)) for name, w in BLEU_WEIGHTS.items()}
