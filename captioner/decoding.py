"""Decoding over the step interface (`init_state(memory)`, `step(tokens, state) -> (log_probs, state)`, and
`max_caption_len`, the most tokens a caption may have).

Every decoder implements that interface, so greedy decoding, beam search and sampling here serve all of them.
All three run batched: greedy and sampling over images (x samples), beam search over images x beams in one
tensor program. `decode` picks one from a `DecodeOptions`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from .text import BOS_ID, EOS_ID, PAD_ID

LENGTH_NORMS = ("gnmt", "average")


@dataclass(frozen=True)
class DecodeOptions:
    """How to turn memory into captions. The defaults are greedy decoding."""

    beam_size: int = 1
    max_len: int = 30  # generated tokens, eos included; capped by the decoder's own max_len
    min_len: int = 1  # no eos before this many tokens, so no caption is empty
    length_penalty: float = 0.0  # GNMT alpha for length_norm "gnmt" (0 = rank by raw log-probability)
    length_norm: str = "gnmt"  # gnmt | average (mean log-probability per token)
    num_return: int = 1  # n-best (beam) or samples (sampling) per image, best first
    no_repeat_ngram: int = 0  # never generate an n-gram twice in one caption (0 = off)
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much probability mass
    seed: int | None = None  # sampling seed; None draws a fresh one
    # Keep where the decoder looked for every generated token (Hypothesis.attention): the Transformer's
    # cross-attention of this layer (-1 = last) averaged over heads, or the LSTM's soft attention. None: off.
    attention_layer: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.beam_size < 1:
            problems.append(f"beam size must be >= 1, got {self.beam_size}")
        if self.max_len < 1 or self.min_len < 0:
            problems.append(f"need max_len >= 1 and min_len >= 0, got {self.max_len} and {self.min_len}")
        elif self.min_len > self.max_len:
            problems.append(f"min_len {self.min_len} is above max_len {self.max_len}: no caption could end")
        if self.length_norm not in LENGTH_NORMS:
            problems.append(f"length norm must be one of {', '.join(LENGTH_NORMS)}, got {self.length_norm!r}")
        if self.num_return < 1:
            problems.append(f"number of captions must be >= 1, got {self.num_return}")
        if not self.sample and self.num_return > self.beam_size:
            problems.append(f"{self.num_return} captions per image need a beam size >= {self.num_return} "
                            f"(or sampling), got beam size {self.beam_size}")
        if self.sample and self.beam_size > 1:
            problems.append("sampling and beam search are exclusive: use beam size 1 with sampling")
        if not self.length_penalty >= 0:  # also refuses nan
            problems.append(f"length penalty must be >= 0 (0 ranks by raw log-probability), got {self.length_penalty}")
        if self.no_repeat_ngram < 0:
            problems.append(f"no-repeat n-gram size must be >= 0, got {self.no_repeat_ngram}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            problems.append(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k} and {self.top_p}")
        elif not self.sample and (self.temperature != 1.0 or self.top_k or self.top_p != 1.0):
            problems.append("temperature, top_k and top_p shape sampling, and this is a search: sample with them")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Hypothesis:
    tokens: list[int]  # without bos/eos
    score: float  # length-normalised log-probability used for ranking
    # (len(tokens), N) float32 on the CPU: the attention over memory tokens of the step that chose each token;
    # only when decoding was asked for it (DecodeOptions.attention_layer)
    attention: torch.Tensor | None = None


def _strip(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def length_normalise(log_prob: torch.Tensor, length: torch.Tensor, alpha: float, norm: str = "gnmt") -> torch.Tensor:
    """Ranking score of a hypothesis. `length` counts generated tokens, eos included.

    gnmt: log_prob / ((5 + length) / 6) ** alpha (alpha 0 ranks by raw log-probability);
    average: log_prob / length, the mean log-probability per token."""
    if norm == "average":
        return log_prob / length.clamp(min=1).float()
    if alpha == 0:
        return log_prob
    return log_prob / ((5.0 + length.float()) / 6.0) ** alpha


def forbid_tokens(log_probs: torch.Tensor, step: int, min_len: int) -> torch.Tensor:
    """Never generate pad or bos; no eos before min_len tokens (so no caption is empty). In place."""
    log_probs[:, PAD_ID] = float("-inf")
    log_probs[:, BOS_ID] = float("-inf")
    if step < min_len:
        log_probs[:, EOS_ID] = float("-inf")
    return log_probs


def ban_repeated_ngrams(log_probs: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid every token that would complete an n-gram the row has already generated. In place.

    log_probs (R, V); history (R, L) tokens generated so far. The row's last n-1 tokens are compared with the
    first n-1 tokens of each earlier n-gram; the last token of every match is banned. eos is never banned, so
    a row always has a way to finish. Vectorised over rows: one unfold, one comparison, one scatter."""
    length = history.shape[1]
    if n <= 0 or length < n:
        return log_probs
    grams = history.unfold(1, n, 1)  # (R, L-n+1, n)
    suffix = history[:, length - n + 1:]  # (R, n-1)
    matches = (grams[:, :, :-1] == suffix[:, None, :]).all(dim=-1)  # (R, L-n+1)
    banned = torch.zeros(log_probs.shape, dtype=torch.int32, device=log_probs.device)
    banned.scatter_add_(1, grams[:, :, -1], matches.int())
    banned[:, EOS_ID] = 0
    return log_probs.masked_fill_(banned > 0, float("-inf"))


def _rank(tokens: torch.Tensor, log_prob: torch.Tensor, lengths: torch.Tensor, per_image: int, num_return: int,
          options: DecodeOptions, attention: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """tokens (B*P, T), log_prob and lengths (B*P,) -> per image the `num_return` best of its P rows.
    attention (B*P, T, N), when kept, is cut to each hypothesis' tokens."""
    ranked = length_normalise(log_prob, lengths, options.length_penalty, options.length_norm).view(-1, per_image)
    order = ranked.argsort(dim=1, descending=True)[:, :num_return].tolist()
    seqs, ranked = tokens.view(ranked.shape[0], per_image, -1).tolist(), ranked.tolist()
    if attention is not None:
        attention = attention.float().cpu().view(len(seqs), per_image, *attention.shape[1:])  # (B, P, T, N)
    hypotheses = []
    for i, row in enumerate(order):
        hypotheses.append([])
        for j in row:
            kept = _strip(seqs[i][j])
            looked = None if attention is None else attention[i, j, : len(kept)].clone()
            hypotheses[-1].append(Hypothesis(kept, ranked[i][j], looked))
    return hypotheses


def _init_state(model, memory: torch.Tensor, memory_mask, options: DecodeOptions):
    """The decoder's initial state, asking it to keep its attention only when the options want it (decoders
    that cannot show attention need not know the argument)."""
    if options.attention_layer is None:
        return model.init_state(memory, memory_mask)
    return model.init_state(memory, memory_mask, attention_layer=options.attention_layer)


def _sampling_filter(log_probs: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(R, V) log-probabilities -> (R, V) sampling probabilities after temperature, top-k and top-p."""
    logits = log_probs / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (R, V) mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    # A row with every token forbidden (possible only with a tiny vocabulary and many bans) ends the caption.
    dead = ~torch.isfinite(log_probs).any(dim=-1)
    if bool(dead.any()):
        probs[dead] = 0.0
        probs[dead, EOS_ID] = 1.0
    return probs


@torch.inference_mode()
def _left_to_right(model, memory: torch.Tensor, options: DecodeOptions, copies: int,
                   generator: torch.Generator | None, memory_mask=None) -> list[list[Hypothesis]]:
    """Greedy (generator None) or sampled decoding of `copies` rows per image; stops when every row emitted eos.

    A row's score is its log-probability under the model (after the pad/bos/min-length/n-gram bans, before the
    temperature and filters), length-normalised as the options say."""
    b, device = memory.shape[0], memory.device
    state = _init_state(model, memory, memory_mask, options)
    if copies > 1:
        state = state.select(torch.arange(b, device=device).repeat_interleave(copies))
    rows = b * copies
    tokens = torch.full((rows,), BOS_ID, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    total = torch.zeros(rows, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    history = torch.empty((rows, 0), dtype=torch.long, device=device)
    looked = []  # per step (R, N), when attention is kept
    for t in range(options.max_len):
        log_probs, state = model.step(tokens, state)  # (R, V)
        if options.attention_layer is not None:
            looked.append(state.tensors["attention"])
        forbid_tokens(log_probs, t, options.min_len)
        ban_repeated_ngrams(log_probs, history, options.no_repeat_ngram)
        if generator is None:
            tokens = log_probs.argmax(dim=-1)  # (R,)
        else:
            probs = _sampling_filter(log_probs, options.temperature, options.top_k, options.top_p)
            tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        chosen = log_probs.gather(1, tokens[:, None])[:, 0]
        total += torch.where(finished, torch.zeros_like(chosen), chosen)
        lengths += (~finished).long()
        tokens = torch.where(finished, torch.full_like(tokens, EOS_ID), tokens)
        history = torch.cat([history, tokens[:, None]], dim=1)
        finished |= tokens == EOS_ID
        if bool(finished.all()):
            break
    attention = torch.stack(looked, dim=1) if looked else None  # (R, T, N)
    return _rank(history, total, lengths, copies, copies, options, attention)


def greedy_decode(model, memory: torch.Tensor, max_len: int, min_len: int = 1, memory_mask=None,
                  no_repeat_ngram: int = 0) -> list[Hypothesis]:
    """memory (B, N, D) -> one hypothesis per image, argmax at every step, stops when all emitted eos."""
    options = DecodeOptions(max_len=max_len, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
    return [per_image[0] for per_image in _left_to_right(model, memory, options, 1, None, memory_mask)]


def sample_decode(model, memory: torch.Tensor, options: DecodeOptions, memory_mask=None) -> list[list[Hypothesis]]:
    """memory (B, N, D) -> for each image `options.num_return` sampled captions, best score first.

    Reproducible: the same seed, memory and batch give the same captions (one generator on memory's device
    drives every draw). Samples may repeat; they are not deduplicated."""
    generator = torch.Generator(device=memory.device)
    if options.seed is None:
        generator.seed()
    else:
        generator.manual_seed(options.seed)
    return _left_to_right(model, memory, options, options.num_return, generator, memory_mask)


@torch.inference_mode()
def beam_search(model, memory: torch.Tensor, beam_size: int, max_len: int, length_penalty: float = 0.0,
                min_len: int = 1, num_return: int = 1, memory_mask=None, no_repeat_ngram: int = 0,
                length_norm: str = "gnmt", attention_layer: int | None = None) -> list[list[Hypothesis]]:
    """Batched beam search. memory (B, N, D) -> for each image, `num_return` hypotheses sorted best first.

    Finished beams keep their slot with a frozen score (their only continuation is eos at zero cost), so the
    tensors keep a fixed (B, K) shape; the search stops early once every beam has finished. A beam that never
    emits eos still returns its max_len tokens. Beam bookkeeping uses integer division throughout. Beams are
    selected by raw log-probability; the length penalty ranks the finished hypotheses. With `attention_layer`
    each hypothesis keeps the attention of the beam steps that built it.
    """
    options = DecodeOptions(beam_size=beam_size, max_len=max_len, min_len=min_len, length_penalty=length_penalty,
                            length_norm=length_norm, num_return=num_return, no_repeat_ngram=no_repeat_ngram,
                            attention_layer=attention_layer)
    device = memory.device
    b, k = memory.shape[0], beam_size
    rows = torch.arange(b, device=device)
    state = _init_state(model, memory, memory_mask, options).select(rows.repeat_interleave(k))  # (B*K, ...)
    tokens = torch.full((b * k,), BOS_ID, dtype=torch.long, device=device)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first one at step 0
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * k, dtype=torch.long, device=device)
    history = torch.empty((b * k, 0), dtype=torch.long, device=device)
    looked = None  # (B*K, t, N) attention of each beam's steps, when kept
    for t in range(max_len):
        log_probs, state = model.step(tokens, state)  # (B*K, V)
        if attention_layer is not None:
            step_attention = state.tensors["attention"][:, None]  # (B*K, 1, N), before this step's reordering
            looked = step_attention if looked is None else torch.cat([looked, step_attention], dim=1)
        vocab = log_probs.shape[-1]
        forbid_tokens(log_probs, t, min_len)
        ban_repeated_ngrams(log_probs, history, no_repeat_ngram)
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
        if looked is not None:
            looked = looked.index_select(0, source)  # a new beam inherits its source beam's steps
        state = state.reorder_beams(source)  # source rows always belong to the same image
        if bool(finished.all()):
            break
    return _rank(history, scores.view(-1), lengths, k, num_return, options, looked)


def decode(model, memory: torch.Tensor, options: DecodeOptions | None = None, memory_mask=None,
           **overrides) -> list[list[Hypothesis]]:
    """memory (B, N, D) -> per image a best-first list of hypotheses: sampling, greedy or batched beam search.

    `overrides` replace fields of `options` (e.g. `decode(model, memory, beam_size=3)`)."""
    options = replace(options or DecodeOptions(), **overrides)
    options = replace(options, max_len=min(options.max_len, model.max_caption_len))
    if options.sample:
        return sample_decode(model, memory, options, memory_mask)
    if options.beam_size == 1 and options.num_return == 1:
        return _left_to_right(model, memory, options, 1, None, memory_mask)
    return beam_search(model, memory, options.beam_size, options.max_len, options.length_penalty, options.min_len,
                       options.num_return, memory_mask, options.no_repeat_ngram, options.length_norm,
                       options.attention_layer)
