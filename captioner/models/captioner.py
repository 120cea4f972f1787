"""The captioner: trunk -> bridge -> decoder, with one training signature and the decoders' step interface."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig
from .bridges import build_bridge
from .encoder import TRUNK_CHANNELS, ResNet18Trunk
from .state import DecoderState
from .lstm import LSTMDecoder
from .transformer import TransformerDecoder

DECODERS = ("transformer", "lstm")


class TrainOutput(NamedTuple):
    logits: torch.Tensor  # (C, T, V)
    bow_logits: torch.Tensor | None  # (B, V), None without the bag-of-words head
    attention: torch.Tensor | None  # (C, T, N) where the decoder looked, when asked for (see forward_train)


def build_decoder(cfg: ModelConfig) -> nn.Module:
    if cfg.decoder == "transformer":
        return TransformerDecoder(cfg.vocab_size, cfg.dim, cfg.decoder_layers, cfg.heads, cfg.dropout, cfg.max_len)
    if cfg.decoder == "lstm":
        return LSTMDecoder(cfg.vocab_size, cfg.dim, cfg.dropout, cfg.max_len)
    raise ValueError(f"unknown decoder {cfg.decoder!r}; choose one of {', '.join(DECODERS)}")


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig, load_encoder_weights: bool = True):
        """`load_encoder_weights=False` builds a random trunk: used when a checkpoint's weights follow anyway."""
        super().__init__()
        if cfg.vocab_size <= 4:
            raise ValueError("ModelConfig.vocab_size must be set from the tokenizer before building the model")
        self.cfg = cfg
        weights = cfg.encoder_weights if load_encoder_weights else "none"
        self.encoder = ResNet18Trunk(weights, cfg.trainable_layers)
        self.bridge = build_bridge(cfg.bridge, TRUNK_CHANNELS, cfg.dim, cfg.dropout, cfg.bridge_layers, cfg.heads)
        self.decoder = build_decoder(cfg)
        # Auxiliary bag-of-words head: predicts which tokens occur in the image's captions from the pooled memory.
        # It gives the trunk a direct, dense signal for every attribute word; unused at decoding time.
        self.bow_head = nn.Linear(cfg.dim, cfg.vocab_size) if cfg.bow_weight > 0 else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> memory tokens (B, N, D)."""
        return self.bridge(self.encoder(images))

    def forward(self, images: torch.Tensor, tokens_in: torch.Tensor,
                caption_image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing. images (B, 3, H, W); tokens_in (C, T) starting with bos; caption_image_index (C,)
        says which image each caption belongs to (several captions per image share one encoder pass).
        Returns logits (C, T, V)."""
        return self.forward_train(images, tokens_in, caption_image_index).logits

    @property
    def regularises_attention(self) -> bool:
        """Whether training adds the doubly stochastic attention regulariser: Show, Attend and Tell's, for the
        LSTM's soft attention only (a Transformer's cross-attention heads are not meant to cover every cell)."""
        return self.cfg.decoder == "lstm" and self.cfg.attention_reg > 0

    def forward_train(self, images: torch.Tensor | None, tokens_in: torch.Tensor,
                      caption_image_index: torch.Tensor | None = None,
                      prefix_features: torch.Tensor | None = None,
                      return_attention: bool | None = None) -> TrainOutput:
        """As forward, plus what the auxiliary losses need. `prefix_features`, the cached output of the frozen
        trunk prefix, replaces `images` when given. The decoder's attention (C, T, N) comes back when
        `return_attention` says so; by default only when a loss needs it (`regularises_attention`)."""
        if prefix_features is None:
            prefix_features = self.encoder.forward_prefix(images)
        memory = self.bridge(self.encoder.forward_suffix(prefix_features))  # (B, N, D)
        if return_attention is None:
            return_attention = self.regularises_attention
        attention = None
        if return_attention:
            logits, attention = self.decoder(memory, tokens_in, caption_image_index=caption_image_index,
                                             return_attention=True)  # (C, T, V), (C, T, N)
        else:
            logits = self.decoder(memory, tokens_in, caption_image_index=caption_image_index)  # (C, T, V)
        bow_logits = None if self.bow_head is None else self.bow_head(memory.mean(dim=1))  # (B, V)
        return TrainOutput(logits, bow_logits, attention)

    def init_state(self, memory: torch.Tensor, memory_mask=None, attention_layer: int | None = None) -> DecoderState:
        return self.decoder.init_state(memory, memory_mask, attention_layer)

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        return self.decoder.step(tokens, state)

    def param_groups(self, lr: float, encoder_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on norms, biases and embeddings; the trunk may get its own lr."""
        groups = {k: [] for k in ("enc_decay", "enc_no", "dec_decay", "dec_no")}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            prefix = "enc" if name.startswith("encoder.") else "dec"
            no_decay = p.ndim < 2 or "embed" in name or name.endswith(".pos.weight")
            groups[f"{prefix}_{'no' if no_decay else 'decay'}"].append(p)
        enc_lr = encoder_lr or lr
        spec = [("enc_decay", enc_lr, weight_decay), ("enc_no", enc_lr, 0.0),
                ("dec_decay", lr, weight_decay), ("dec_no", lr, 0.0)]
        return [{"params": groups[k], "lr": g_lr, "weight_decay": wd} for k, g_lr, wd in spec if groups[k]]
