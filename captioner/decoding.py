"""Decoding over the step interface (`init_state(memory)`, `step(tokens, state) -> (log_probs, state)`).

Every decoder implements that interface, so greedy and beam search here serve all of them. Both run batched:
greedy over images, beam search over images x beams in one tensor program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .text import BOS_ID, EOS_ID, PAD_ID


@dataclass
class Hypothesis:
    tokens: list[int]  # without bos/eos
    score: float  # length-normalised log-probability used for ranking


def _strip(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def length_normalise(log_prob: torch.Tensor, length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length penalty: log_prob / ((5 + length) / 6) ** alpha. alpha 0 ranks by raw log-probability."""
    if alpha == 0:
        return log_prob
    return log_prob / ((5.0 + length.float()) / 6.0) ** alpha


def _forbid(log_probs: torch.Tensor, step: int, min_len: int) -> torch.Tensor:
    """Never generate pad or bos; no eos before min_len tokens (so no caption is empty). In place."""
    log_probs[:, PAD_ID] = float("-inf")
    log_probs[:, BOS_ID] = float("-inf")
    if step < min_len:
        log_probs[:, EOS_ID] = float("-inf")
    return log_probs


@torch.inference_mode()
def greedy_decode(model, memory: torch.Tensor, max_len: int, min_len: int = 1, memory_mask=None) -> list[Hypothesis]:
    """memory (B, N, D) -> one hypothesis per image, argmax at every step, stops when all emitted eos.
    eos is not allowed before `min_len` tokens, so a caption is never empty (as in beam search)."""
    b = memory.shape[0]
    state = model.init_state(memory, memory_mask)
    tokens = torch.full((b,), BOS_ID, dtype=torch.long, device=memory.device)
    finished = torch.zeros(b, dtype=torch.bool, device=memory.device)
    total = torch.zeros(b, device=memory.device)
    out = []
    for t in range(max_len):
        log_probs, state = model.step(tokens, state)  # (B, V)
        _forbid(log_probs, t, min_len)
        best, tokens = log_probs.max(dim=-1)  # (B,), (B,)
        total += torch.where(finished, torch.zeros_like(best), best)
        tokens = torch.where(finished, torch.full_like(tokens, EOS_ID), tokens)
        out.append(tokens)
        finished |= tokens == EOS_ID
        if bool(finished.all()):
            break
    seqs = torch.stack(out, dim=1).tolist()  # (B, T)
    return [Hypothesis(_strip(s), float(score)) for s, score in zip(seqs, total.tolist())]


@torch.inference_mode()
def beam_search(model, memory: torch.Tensor, beam_size: int, max_len: int, length_penalty: float = 0.0,
                min_len: int = 1, num_return: int = 1, memory_mask=None) -> list[list[Hypothesis]]:
    """Batched beam search. memory (B, N, D) -> for each image, `num_return` hypotheses sorted best first.

    Finished beams keep their slot with a frozen score (their only continuation is eos at zero cost), so the
    tensors keep a fixed (B, K) shape; the search stops early once every beam has finished. A beam that never
    emits eos still returns its max_len tokens. Beam bookkeeping uses integer division throughout.
    """
    if not 1 <= num_return <= beam_size:
        raise ValueError(f"num_return must be in 1..beam_size ({beam_size}), got {num_return}")
    device = memory.device
    b, k = memory.shape[0], beam_size
    rows = torch.arange(b, device=device)
    state = model.init_state(memory, memory_mask).select(rows.repeat_interleave(k))  # (B*K, ...)
    tokens = torch.full((b * k,), BOS_ID, dtype=torch.long, device=device)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first one at step 0
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * k, dtype=torch.long, device=device)
    history = torch.empty((b * k, 0), dtype=torch.long, device=device)
    for t in range(max_len):
        log_probs, state = model.step(tokens, state)  # (B*K, V)
        vocab = log_probs.shape[-1]
        _forbid(log_probs, t, min_len)
        log_probs[finished] = float("-inf")
        log_probs[finished, EOS_ID] = 0.0
        candidates = (scores.view(-1, 1) + log_probs).view(b, k * vocab)  # (B, K*V)
        scores, flat = candidates.topk(k, dim=1)  # (B, K)
        source = (rows[:, None] * k + torch.div(flat, vocab, rounding_mode="floor")).view(-1)  # (B*K,)
        tokens = (flat % vocab).view(-1)
        was_finished = finished.index_select(0, source)
        lengths = lengths.index_select(0, source) + (~was_finished).long()
        finished = was_finished | (tokens == EOS_ID)
        history = torch.cat([history.index_select(0, source), tokens[:, None]], dim=1)
        state = state.select(source)
        if bool(finished.all()):
            break
    # Length counts the generated tokens, eos included, as GNMT's penalty does.
    ranked = length_normalise(scores.view(-1), lengths, length_penalty).view(b, k)
    order = ranked.argsort(dim=1, descending=True)[:, :num_return].tolist()
    seqs, ranked = history.view(b, k, -1).tolist(), ranked.tolist()
    return [[Hypothesis(_strip(seqs[i][j]), ranked[i][j]) for j in order[i]] for i in range(b)]


@torch.inference_mode()
def decode(model, memory: torch.Tensor, beam_size: int = 1, max_len: int = 30, length_penalty: float = 0.0,
           num_return: int = 1) -> list[list[Hypothesis]]:
    """Greedy for beam size 1 with a single return, batched beam search otherwise."""
    max_len = min(max_len, model.decoder.max_len)
    if beam_size == 1 and num_return == 1:
        return [[h] for h in greedy_decode(model, memory, max_len)]
    return beam_search(model, memory, beam_size, max_len, length_penalty, num_return=num_return)
