import math
import random

import pytest
from hypothesis import given, settings, strategies as st

from captioner.metrics import bleu_scores, per_image_bleu
from captioner.text import caption_words, normalize_caption


def test_normalisation_lowercases_and_strips_punctuation():
    assert normalize_caption("A dog, running.  Fast!") == "a dog running fast"
    assert caption_words("The cat's hat.") == ["the", "cat", "s", "hat"]


def test_normalisation_keeps_combining_marks_inside_their_words():
    """Vowel signs and viramas (category M, which regex's \\w does not match) are letters of Hindi and Tamil
    words, and a decomposed accent scores like a composed one."""
    assert caption_words("एक कुत्ता, घास पर।") == ["एक", "कुत्ता", "घास", "पर"]
    assert caption_words("ஒரு நாய் ஓடுகிறது.") == ["ஒரு", "நாய்", "ஓடுகிறது"]
    assert normalize_caption("Cafe\u0301 au lait") == normalize_caption("Caf\u00e9 au lait")
    assert normalize_caption("Cafe\u0301 au lait") == "caf\u00e9 au lait"
    assert bleu_scores({1: ["un cafe\u0301 noir"]}, {1: "un caf\u00e9 noir"})["Bleu_1"] == pytest.approx(1.0)


def test_perfect_match_scores_one():
    refs = {1: ["a red circle on the left"], 2: ["two blue squares in the middle"]}
    scores = bleu_scores(refs, {1: "A red circle on the left.", 2: "two blue squares in the middle"})
    assert all(abs(v - 1.0) < 1e-9 for v in scores.values())  # coco-caption's smoothing shaves off ~1e-10


def test_hand_computed_bleu_with_brevity_penalty():
    # hypothesis 'a red circle' (3 words) vs reference 'a red circle on the left' (6 words)
    # p1 = 3/3, p2 = 2/2, p3 = 1/1; BP = exp(1 - 6/3) = e^-1.
    # No 4-grams in the hypothesis: coco-caption smooths p4 = (0 + 1e-15) / (0 + 1e-9) = 1e-6, not 0,
    # so BLEU-4 = (1 * 1 * 1 * 1e-6) ** (1/4) * e^-1 (nltk's corpus_bleu would say 0).
    scores = bleu_scores({1: ["a red circle on the left"]}, {1: "a red circle"})
    bp = math.exp(-1)
    assert scores["Bleu_1"] == pytest.approx(bp)
    assert scores["Bleu_2"] == pytest.approx(bp)
    assert scores["Bleu_3"] == pytest.approx(bp)
    assert scores["Bleu_4"] == pytest.approx(1e-6 ** 0.25 * bp)


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


# --- parity with coco-caption (pycocoevalcap) and nltk ------------------------------------------------------

WORDS = "a the red blue circle square two three on left right of in middle big small".split()


def _coco_bleu(references, hypotheses):
    """pycocoevalcap's Bleu scorer on the same normalised words (joined by spaces, which it splits on)."""
    bleu = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pip install captioner[coco-eval]")
    gts = {i: [" ".join(caption_words(r)) for r in refs] for i, refs in references.items()}
    res = {i: [" ".join(caption_words(h))] for i, h in hypotheses.items()}
    corpus, per_image = bleu.Bleu(4).compute_score(gts, res, verbose=0)
    return corpus, per_image


def _sentence(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _corpus(seed):
    """A corpus with every awkward case mixed in: empty hypotheses, hypotheses shorter or longer than every
    reference, a single reference, repeated words (clipping), and one-image corpora."""
    rng = random.Random(seed)
    images = rng.choice([1, 1, 2, 5, 20])
    references, hypotheses = {}, {}
    for i in range(images):
        references[i] = [_sentence(rng, 1, 12) for _ in range(rng.randint(1, 5))]
        kind = rng.random()
        if kind < 0.1:
            hypotheses[i] = ""
        elif kind < 0.3:
            hypotheses[i] = _sentence(rng, 1, 3)  # usually shorter than every reference
        elif kind < 0.5:
            hypotheses[i] = _sentence(rng, 13, 20)  # longer than every reference
        elif kind < 0.6:
            hypotheses[i] = rng.choice(references[i])  # exact match
        else:
            hypotheses[i] = _sentence(rng, 1, 12)
    return references, hypotheses


@pytest.mark.parametrize("seed", range(300))
def test_bleu_equals_coco_caption_on_generated_corpora(seed):
    references, hypotheses = _corpus(seed)
    ours = bleu_scores(references, hypotheses)
    corpus, per_image = _coco_bleu(references, hypotheses)
    for n in range(4):
        assert ours[f"Bleu_{n + 1}"] == pytest.approx(corpus[n], abs=1e-6, rel=0)
    ours_per_image = per_image_bleu(references, hypotheses)
    for n in range(4):
        for position, image_id in enumerate(hypotheses):
            assert ours_per_image[image_id][f"Bleu_{n + 1}"] == pytest.approx(per_image[n][position], abs=1e-6)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(WORDS), max_size=15),
                          st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=15), min_size=1, max_size=4)),
                min_size=1, max_size=8))
def test_bleu_equals_coco_caption_on_arbitrary_corpora(images):
    references = {i: [" ".join(r) for r in refs] for i, (_, refs) in enumerate(images)}
    hypotheses = {i: " ".join(hyp) for i, (hyp, _) in enumerate(images)}
    ours = bleu_scores(references, hypotheses)
    corpus, _ = _coco_bleu(references, hypotheses)
    assert [ours[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(corpus, abs=1e-6, rel=0)


@pytest.mark.parametrize("seed", range(50))
def test_bleu_equals_nltk_corpus_bleu_on_ordinary_corpora(seed):
    """Where every hypothesis has 4+ words and every order has a match, nltk's corpus_bleu agrees exactly."""
    from nltk.translate.bleu_score import corpus_bleu

    rng = random.Random(1000 + seed)
    references = {i: [_sentence(rng, 4, 12) for _ in range(rng.randint(1, 5))] for i in range(rng.randint(1, 10))}
    hypotheses = {i: (rng.choice(refs) if rng.random() < 0.3 else _sentence(rng, 4, 14))
                  for i, refs in references.items()}
    hypotheses[0] = references[0][0]  # guarantees a match at every order
    refs = [[caption_words(r) for r in references[i]] for i in hypotheses]
    hyps = [caption_words(hypotheses[i]) for i in hypotheses]
    ours = bleu_scores(references, hypotheses)
    for n in range(1, 5):
        weights = tuple([1.0 / n] * n)
        assert ours[f"Bleu_{n}"] == pytest.approx(corpus_bleu(refs, hyps, weights=weights), abs=1e-6, rel=0)
