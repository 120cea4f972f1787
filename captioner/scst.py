"""Self-critical sequence training (SCST): after cross-entropy training, fine-tune on the metric itself.

Cross-entropy teaches the decoder to predict the next word of a human caption given the human words before it;
at test time it continues its own words and is scored by BLEU. SCST (Rennie et al., 2017) closes that gap with
REINFORCE: for each image, sample K captions from the current model, score each against the image's references,
and raise the log-probability of the samples that scored above the others while lowering the rest. The baseline
a sample is compared with is the mean reward of the image's other K - 1 samples (Luo, 2020), which needs no extra
greedy decoding and is unbiased.

The policy-gradient loss is a cross-entropy on the sampled captions with one signed weight per caption, its
advantage: -sum_k A_k log p(sample_k) = sum_k A_k CE(sample_k). So an SCST step is an ordinary teacher-forced
training step (engine.train_one_epoch) on a batch whose captions are the samples and whose `row_weights` are the
advantages: the checkpointing, resuming, multi-process and non-finite handling of cross-entropy training apply
unchanged. `SelfCriticalBatches` turns a training loader's batches into such batches, sampling from the model as
it is when the training loop asks for the batch.

The reward (`--scst-reward`) is the caption's sentence BLEU-4 as the evaluation computes it (`bleu`, default:
coco-caption's clipped n-gram counts and closest-reference brevity penalty, on the same normalised words), with
precisions of orders 2-4 add-one smoothed (Lin and Och, 2004): unsmoothed, most captions of a model at corpus
BLEU-4 0.15 have no 4-gram match and would all score 0, leaving nothing to rank them by. Or it is the caption's
CIDEr-D (`cider`, cider.py) with document frequencies from the training captions, the reward most SCST work uses.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .data.collate import Batch, teacher_forcing_tensors
from .data.sampling import mix_seed
from .decoding import DecodeOptions
from .cider import CiderD
from .engine import EpochTotals, decode_cached
from .errors import CaptionerError
from .metrics import MAX_ORDER, image_stats
from .text import Tokenizer, caption_words

_SAMPLING_STREAM = 2  # keeps the SCST samples' random stream apart from the data's (see data/sampling.py)
REWARDS = ("bleu", "cider")

# reward(samples' words, the references' words) -> one reward per sample, all for one image
Reward = Callable[[Sequence[Sequence[str]], Sequence[Sequence[str]]], list[float]]


def sentence_reward(hypothesis: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Smoothed sentence BLEU-4 of one caption's words against its image's reference word lists, in [0, 1].

    Unigram precision unsmoothed (a caption sharing no word with the references scores 0), orders 2-4 as
    (matches + 1) / (guesses + 1), times the brevity penalty against the closest reference length."""
    if not hypothesis:
        return 0.0
    stats = image_stats(hypothesis, references)
    if stats.matches[0] == 0:
        return 0.0
    log_precision = math.log(stats.matches[0] / stats.guesses[0])
    for order in range(1, MAX_ORDER):
        log_precision += math.log((stats.matches[order] + 1) / (stats.guesses[order] + 1))
    brevity = min(0.0, 1.0 - stats.ref_len / stats.hyp_len)  # log of the brevity penalty
    return math.exp(log_precision / MAX_ORDER + brevity)


def make_reward(kind: str, training_references: Sequence[Sequence[str]] = ()) -> Reward:
    """The reward `kind` names: "bleu" (sentence_reward) or "cider" (CIDEr-D with document frequencies from
    `training_references`, each image's reference captions as raw text)."""
    if kind == "bleu":
        return lambda samples, references: [sentence_reward(words, references) for words in samples]
    if kind != "cider":
        raise ValueError(f"unknown self-critical reward {kind!r}; choose one of {', '.join(REWARDS)}")
    cider = CiderD([[caption_words(c) for c in captions] for captions in training_references])

    def cider_reward(samples, references):
        reference_vectors = [cider.vector(words) for words in references]  # once for the image's K samples
        return [cider.score_vectors(cider.vector(words), reference_vectors) for words in samples]
    return cider_reward


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(B, K) rewards of K >= 2 samples per image -> (B, K): each reward minus the mean of the image's other K - 1
    samples. Every image's advantages sum to zero, so a batch where all samples score alike teaches nothing."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"self-critical training needs at least 2 samples per image, got {k}")
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - others_mean


class SelfCriticalBatches:
    """A training loader's batches with their captions replaced by `samples` captions per image, sampled from
    `model` when the batch is asked for, and `row_weights` set to the samples' advantages.

    The draws are seeded by (run seed, epoch, the batch's first dataset index), so a resumed epoch samples what
    the uninterrupted one did. Sampling runs in eval mode (no dropout, BatchNorm statistics untouched) under
    inference mode; the training step then recomputes the samples' log-probabilities with gradients. Each batch's
    rewards are added to `totals` (reward_sum, rewards), so an epoch reports its mean sampled reward.
    """

    def __init__(self, loader: Iterable[Batch], model, tokenizer: Tokenizer, device: torch.device, samples: int,
                 max_len: int, seed: int, epoch: int, totals: EpochTotals, feature_store=None,
                 reward: Reward | None = None):
        self.loader, self.model, self.tokenizer, self.device = loader, model, tokenizer, device
        self.samples, self.seed, self.epoch, self.totals = samples, seed, epoch, totals
        self.feature_store = feature_store
        self.reward = reward or make_reward("bleu")
        # Generated tokens, eos included: bos + the rest must fit the decoder's max_len positions
        self.options = DecodeOptions(sample=True, num_return=samples, max_len=max_len - 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield self.sampled(batch) if batch.images.shape[0] else batch

    def sampled(self, batch: Batch) -> Batch:
        seed = mix_seed(self.seed, self.epoch, batch.indices[0], _SAMPLING_STREAM)
        was_training = self.model.training
        self.model.eval()
        try:
            hypotheses = decode_cached(self.model, batch, self.device, replace(self.options, seed=seed),
                                       self.feature_store)  # per image, K samples
        finally:
            self.model.train(was_training)
        samples = [h.tokens for per_image in hypotheses for h in per_image]  # (B * K) lists, image-major
        references = [[caption_words(c) for c in captions] for captions in batch.captions]  # as BLEU sees them
        rewards = torch.tensor([self.reward([caption_words(self.tokenizer.decode(h.tokens)) for h in per_image], refs)
                                for per_image, refs in zip(hypotheses, references)], dtype=torch.float32)  # (B, K)
        self.totals.reward_sum += float(rewards.sum())
        self.totals.rewards += rewards.numel()
        # A sample as long as the limit was cut off there: it gets no eos target
        tokens_in, targets = teacher_forcing_tensors(samples, [len(s) < self.options.max_len for s in samples])
        owners = torch.arange(len(hypotheses)).repeat_interleave(self.samples)  # (B * K,)
        return replace(batch, tokens_in=tokens_in, targets=targets, caption_image_index=owners,
                       row_weights=leave_one_out_advantages(rewards).flatten())


def check_scst_settings(train_cfg) -> None:
    """Refuse self-critical settings that cannot train, naming the flag."""
    if train_cfg.scst_epochs < 0:
        raise CaptionerError(f"--scst-epochs must be 0 (off) or more, got {train_cfg.scst_epochs}")
    if train_cfg.scst_epochs and train_cfg.scst_lr <= 0:
        raise CaptionerError(f"--scst-lr must be positive, got {train_cfg.scst_lr}")
    if train_cfg.scst_reward not in REWARDS:
        raise CaptionerError(f"--scst-reward must be one of {', '.join(REWARDS)}, got {train_cfg.scst_reward!r}")
    if train_cfg.scst_start not in ("best", "last"):
        raise CaptionerError(f"--scst-start must be best or last, got {train_cfg.scst_start!r}")
    if train_cfg.scst_epochs and train_cfg.lr <= 0:  # the schedule scales every group's --lr by scst_lr / lr
        raise CaptionerError(f"--scst-epochs needs a positive --lr, got {train_cfg.lr}")


def then_constant(schedule: Callable[[int], float], steps: int, factor: float) -> Callable[[int], float]:
    """LambdaLR factor: `schedule` for the first `steps` updates (the cross-entropy epochs), then `factor`
    (scst_lr / lr) for the self-critical epochs after them."""
    def combined(step: int) -> float:
        return schedule(step) if step < steps else factor
    return combined
