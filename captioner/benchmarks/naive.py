"""The decoding baseline that tutorials use: beam search one image at a time, re-running the decoder over the
whole prefix at every step (no key/value cache, no batching over images).

It is kept for two reasons: the decoding benchmark measures the batched, cached search against it, and the
tests check that the batched search finds exactly the hypotheses this straightforward one finds. Its search
rules therefore mirror `captioner.decoding.beam_search`: finished hypotheses keep their slot with a frozen
score and the search ends when every slot has finished (or at max_len).
"""

from __future__ import annotations

import torch

from ..decoding import Hypothesis, forbid_tokens, length_normalise
from ..text import BOS_ID, EOS_ID


@torch.inference_mode()
def naive_beam_search(model, memory: torch.Tensor, beam_size: int, max_len: int, length_penalty: float = 0.0,
                      min_len: int = 1, num_return: int = 1) -> list[Hypothesis]:
    """memory (1, N, D) of one image -> `num_return` hypotheses, best first."""
    if memory.shape[0] != 1:
        raise ValueError(f"naive_beam_search decodes one image at a time, got a batch of {memory.shape[0]}")
    prefixes = torch.full((1, 1), BOS_ID, dtype=torch.long, device=memory.device)  # (K, t+1), bos first
    scores = torch.zeros(1, device=memory.device)  # (K,)
    finished = torch.zeros(1, dtype=torch.bool, device=memory.device)
    for t in range(max_len):
        logits = model.decoder(memory.expand(prefixes.shape[0], -1, -1), prefixes)[:, -1]  # whole prefix again
        log_probs = forbid_tokens(torch.log_softmax(logits.float(), dim=-1), t, min_len)  # (K, V)
        log_probs[finished] = float("-inf")
        log_probs[finished, EOS_ID] = 0.0  # a finished hypothesis only pads itself with eos, at no cost
        vocab = log_probs.shape[1]
        scores, flat = (scores[:, None] + log_probs).view(-1).topk(beam_size)
        source, tokens = flat // vocab, flat % vocab
        finished = finished[source] | (tokens == EOS_ID)
        prefixes = torch.cat([prefixes[source], tokens[:, None]], dim=1)
        if bool(finished.all()):
            break
    hypotheses = []
    for row, score in zip(prefixes[:, 1:].tolist(), scores.tolist()):
        length = row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
        ranked = length_normalise(torch.tensor(score), torch.tensor(length), length_penalty).item()
        hypotheses.append(Hypothesis(row[: length - 1] if EOS_ID in row else row, ranked))
    return sorted(hypotheses, key=lambda h: h.score, reverse=True)[:num_return]
