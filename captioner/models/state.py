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

    def select(self, index: torch.Tensor) -> "DecoderState":
        """Rows `index` (1-D long tensor) of every tensor: beam reordering and beam expansion alike."""
        return DecoderState(self.position, {k: v.index_select(0, index) for k, v in self.tensors.items()})
