"""Scores for a set of captions: BLEU-1..4 always, the coco-caption metrics on request."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

from .metrics import bleu_scores, per_image_bleu

METRIC_SETS = ("bleu", "all")


def score_captions(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
                   metrics: str = "bleu") -> tuple[dict[str, float], dict[Hashable, dict[str, float]], dict[str, str]]:
    """-> (corpus scores, per-image scores, skipped metric -> reason). metrics: "bleu" | "all" (adds CIDEr-D,
    ROUGE-L and METEOR from coco-caption; see coco_eval)."""
    if metrics not in METRIC_SETS:
        raise ValueError(f"metrics must be one of {', '.join(METRIC_SETS)}, got {metrics!r}")
    corpus = bleu_scores(references, hypotheses)
    per_image = per_image_bleu(references, hypotheses)
    skipped: dict[str, str] = {}
    if metrics == "all":
        from .coco_eval import coco_caption_metrics

        extra, extra_per_image, skipped = coco_caption_metrics(references, hypotheses)
        corpus.update(extra)
        for image_id, scores in extra_per_image.items():
            per_image[image_id].update(scores)
    return corpus, per_image, skipped
