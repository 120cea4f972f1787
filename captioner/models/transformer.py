"""Transformer decoder (pre-norm) with a key/value cache for step-by-step decoding.

Two ways in, one set of weights:
- `forward(memory, tokens)` — teacher forcing over a whole (right-padded) sequence, for training;
- `init_state(memory)` then `step(tokens, state)` — one token per call, for decoding. Cross-attention keys and
  values are projected once per image in `init_state`; each step appends one self-attention key/value per
  layer, so a step costs O(prefix) instead of re-running the decoder over the whole prefix.

Both can also return where the decoder looked: one layer's cross-attention weights averaged over heads
(`return_attention=True`, or `init_state(..., attention_layer=L)`). Only that layer recomputes its weights
beside the fused attention kernel; without the request nothing extra is computed.

Padding convention: masks are True where padded. Captions are right-padded, so the causal mask alone already
keeps every real position from attending to padding; padded positions are ignored by the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout
from .state import DecoderState


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs (self- or cross-attention)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model dim {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)  # each (B, nh, S, hd)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, causal=False,
               return_weights: bool = False):
        """-> (B, T, D) [, attention weights averaged over heads (B, T, S), before dropout, if return_weights;
        for cross-attention only (no causal mask is applied to the weights)].

        The fused kernel does not return its weights, so they are recomputed beside it (one more q.k product,
        for the one layer that is asked): the output itself is the fused kernel's, so watching the attention
        cannot change a caption."""
        q = self.split_heads(self.q(x))  # (B, nh, T, hd)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        b, _, t, _ = y.shape
        out = self.out(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)
        if not return_weights:
            return out
        scores = (q @ k.transpose(-2, -1)).float() * self.head_dim**-0.5  # (B, nh, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return out, torch.softmax(scores, dim=-1).mean(dim=1).to(q.dtype)


def memory_attn_mask(memory_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) True=padded -> boolean SDPA mask (B, 1, 1, N) True=attend."""
    return None if memory_mask is None else (~memory_mask)[:, None, None, :]


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop = Dropout(dropout)

    def forward(self, x, self_kv, cross_kv, cross_mask, causal: bool, return_attention: bool = False):
        """-> x (B, T, D) [, cross-attention weights averaged over heads (B, T, N) if return_attention]."""
        h = self.norm1(x)
        k, v = self_kv(h)
        x = x + self.drop(self.self_attn.attend(h, k, v, causal=causal))
        h = self.norm2(x)
        if return_attention:
            attended, attention = self.cross_attn.attend(h, *cross_kv, mask=cross_mask, return_weights=True)
        else:
            attended, attention = self.cross_attn.attend(h, *cross_kv, mask=cross_mask), None
        x = x + self.drop(attended)
        x = x + self.drop(self.mlp(self.norm3(x)))
        return (x, attention) if return_attention else x


class TransformerDecoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 256, num_layers: int = 3, num_heads: int = 4,
                 dropout: float = 0.1, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied input/output embeddings
        self.drop = Dropout(dropout)
        self.max_len = max_len
        nn.init.normal_(self.embed.weight, std=dim**-0.5)

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        t = tokens.shape[1]
        if start + t > self.max_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the decoder's max_len {self.max_len}")
        positions = torch.arange(start, start + t, device=tokens.device)
        return self.drop(self.embed(tokens) * self.embed.embedding_dim**0.5 + self.pos(positions))

    def layer_index(self, layer: int) -> int:
        """A layer number as Python indexes lists (-1 = last) -> 0..num_layers-1; out of range is an error."""
        n = len(self.layers)
        if not -n <= layer < n:
            raise ValueError(f"attention layer {layer} does not exist: the decoder has {n} layers "
                             f"(use 0..{n - 1}, or -1 for the last)")
        return layer % n

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor, memory_mask=None,
                caption_image_index: torch.Tensor | None = None, return_attention: bool = False,
                attention_layer: int = -1):
        """memory (B, N, D), tokens (C, T) starting with bos -> logits (C, T, V) [, attention (C, T, N)].

        caption_image_index (C,) maps each caption to its memory row (C = B when None); cross-attention keys
        and values are projected once per image and then shared by that image's captions. With
        return_attention, also the cross-attention of layer `attention_layer`, averaged over heads."""
        watched = self.layer_index(attention_layer) if return_attention else None
        cross_mask = memory_attn_mask(memory_mask)
        if cross_mask is not None and caption_image_index is not None:
            cross_mask = cross_mask.index_select(0, caption_image_index)  # (C, 1, 1, N)
        x, attention = self._embed(tokens, 0), None  # (C, T, D)
        for i, layer in enumerate(self.layers):
            k, v = layer.cross_attn.keys_values(memory)  # (B, nh, N, hd)
            if caption_image_index is not None:
                k, v = k.index_select(0, caption_image_index), v.index_select(0, caption_image_index)
            if i == watched:
                x, attention = layer(x, layer.self_attn.keys_values, (k, v), cross_mask, causal=True,
                                     return_attention=True)  # attention (C, T, N)
            else:
                x = layer(x, layer.self_attn.keys_values, (k, v), cross_mask, causal=True)
        logits = self.head(self.norm(x))  # (C, T, V)
        return (logits, attention) if return_attention else logits

    # --- step interface -------------------------------------------------------------------------------------
    def init_state(self, memory: torch.Tensor, memory_mask=None, attention_layer: int | None = None) -> DecoderState:
        """Project cross-attention keys/values once; empty self-attention caches. With `attention_layer`, every
        step keeps that layer's cross-attention, averaged over heads, in state.tensors["attention"] (B, N)."""
        per_image = {"cross_mask"} | {f"cross_{kv}{i}" for i in range(len(self.layers)) for kv in "kv"}
        watched = None if attention_layer is None else self.layer_index(attention_layer)
        state = DecoderState(position=0, per_image=frozenset(per_image), attention_layer=watched)
        cross_mask = memory_attn_mask(memory_mask)
        if cross_mask is not None:
            state.tensors["cross_mask"] = cross_mask
        for i, layer in enumerate(self.layers):
            k, v = layer.cross_attn.keys_values(memory)  # (B, nh, N, hd)
            state.tensors[f"cross_k{i}"], state.tensors[f"cross_v{i}"] = k, v
            empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
            state.tensors[f"self_k{i}"], state.tensors[f"self_v{i}"] = empty, empty
        return state

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """tokens (B,) -> log-probabilities (B, V) of the next token; appends to the cache."""
        x = self._embed(tokens[:, None], state.position)  # (B, 1, D)
        t = state.tensors
        for i, layer in enumerate(self.layers):
            def cached_kv(h, i=i):
                k, v = layer.self_attn.keys_values(h)  # (B, nh, 1, hd)
                t[f"self_k{i}"] = torch.cat([t[f"self_k{i}"], k], dim=2)
                t[f"self_v{i}"] = torch.cat([t[f"self_v{i}"], v], dim=2)
                return t[f"self_k{i}"], t[f"self_v{i}"]

            cross = (t[f"cross_k{i}"], t[f"cross_v{i}"])
            if i == state.attention_layer:
                x, attention = layer(x, cached_kv, cross, t.get("cross_mask"), causal=False, return_attention=True)
                t["attention"] = attention[:, 0]  # (B, N)
            else:
                x = layer(x, cached_kv, cross, t.get("cross_mask"), causal=False)  # one query sees the whole prefix
        state.position += 1
        logits = self.head(self.norm(x[:, 0]))  # (B, V)
        return F.log_softmax(logits.float(), dim=-1), state
