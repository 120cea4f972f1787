"""Decoder state for step-by-step decoding, shared by every decoder.

A state is a bag of tensors whose first axis is the batch (image x beam) axis, plus a step counter. Keeping
it that plain lets one beam search reorder any decoder's state (`select`) without knowing what is inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecoderState:
    position: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Keys whose rows depend only on the image (projected memory, cross-attention keys/values): identical for
    # all beams of an image, so reordering beams within an image can leave them alone.
    per_image: frozenset[str] = frozenset()

    def select(self, index: torch.Tensor) -> "DecoderState":
        """Rows `index` (1-D long tensor) of every tensor: beam expansion, or any reordering across images."""
        return DecoderState(self.position, {k: v.index_select(0, index) for k, v in self.tensors.items()},
                            self.per_image)

    def reorder_beams(self, index: torch.Tensor) -> "DecoderState":
        """As select, for an `index` that only moves rows among the beams of the same image (what beam search
        does every step): per-image tensors are already right and are not copied."""
        return DecoderState(self.position, {k: v if k in self.per_image else v.index_select(0, index)
                                            for k, v in self.tensors.items()}, self.per_image)
