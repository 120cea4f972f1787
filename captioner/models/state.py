"""Decoder state for step-by-step decoding, shared by every decoder.

A state is a bag of tensors whose first axis is the batch (image x beam) axis, plus a step counter. Keeping
it that plain lets one beam search reorder any decoder's state (`select`) without knowing what is inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class DecoderState:
    position: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Keys whose rows depend only on the image (projected memory, cross-attention keys/values): identical for
    # all beams of an image, so reordering beams within an image can leave them alone.
    per_image: frozenset[str] = frozenset()
    # Opt-in: which Transformer decoder layer's cross-attention each step keeps in tensors["attention"] (B, N),
    # averaged over heads, to show where the decoder looked. None keeps nothing, so ordinary decoding pays
    # nothing. The LSTM's single soft attention is kept at every step regardless: it is computed anyway.
    attention_layer: int | None = None

    def select(self, index: torch.Tensor) -> "DecoderState":
        """Rows `index` (1-D long tensor) of every tensor: beam expansion, or any reordering across images."""
        return replace(self, tensors={k: v.index_select(0, index) for k, v in self.tensors.items()})

    def reorder_beams(self, index: torch.Tensor) -> "DecoderState":
        """As select, for an `index` that only moves rows among the beams of the same image (what beam search
        does every step): per-image tensors are already right and are not copied."""
        return replace(self, tensors={k: v if k in self.per_image else v.index_select(0, index)
                                      for k, v in self.tensors.items()})
