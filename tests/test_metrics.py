import math

import pytest

from captioner.metrics import bleu_scores
from captioner.text import caption_words, normalize_caption


def test_normalisation_lowercases_and_strips_punctuation():
    assert normalize_caption("A dog, running.  Fast!") == "a dog running fast"
    assert caption_words("The cat's hat.") == ["the", "cat", "s", "hat"]


def test_perfect_match_scores_one():
    refs = {1: ["a red circle on the left"], 2: ["two blue squares in the middle"]}
    scores = bleu_scores(refs, {1: "A red circle on the left.", 2: "two blue squares in the middle"})
    assert all(abs(v - 1.0) < 1e-12 for v in scores.values())


def test_hand_computed_bleu_with_brevity_penalty():
    # hypothesis 'a red circle' (3 words) vs reference 'a red circle on the left' (6 words)
    # p1 = 3/3, p2 = 2/2, p3 = 1/1; no 4-grams in the hypothesis -> BLEU-4 = 0
    # BP = exp(1 - 6/3) = e^-1
    scores = bleu_scores({1: ["a red circle on the left"]}, {1: "a red circle"})
    bp = math.exp(-1)
    assert scores["Bleu_1"] == pytest.approx(bp)
    assert scores["Bleu_2"] == pytest.approx(bp)
    assert scores["Bleu_3"] == pytest.approx(bp)
    assert scores["Bleu_4"] == pytest.approx(0.0)


def test_hand_computed_corpus_bleu_uses_all_references_and_closest_length():
    # hyp: 'the cat sat on a mat' (6); refs: 'the cat sat on the mat' (6), 'a cat is on a mat' (6)
    # unigram clipped matches: the1 cat1 sat1 on1 a1 mat1 = 6/6
    # bigrams: the cat, cat sat, sat on (ref1), on a, a mat (ref2) = 5/5
    # trigrams: the cat sat, cat sat on (ref1), on a mat (ref2); 'sat on a' no = 3/4
    # 4-grams: 'the cat sat on' yes; 'cat sat on a' no; 'sat on a mat' no = 1/3
    scores = bleu_scores({7: ["the cat sat on the mat", "a cat is on a mat"]}, {7: "the cat sat on a mat"})
    assert scores["Bleu_1"] == pytest.approx(1.0)
    assert scores["Bleu_2"] == pytest.approx(1.0)
    assert scores["Bleu_3"] == pytest.approx((3 / 4) ** (1 / 3))
    assert scores["Bleu_4"] == pytest.approx((1 * 1 * 3 / 4 * 1 / 3) ** (1 / 4))


def test_empty_hypothesis_scores_zero_and_missing_references_fail():
    assert bleu_scores({1: ["a red circle"]}, {1: ""})["Bleu_1"] == 0.0
    with pytest.raises(ValueError, match="no references"):
        bleu_scores({1: ["x"]}, {2: "x"})
