"""Scores for a set of captions: BLEU-1..4 always, the coco-caption metrics on request."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

from .metrics import bleu_from_words, normalised_words

METRIC_SETS = ("bleu", "all")


def score_captions(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
                   metrics: str = "bleu") -> tuple[dict, dict[Hashable, dict[str, float]], dict[str, str]]:
    """-> (corpus scores, per-image scores, skipped metric -> reason).

    metrics="bleu": BLEU-1..4 on the project's normalised words. metrics="all": every metric, BLEU included, on
    coco-caption's PTB tokenisation (so the numbers equal COCOEvalCap's), plus CIDEr-D, ROUGE-L and METEOR;
    the corpus scores then also say which tokenisation was used ("tokenization")."""
    if metrics not in METRIC_SETS:
        raise ValueError(f"metrics must be one of {', '.join(METRIC_SETS)}, got {metrics!r}")
    if metrics == "bleu":
        corpus, per_image = bleu_from_words(*normalised_words(references, hypotheses))
        return corpus, per_image, {}
    from .coco_eval import coco_caption_metrics, tokenize_like_coco_caption

    gts, res, tokenization = tokenize_like_coco_caption(references, hypotheses)
    corpus, per_image = bleu_from_words({i: [r.split() for r in refs] for i, refs in gts.items()},
                                        {i: res[i][0].split() for i in res})
    extra, extra_per_image, skipped = coco_caption_metrics(gts, res)
    corpus.update(extra)
    for image_id, scores in extra_per_image.items():
        per_image[image_id].update(scores)
    return {**corpus, "tokenization": tokenization}, per_image, skipped
