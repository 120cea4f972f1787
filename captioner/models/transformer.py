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
keeps every real position from attending to padding; padded positions are ignored by the loss. Teacher forcing
therefore runs the position-wise layers (norms, projections, MLPs, the output head) on the real positions only
(`TokenPacking`): a batch is as long as its longest caption, and on Flickr8k's captions about half of a batch's
positions are padding. Only attention sees the (C, T) layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..text import PAD_ID
from .dropout import Dropout
from .state import DecoderState


def real_rows(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (C, T) right-padded -> (R,) indices into the flattened (C * T) of the real positions: each caption's
    up to its last non-PAD token (bos included)."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)  # (T,)
    lengths = ((tokens != PAD_ID) * positions).amax(dim=1)  # (C,) 1 + index of the last non-PAD token
    real = positions[None, :] <= lengths[:, None]  # (C, T)
    return real.flatten().nonzero().squeeze(1)


class TokenPacking:
    """The real positions of right-padded captions (C, T): position-wise layers run on those R rows only, packed
    as (R, F), and attention unpacks them into the (C, T) layout with zeros at the padding.

    Exact for right padding: under the causal mask a real position attends only to earlier positions, all real,
    so whatever the padding holds never reaches it; logits at padded positions come back as zeros."""

    def __init__(self, tokens: torch.Tensor, rows: torch.Tensor | None = None):
        """tokens (C, T); `rows`: their real_rows when the caller has them already (see CaptionLayout)."""
        c, t = tokens.shape
        self.shape = (c, t)
        self.rows = real_rows(tokens) if rows is None else rows  # (R,) row indices into the flattened (C * T)
        self.dense = self.rows.numel() == c * t  # nothing to skip: pack and unpack are views

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(C, T, F) -> (R, F)."""
        flat = x.flatten(0, 1)
        return flat if self.dense else flat.index_select(0, self.rows)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(R, F) -> (C, T, F), zeros at the padding."""
        c, t = self.shape
        if self.dense:
            return x.view(c, t, -1)
        return x.new_zeros(c * t, x.shape[-1]).index_copy(0, self.rows, x).view(c, t, -1)


def captions_per_image(caption_image_index: torch.Tensor | None, num_images: int) -> int:
    """G when the captions come as G consecutive rows per image, images in order (C = B x G; what collation
    builds when every image gives the same number of captions), so an image's cross-attention keys can be read in
    place; 0 otherwise. No index means one caption per image.

    Why: copying each image's keys and values to every caption's row costs a gather forward and, worse, a
    scatter-add backward (atomic adds on a GPU), for every layer."""
    if caption_image_index is None:
        return 1
    captions = caption_image_index.shape[0]
    if num_images == 0 or captions % num_images:
        return 0
    groups = captions // num_images
    regular = torch.arange(num_images, device=caption_image_index.device).repeat_interleave(groups)
    return groups if torch.equal(caption_image_index, regular) else 0


@dataclass(frozen=True)
class CaptionLayout:
    """Where a batch's captions sit: `rows`, their real positions (real_rows), and `groups`, captions_per_image's
    answer.

    Both decide tensor shapes, so the host must know them, and worked out from tensors on a GPU each one makes the
    host wait for the GPU to finish everything queued (nonzero's count, torch.equal's answer). The training step
    therefore works the layout out while the batch is still on the host and hands it to the forward pass
    (`forward_train(..., layout=...)`); without one, the decoder works it out from its own inputs. It holds only a
    tensor and an int, so torch.compile sees an input of dynamic size rather than a shape to specialise on."""

    rows: torch.Tensor  # (R,)
    groups: int

    @classmethod
    def of(cls, tokens: torch.Tensor, caption_image_index: torch.Tensor | None, num_images: int) -> "CaptionLayout":
        """tokens (C, T) as the decoder gets them; caption_image_index (C,) or None; num_images B."""
        return cls(real_rows(tokens), captions_per_image(caption_image_index, num_images))

    def to(self, device: torch.device | str) -> "CaptionLayout":
        """The same layout for the batch once it is on `device`, copied without waiting for the GPU: from pinned
        memory, since a copy from ordinary memory may wait for the GPU's queue before staging it."""
        rows = self.rows
        if torch.device(device).type == "cuda" and rows.device.type == "cpu":
            rows = rows.pin_memory()
        return CaptionLayout(rows.to(device, non_blocking=True), self.groups)


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

    def keys_values(self, x: torch.Tensor, packing: TokenPacking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D), or (R, D) packed by `packing` -> keys, values, each (B, nh, S, hd)."""
        kv = self.kv(x)
        if packing is not None:
            kv = packing.unpack(kv)  # (B, S, 2D)
        k, v = kv.chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)  # each (B, nh, S, hd)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, causal=False,
               return_weights: bool = False, packing: TokenPacking | None = None, query_groups: int = 1):
        """x (B, T, D) -> (B, T, D); or x (R, D) packed by `packing` -> (R, D). With return_weights, also the
        attention weights averaged over heads (B, T, S), before dropout; for cross-attention only (no causal mask
        is applied to the weights).

        query_groups G > 1 (cross-attention): every G consecutive rows of x read the same row of k, v, mask
        ((B / G, nh, S, hd)): their queries are laid end to end, (B / G, G * T, D), and attend in one call.

        The fused kernel does not return its weights, so they are recomputed beside it (one more q.k product,
        for the one layer that is asked): the output itself is the fused kernel's, so watching the attention
        cannot change a caption."""
        if query_groups > 1 and causal:
            raise ValueError("query_groups is for cross-attention: a causal mask cannot span grouped queries")
        q = self.q(x)
        if packing is not None:
            q = packing.unpack(q)  # (B, T, D)
        b, t, d = q.shape
        q = self.split_heads(q.reshape(b // query_groups, query_groups * t, d))  # (B / G, nh, G * T, hd)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        out = self.out(y if packing is None else packing.pack(y))  # (B, T, D) or (R, D)
        if not return_weights:
            return out
        scores = (q @ k.transpose(-2, -1)).float() * self.head_dim**-0.5  # (B / G, nh, G * T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return out, torch.softmax(scores, dim=-1).mean(dim=1).to(q.dtype).reshape(b, t, -1)


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

    def forward(self, x, self_kv, cross_kv, cross_mask, causal: bool, return_attention: bool = False,
                packing: TokenPacking | None = None, query_groups: int = 1):
        """x (B, T, D), or (R, D) packed by `packing` (then self_kv must take packed input too) -> x in the same
        layout [, cross-attention weights averaged over heads (B, T, N) if return_attention]. query_groups: see
        Attention.attend (cross_kv and cross_mask then hold one row per group)."""
        h = self.norm1(x)
        k, v = self_kv(h)
        x = x + self.drop(self.self_attn.attend(h, k, v, causal=causal, packing=packing))
        h = self.norm2(x)
        cross = dict(mask=cross_mask, packing=packing, query_groups=query_groups)
        if return_attention:
            attended, attention = self.cross_attn.attend(h, *cross_kv, return_weights=True, **cross)
        else:
            attended, attention = self.cross_attn.attend(h, *cross_kv, **cross), None
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
                attention_layer: int = -1, layout: CaptionLayout | None = None, packed_logits: bool = False):
        """memory (B, N, D), tokens (C, T) starting with bos, right-padded -> logits (C, T, V) [, attention
        (C, T, N)]. Logits at padded positions (after a caption's last non-PAD token) are zeros: see TokenPacking.
        With `packed_logits`, the logits of the real positions only, (R, V) in the order of `layout.rows`: what
        the training loss reads, without a (C, T, V) tensor that is half zeros.

        caption_image_index (C,) maps each caption to its memory row (C = B when None); cross-attention keys
        and values are projected once per image and then shared by that image's captions: read in place when
        every image has the same number of captions in consecutive rows (how collation lays them out), else
        copied to each caption's row. With
        return_attention, also the cross-attention of layer `attention_layer`, averaged over heads. `layout`: these
        tokens' CaptionLayout when the caller has it (worked out on the host); by default worked out here."""
        watched = self.layer_index(attention_layer) if return_attention else None
        cross_mask = memory_attn_mask(memory_mask)
        if layout is None:
            layout = CaptionLayout.of(tokens, caption_image_index, memory.shape[0])
        groups, packing = layout.groups, TokenPacking(tokens, layout.rows)  # groups 0: irregular, keys copied
        if cross_mask is not None and not groups:
            cross_mask = cross_mask.index_select(0, caption_image_index)  # (C, 1, 1, N)
        x, attention = packing.pack(self._embed(tokens, 0)), None  # (R, D)
        for i, layer in enumerate(self.layers):
            k, v = layer.cross_attn.keys_values(memory)  # (B, nh, N, hd)
            if not groups:
                k, v = k.index_select(0, caption_image_index), v.index_select(0, caption_image_index)  # (C, ...)
            self_kv = partial(layer.self_attn.keys_values, packing=packing)
            if i == watched:
                x, attention = layer(x, self_kv, (k, v), cross_mask, causal=True, return_attention=True,
                                     packing=packing, query_groups=groups or 1)  # attention (C, T, N)
            else:
                x = layer(x, self_kv, (k, v), cross_mask, causal=True, packing=packing, query_groups=groups or 1)
        logits = self.head(self.norm(x))  # (R, V)
        if not packed_logits:
            logits = packing.unpack(logits)  # (C, T, V)
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
