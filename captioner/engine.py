"""One epoch of training and one pass of decoding-based evaluation. No argparse, no files: plain arguments."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data.collate import Batch
from .data.transforms import normalize
from .decoding import DecodeOptions, Hypothesis, decode
from .distributed import Distributed
from .errors import CaptionerError
from .feature_cache import prefix_features
from .scoring import score_captions
from .models.lstm import doubly_stochastic_penalty
from .text import PAD_ID, Tokenizer

log = logging.getLogger(__name__)

# Where no progress bar shows (output to a file or a pipe, as in batch jobs), a training epoch logs one line this
# often, so a log shows a long epoch moving instead of nothing until its end
PROGRESS_LOG_SECONDS = 60.0


def compile_training_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`train --compile`: the training forward (model.forward_train, or its DistributedDataParallel wrapper) under
    torch.compile, with dynamic shapes since caption lengths change from batch to batch. Decoding stays eager."""
    return torch.compile(forward, dynamic=True)


def autocast_for(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA; on CPU fp32 unless `cpu_bf16` (--cpu-bf16): CPUs without bf16 instructions run
    bf16 slower than fp32, while one with AVX512-BF16 (the 2-core development machine) multiplied the decoder's
    matrices 2.4 times faster in bf16."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def prepare_images(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> normalised float on device, channels_last (faster convolutions on CPU and GPU)."""
    images = normalize(images_uint8.to(device, non_blocking=True))
    return images.contiguous(memory_format=torch.channels_last)


def caption_loss_of(logits: torch.Tensor, batch: Batch, label_smoothing: float,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy per caption token, averaged over the batch's tokens: logits (C, T, V), targets (C, T). Or
    logits (R, V) of the positions `rows` (R,) of the flattened (C * T) only (TrainOutput.rows), the same loss.

    Captions sampled from the model (self-critical training) come with `row_weights` (C,), their advantages:
    each caption's token losses are multiplied by its weight, which turns the average into the policy-gradient
    loss, and label smoothing does not apply (it would push every sampled caption towards uniform words)."""
    flat_targets = batch.targets.flatten()  # (C * T)
    if rows is None:
        flat_logits = logits.float().flatten(0, 1)  # (C * T, V)
    else:
        flat_logits, flat_targets = logits.float(), flat_targets.index_select(0, rows)  # (R, V), (R,)
    if batch.row_weights is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=PAD_ID, label_smoothing=label_smoothing)
    per_token = F.cross_entropy(flat_logits, flat_targets, ignore_index=PAD_ID, reduction="none")  # 0 at padding
    weights = batch.row_weights.to(per_token.dtype)  # (C,)
    caption_of_token = torch.arange(flat_targets.shape[0], device=weights.device) // batch.targets.shape[1] \
        if rows is None else rows // batch.targets.shape[1]
    return (per_token * weights[caption_of_token]).sum() / (batch.targets != PAD_ID).sum().clamp(min=1)


def bag_of_words_loss(bow_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE summed over the vocabulary, averaged over images: (B, V) logits vs (B, V) 0/1 targets."""
    bce = F.binary_cross_entropy_with_logits(bow_logits.float(), targets, reduction="sum")
    return bce / bow_logits.shape[0]


class NonFiniteLossError(CaptionerError):
    """Training produced a NaN/inf loss or gradient; the run stops before that state can be checkpointed."""

    exit_status = 1


NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class EpochTotals:
    """Running sums of one epoch. Mid-epoch checkpoints carry them, so a resumed epoch reports the figures an
    uninterrupted one would have. `batches` counts batches taken from the loader (the resume position);
    `steps` counts optimizer updates (a batch of unreadable images, or a skipped non-finite step, has none)."""

    loss_sum: float = 0.0  # caption loss x tokens
    bow_sum: float = 0.0  # bag-of-words loss x images
    tokens: int = 0
    images: int = 0
    batches: int = 0
    steps: int = 0
    skipped_images: int = 0
    nonfinite_steps: int = 0
    reward_sum: float = 0.0  # self-critical epochs: the sampled captions' rewards (scst.py)
    rewards: int = 0

    def position_only(self) -> EpochTotals:
        """Where the epoch stands (batches, updates, skipped updates: the same on every process) with the sums
        zeroed: a resumed process other than rank 0 adds only its own share to the whole run's saved sums."""
        return EpochTotals(batches=self.batches, steps=self.steps, nonfinite_steps=self.nonfinite_steps)

    def summary(self) -> dict[str, Any]:
        summary = {"train_loss": self.loss_sum / max(self.tokens, 1),
                   "train_bow_loss": self.bow_sum / max(self.images, 1), "images": self.images, "steps": self.steps,
                   "skipped_images": self.skipped_images, "nonfinite_steps": self.nonfinite_steps}
        if self.rewards:
            summary["scst_reward"] = self.reward_sum / self.rewards
        return summary


def _nonfinite(policy: str, what: str, epoch: int, totals: EpochTotals, caption_loss, bow_loss) -> None:
    """A NaN/inf loss or gradient norm: raise (policy "stop") or count it (policy "skip")."""
    if policy == "stop":
        raise NonFiniteLossError(
            f"non-finite {what} at epoch {epoch}, batch {totals.batches}: caption loss {caption_loss.item()}, "
            f"bag-of-words loss {bow_loss.item()} (running caption loss {totals.loss_sum / max(totals.tokens, 1):.4f}); "
            "stopping before it reaches a checkpoint. Try a lower --lr or --clip-grad, or --on-nonfinite skip."
        )
    totals.nonfinite_steps += 1


def train_one_epoch(model, loader: Iterable[Batch], optimizer, scheduler, device: torch.device, epoch: int,
                    label_smoothing: float = 0.0, clip_grad: float = 0.0, progress: bool = True,
                    feature_store=None, totals: EpochTotals | None = None,
                    on_batch: Callable[[EpochTotals], None] | None = None, nonfinite: str = "stop",
                    forward: Callable[..., Any] | None = None, dist: Distributed | None = None,
                    amp: bool = True, accumulate: int = 1, ema=None, cpu_bf16: bool = False) -> dict[str, Any]:
    """One pass over `loader` (which may start mid-epoch; `totals` then holds the sums so far).

    `feature_store` (a FeatureStore) receives the frozen trunk prefix's output for images that come as pixels;
    items it already holds come as features (see encode_prefix). Only valid when images are not augmented. `on_batch(totals)` runs after every batch, when the
    model and optimizer are in a consistent state (training saves mid-epoch checkpoints there).
    `nonfinite`: "stop" raises NonFiniteLossError at a NaN/inf loss or gradient norm; "skip" drops that update
    (weights and optimizer state untouched, the schedule moves on) and counts it.

    Under torchrun, `forward` is the DistributedDataParallel-wrapped `model.forward_train` and `dist` the process
    group: every caption token and every image weighs the same whichever process it landed on (losses are
    normalised by the global counts), so N processes with batch b train like one process with batch N*b.
    `amp=False` keeps CUDA in fp32 (the benchmark's baseline); on CPU training is fp32 unless `cpu_bf16`.

    `accumulate` K > 1 sums the gradients of K consecutive batches (each loss divided by its group's size) and
    updates once per group: the update of one K-times-larger batch without its memory. `on_batch` then runs at
    group boundaries only, where no gradient is pending, so checkpoints and stops stay exact. The scheduler
    steps once per update; `len(loader)` must be defined.

    `ema` (a ModelEMA) moves its average towards the model after every update that is applied.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    totals = totals if totals is not None else EpochTotals()
    forward = forward or model.forward_train
    dist = dist or Distributed()
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    last_batch = totals.batches + len(loader) if accumulate > 1 else None  # closes the epoch's last, short group
    pending, group_has_images = 0, False  # micro-batches with gradients not yet applied; any images this group
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=None if progress else True, leave=False, dynamic_ncols=True)
    lines = _ProgressLines(epoch, loader, totals) if progress and bar.disable else None
    for batch in bar:
        if lines is not None:
            lines.tick(totals)
        grad_norm_value = None  # read together with the loss when a step has one micro-batch
        totals.batches += 1
        totals.skipped_images += batch.skipped
        group_start = (totals.batches - 1) // accumulate * accumulate + 1
        group_size = accumulate if last_batch is None else min(accumulate, last_batch - group_start + 1)
        closes_group = totals.batches - group_start + 1 == group_size
        n_images, n_tokens = batch.images.shape[0], int((batch.targets != PAD_ID).sum())
        global_images, global_tokens = dist.sum([n_images, n_tokens], device) if dist.enabled else (n_images, n_tokens)
        if n_images == 0 and global_images > 0:
            raise CaptionerError(f"every image of batch {totals.batches} on process {dist.rank} was unreadable "
                                 "while other processes had images; multi-process training cannot skip it")
        if n_images > 0:
            group_has_images = True
            # Worked out before the batch leaves the host: from GPU tensors it would cost waits for the GPU
            layout = model.caption_layout(batch.tokens_in, batch.caption_image_index, n_images)
            batch = batch.to(device)
            # A skipped batch must leave no trace, but the forward pass itself updates BatchNorm running statistics
            # (NaN ones, if the trunk overflowed): keep a copy of the buffers (small) to put back.
            buffers = [b.detach().clone() for b in model.buffers()] if nonfinite == "skip" else None
            # Gradients of a group's micro-batches add up locally; processes exchange them once, at its last.
            sync = nullcontext() if closes_group or not dist.enabled else forward.no_sync()
            with sync:
                with autocast_for(device, cpu_bf16) if amp else nullcontext():
                    images = prepare_images(batch.images, device)
                    prefix = encode_prefix(model, batch, images, feature_store)
                    out = forward(images, batch.tokens_in, batch.caption_image_index, prefix,
                                  layout=None if layout is None else layout.to(device), packed_logits=True)
                    caption_loss = caption_loss_of(out.logits, batch, label_smoothing, out.rows)  # batch mean
                    bow_loss = torch.zeros((), device=device)
                    if out.bow_logits is not None:
                        bow_loss = bag_of_words_loss(out.bow_logits, batch.bow_targets)
                    # Local means -> shares of the global means (factors are exactly 1 in a single process);
                    # DDP then averages gradients over the world_size processes.
                    token_share = n_tokens * dist.world_size / global_tokens
                    image_share = n_images * dist.world_size / global_images
                    loss = caption_loss * token_share + model.cfg.bow_weight * bow_loss * image_share
                    if out.attention is not None and model.cfg.attention_reg > 0:
                        loss = loss + model.cfg.attention_reg * doubly_stochastic_penalty(out.attention,
                                                                                          batch.targets != PAD_ID)
                # Judging the loss needs its value on the host, a wait for the GPU (which then idles while the host
                # launches what follows). A step of one micro-batch judges it with the gradient norm, after backward
                # and clipping: one wait per step. In a group of several, a bad micro-batch is judged before its
                # gradients join the others', so the rest of the group can still make its update.
                judged_after_backward = group_size == 1
                values = [loss, caption_loss, bow_loss]
                if judged_after_backward:
                    (loss / group_size).backward()
                    values.append(_clip_gradients(parameters, clip_grad))
                loss_value, step_caption_loss, step_bow_loss, *norm = torch.stack(
                    [value.detach().float() for value in values]).tolist()
                grad_norm_value = norm[0] if norm else None
                if dist.all_true(math.isfinite(loss_value), device):
                    if not judged_after_backward:
                        (loss / group_size).backward()
                    pending += 1
                    totals.loss_sum += step_caption_loss * n_tokens
                    totals.bow_sum += step_bow_loss * n_images
                    totals.tokens += n_tokens
                    totals.images += n_images
                    bar.set_postfix(loss=f"{step_caption_loss:.3f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
                else:
                    _nonfinite(nonfinite, "loss", epoch, totals, caption_loss, bow_loss)
                    with torch.no_grad():
                        for buffer, saved in zip(model.buffers(), buffers):
                            buffer.copy_(saved)
        if not closes_group:
            continue
        if pending:
            if grad_norm_value is None:  # a group of several micro-batches: clipped and read now
                grad_norm_value = float(_clip_gradients(parameters, clip_grad))
            if math.isfinite(grad_norm_value):
                optimizer.step()
                totals.steps += 1
                if ema is not None:
                    ema.update(model)
            else:
                _nonfinite(nonfinite, "gradient norm", epoch, totals, caption_loss, bow_loss)
        optimizer.zero_grad(set_to_none=True)
        if group_has_images:
            scheduler.step()  # the schedule counts updates, skipped ones included, so it ends where planned
        pending, group_has_images = 0, False
        if on_batch is not None:
            on_batch(totals)
    return totals.summary()


class _ProgressLines:
    """The progress bar's stand-in where tqdm shows none: a log line every PROGRESS_LOG_SECONDS with the batch, the
    epoch's mean caption loss so far and the images per second since the epoch (or its resumption) started."""

    def __init__(self, epoch: int, loader, totals: EpochTotals):
        try:
            self.total = str(totals.batches + len(loader))  # the loader holds the batches left (a resumed epoch)
        except TypeError:
            self.total = "?"
        self.epoch, self.first_images = epoch, totals.images
        self.started = self.logged = time.monotonic()

    def tick(self, totals: EpochTotals) -> None:
        now = time.monotonic()
        if now - self.logged < PROGRESS_LOG_SECONDS or totals.batches == 0:
            return
        self.logged = now
        log.info("epoch %d: batch %d of %s, caption loss %.4f so far, %.1f img/s", self.epoch, totals.batches,
                 self.total, totals.loss_sum / max(totals.tokens, 1),
                 (totals.images - self.first_images) / max(now - self.started, 1e-9))


def _clip_gradients(parameters: list[torch.Tensor], clip_grad: float) -> torch.Tensor:
    """Clip to `clip_grad` (0: no clipping) and return the norm before clipping, a tensor on the device. Clipping
    at infinity still computes the norm, which is how a non-finite gradient is caught."""
    return torch.nn.utils.clip_grad_norm_(parameters, clip_grad if clip_grad > 0 else float("inf"))


def encode_prefix(model, batch: Batch, images: torch.Tensor, feature_store=None) -> torch.Tensor | None:
    """The frozen trunk prefix's output for `batch` (stored rows from the FeatureStore, the others computed and
    stored), or None when there is no store and no stored features: the model then runs its whole trunk."""
    if feature_store is None and batch.features is None:
        return None
    return prefix_features(model.encoder, images, batch.features, batch.has_features, batch.indices, feature_store)


@torch.inference_mode()
def fill_feature_store(model, loader: Iterable[Batch], feature_store, device: torch.device,
                       progress: bool = False, desc: str = "features") -> int:
    """Compute and store the frozen prefix's output for every image `loader` yields that the store lacks
    (`extract-features`, the training benchmark) -> images seen. Flushes the store at the end."""
    model.eval()
    seen = 0
    for batch in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        if batch.images.shape[0]:
            batch = batch.to(device)
            encode_prefix(model, batch, prepare_images(batch.images, device), feature_store)
            seen += batch.images.shape[0]
    feature_store.flush()
    return seen


def encode_batch(model, batch: Batch, device: torch.device, feature_store=None) -> torch.Tensor:
    """Memory tokens (B, N, D) for a batch of pixels and/or stored prefix features."""
    images = prepare_images(batch.images, device)
    prefix = encode_prefix(model, batch, images, feature_store)
    if prefix is None:
        return model.encode(images)
    return model.memory(model.encoder.forward_suffix(prefix))


@torch.inference_mode()
def decode_images(model, images_uint8: torch.Tensor, device: torch.device,
                  options: DecodeOptions | None = None) -> list[list[Hypothesis]]:
    """uint8 images (B, 3, S, S) -> per image its hypotheses, best first (the model must be in eval mode)."""
    with autocast_for(device):
        memory = model.encode(prepare_images(images_uint8, device))  # (B, N, D)
        return decode(model, memory, options or DecodeOptions())


@torch.inference_mode()
def decode_cached(model, batch: Batch, device: torch.device, options: DecodeOptions | None = None,
                  feature_store=None) -> list[list[Hypothesis]]:
    """As decode_images, for a batch whose frozen-prefix features come (partly) from a FeatureStore."""
    with autocast_for(device):
        memory = encode_batch(model, batch.to(device), device, feature_store)  # (B, N, D)
        return decode(model, memory, options or DecodeOptions())


def decode_batches(model, loader: Iterable[Batch], device: torch.device, options: DecodeOptions | None = None,
                   progress: bool = False, desc: str = "captioning", feature_store=None):
    """Yield (batch, hypotheses per image, best first): token ids, scores and, when asked for, attention."""
    model.eval()
    for batch in tqdm(loader, desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True):
        if batch.images.shape[0] == 0:
            yield batch, []
        elif feature_store is None and batch.features is None:
            yield batch, decode_images(model, batch.images, device, options)
        else:
            yield batch, decode_cached(model, batch, device, options, feature_store)


def caption_batches(model, loader: Iterable[Batch], tokenizer: Tokenizer, device: torch.device,
                    options: DecodeOptions | None = None, progress: bool = False, desc: str = "captioning",
                    feature_store=None):
    """Yield (batch, hypotheses per image) with decoded text: [(text, score), ...] best first."""
    for batch, hyps in decode_batches(model, loader, device, options, progress, desc, feature_store):
        yield batch, [[(tokenizer.decode(h.tokens), h.score) for h in per_image] for per_image in hyps]


@torch.inference_mode()
def encode_split(model, loader, device: torch.device):
    """-> memory (num_images, N, D) on device, and per image: id, references, path (unreadable ones skipped)."""
    memory, ids, references, paths = [], [], [], []
    for batch in loader:
        if batch.images.shape[0] == 0:
            continue
        with autocast_for(device):
            memory.append(model.encode(prepare_images(batch.images, device)))
        ids += batch.image_ids
        references += [list(c) for c in batch.captions]
        paths += [str(p) for p in batch.paths]
    if not memory:
        raise CaptionerError("no readable images in the split")
    return torch.cat(memory), ids, references, paths


@dataclass
class Evaluation:
    """What decoding a split produced and how it scored. `metrics` holds corpus scores and counts; the dicts
    are keyed by image id."""

    metrics: dict[str, Any]
    captions: dict[Any, str]  # best hypothesis per image
    references: dict[Any, list[str]]
    paths: dict[Any, str]
    per_image: dict[Any, dict[str, float]]
    skipped_metrics: dict[str, str]  # metric -> why it was not computed


def evaluate(model, loader: Iterable[Batch], tokenizer: Tokenizer, device: torch.device,
             options: DecodeOptions | None = None, progress: bool = False, metrics: str = "bleu",
             dist: Distributed | None = None, feature_store=None) -> Evaluation:
    """Decode every image (real decoding, not teacher forcing) and score the best hypothesis of each against
    all its references: BLEU-1..4, plus CIDEr-D, ROUGE-L and METEOR with metrics="all".

    Under torchrun each process decodes its share of the split (`loader` is sharded); the captions are gathered
    (an image padded into two shares counts once) and every process computes the same scores."""
    options = options or DecodeOptions()
    references, hypotheses, paths, skipped, started = {}, {}, {}, 0, time.perf_counter()
    for batch, hyps in caption_batches(model, loader, tokenizer, device, options, progress=progress,
                                       desc="evaluating", feature_store=feature_store):
        skipped += batch.skipped
        for image_id, refs, path, per_image in zip(batch.image_ids, batch.captions, batch.paths, hyps):
            references[image_id], hypotheses[image_id], paths[image_id] = list(refs), per_image[0][0], str(path)
    if dist is not None and dist.enabled:
        shares = dist.gather((references, hypotheses, paths, skipped))
        references, hypotheses, paths = ({k: v for share in shares for k, v in share[i].items()} for i in range(3))
        skipped = sum(share[3] for share in shares)
    decode_seconds = time.perf_counter() - started
    if not hypotheses:
        raise CaptionerError(f"evaluation found no readable images ({skipped} skipped; the warnings above name each "
                             "file and why)")
    corpus, per_image, skipped_metrics = score_captions(references, hypotheses, metrics)
    summary = {**corpus, "num_images": len(hypotheses), "skipped_images": skipped, "beam_size": options.beam_size,
               "captions_per_second": round(len(hypotheses) / max(decode_seconds, 1e-9), 2)}
    return Evaluation(summary, hypotheses, references, paths, per_image, skipped_metrics)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warmup to 1, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor
