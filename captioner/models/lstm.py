"""LSTM decoder with soft attention (Show, Attend and Tell, Xu et al. 2015), behind the same step interface.

At every step the previous hidden state scores each memory token with additive attention, a gating scalar
beta = sigmoid(f(h)) scales the attended context, and an LSTM cell reads [word embedding, context]. The word
distribution comes from the paper's deep output layer, L_o(E y + L_h h + L_z z), with L_o tied to E.

Teacher forcing (`forward`) and incremental decoding (`step`) run the very same `_advance`, so the two agree
exactly; `forward` also returns the attention weights for the doubly stochastic regulariser
(`doubly_stochastic_penalty`), which pushes every memory token to receive about one unit of attention over a
caption.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout
from .state import DecoderState


class AdditiveAttention(nn.Module):
    """e_i = w . tanh(W_m m_i + W_h h); alpha = softmax(e) over the memory tokens."""

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.memory_proj = nn.Linear(dim, attention_dim)
        self.hidden_proj = nn.Linear(dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, memory: torch.Tensor, projected_memory: torch.Tensor, hidden: torch.Tensor,
                memory_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, N, D), projected_memory (B, N, A) = memory_proj(memory), hidden (B, D), mask (B, N)
        True=padded -> context (B, D), alpha (B, N)."""
        energy = self.score(torch.tanh(projected_memory + self.hidden_proj(hidden)[:, None, :]))[..., 0]  # (B, N)
        if memory_mask is not None:
            energy = energy.masked_fill(memory_mask, float("-inf"))
        alpha = torch.softmax(energy.float(), dim=-1).to(memory.dtype)  # (B, N)
        return torch.bmm(alpha[:, None, :], memory)[:, 0], alpha


class LSTMDecoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 256, dropout: float = 0.1, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.attention = AdditiveAttention(dim, dim)
        self.init_h, self.init_c = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, 1)  # gating scalar beta from h_{t-1}
        self.cell = nn.LSTMCell(2 * dim, dim)
        self.hidden_out, self.context_out = nn.Linear(dim, dim), nn.Linear(dim, dim)  # L_h, L_z
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # L_o tied to E
        self.drop = Dropout(dropout)
        self.max_len = max_len  # no positional limit; kept so every decoder caps captions the same way
        nn.init.normal_(self.embed.weight, std=dim**-0.5)

    def _initial(self, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """h0, c0 from the mean memory token (masked mean when some tokens are padding)."""
        if memory_mask is None:
            mean = memory.mean(dim=1)
        else:
            keep = (~memory_mask).to(memory.dtype)[..., None]  # (B, N, 1)
            mean = (memory * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        tensors = {"h": torch.tanh(self.init_h(mean)), "c": torch.tanh(self.init_c(mean)), "memory": memory,
                   "projected": self.attention.memory_proj(memory)}
        if memory_mask is not None:
            tensors["memory_mask"] = memory_mask
        return tensors

    def _advance(self, tokens: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for tokens (B,): updates h and c in `t`; returns logits (B, V) and attention (B, N)."""
        word = self.embed(tokens)  # (B, D)
        context, alpha = self.attention(t["memory"], t["projected"], t["h"], t.get("memory_mask"))
        context = torch.sigmoid(self.gate(t["h"])) * context  # (B, D)
        t["h"], t["c"] = self.cell(torch.cat([self.drop(word), context], dim=-1), (t["h"], t["c"]))
        logits = self.head(self.drop(word + self.hidden_out(t["h"]) + self.context_out(context)))
        return logits, alpha

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor, memory_mask=None,
                caption_image_index: torch.Tensor | None = None,
                return_attention: bool = False):
        """memory (B, N, D), tokens (C, T) starting with bos -> logits (C, T, V) [, attention (C, T, N)].

        caption_image_index (C,) maps each caption to its memory row (C = B when None)."""
        if caption_image_index is not None:
            memory = memory.index_select(0, caption_image_index)  # (C, N, D)
            if memory_mask is not None:
                memory_mask = memory_mask.index_select(0, caption_image_index)
        state = self._initial(memory, memory_mask)
        logits, alphas = [], []
        for step in range(tokens.shape[1]):
            step_logits, alpha = self._advance(tokens[:, step], state)
            logits.append(step_logits)
            alphas.append(alpha)
        logits = torch.stack(logits, dim=1)  # (C, T, V)
        return (logits, torch.stack(alphas, dim=1)) if return_attention else logits

    # --- step interface -------------------------------------------------------------------------------------
    def init_state(self, memory: torch.Tensor, memory_mask=None, attention_layer: int | None = None) -> DecoderState:
        """`attention_layer` is accepted for the common interface: the LSTM has one attention (layer 0 or -1),
        which every step keeps anyway."""
        if attention_layer not in (None, 0, -1):
            raise ValueError(f"attention layer {attention_layer} does not exist: the LSTM decoder has one soft "
                             "attention (use 0 or -1)")
        return DecoderState(position=0, tensors=self._initial(memory, memory_mask),
                            per_image=frozenset({"memory", "projected", "memory_mask"}))

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """tokens (B,) -> log-probabilities (B, V) of the next token. The step's attention (B, N) stays in
        `state.tensors["attention"]` for whoever wants to show where the decoder looked."""
        logits, state.tensors["attention"] = self._advance(tokens, state.tensors)
        state.position += 1
        return F.log_softmax(logits.float(), dim=-1), state


def doubly_stochastic_penalty(attention: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Show, Attend and Tell's regulariser: sum over memory tokens of (1 - attention received over the caption)^2,
    averaged over captions. attention (C, T, N); token_mask (C, T) True at real (non-padding) steps."""
    received = (attention.float() * token_mask[..., None].float()).sum(dim=1)  # (C, N)
    return ((1.0 - received) ** 2).sum(dim=1).mean()
