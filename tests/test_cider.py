"""CIDEr-D of single captions against fixed document frequencies: the same scores as coco-caption's scorer."""

from __future__ import annotations

import random

import pytest

from captioner.cider import CiderD


def _corpus(seed: int = 0):
    rng = random.Random(seed)
    words = "a man dog red blue ball on the left right runs in grass field water".split()
    corpus = [[[rng.choice(words) for _ in range(rng.randint(3, 10))] for _ in range(5)] for _ in range(30)]
    hypotheses = [[rng.choice(words) for _ in range(rng.randint(0, 9))] for _ in range(30)]
    hypotheses[0] = list(corpus[0][0])  # one caption equal to a reference
    return corpus, hypotheses


def test_scores_match_coco_captions_cider_d_with_the_same_document_frequencies():
    cider_scorer = pytest.importorskip("pycocoevalcap.cider.cider_scorer", reason="pycocoevalcap not installed")
    corpus, hypotheses = _corpus()
    theirs = cider_scorer.CiderScorer(n=4, sigma=6.0)
    for words, references in zip(hypotheses, corpus):
        theirs += (" ".join(words), [" ".join(r) for r in references])
    _, expected = theirs.compute_score()  # document frequencies from these same references
    ours = CiderD(corpus)
    assert [ours.score(words, refs) for words, refs in zip(hypotheses, corpus)] == pytest.approx(list(expected),
                                                                                                abs=1e-12)


def test_a_caption_scores_higher_the_more_of_its_references_rare_ngrams_it_shares():
    corpus, _ = _corpus()
    cider = CiderD(corpus)
    references = corpus[0]
    assert cider.score(references[0], references) > cider.score(references[0][:2], references) > 0.0
    assert cider.score([], references) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        CiderD([])
