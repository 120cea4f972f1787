"""Exponential moving average of a model's weights: the weights validation decodes with and best.pt holds.

After every optimizer update, each floating-point parameter and buffer of the EMA copy moves towards the
trained model's: `ema += (1 - d) * (model - ema)`, with `d = min(decay, (1 + n) / (10 + n))` after n updates,
so the average follows the fast early changes closely and settles to `decay` later (at 0.998 it averages the
last ~500 updates). Integer buffers (BatchNorm's batch counters) are copied. Frozen weights stay bit-equal to the
model's (the average of a constant is that constant), so a frozen-trunk feature cache serves both.

Under torchrun every process holds its own copy and updates it after the same synchronised updates; BatchNorm
statistics are per process, so `broadcast_from_main` makes every copy rank 0's before each validation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    def _pairs(self, model: nn.Module):
        """(average, current) tensors in state-dict order, split into floating-point ones and the rest."""
        averaged, current = self.module.state_dict(), model.state_dict()
        floats = [(averaged[k], current[k]) for k in averaged if averaged[k].is_floating_point()]
        others = [(averaged[k], current[k]) for k in averaged if not averaged[k].is_floating_point()]
        return floats, others

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step towards `model` (call after each optimizer update)."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        floats, others = self._pairs(model)
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c.detach() for _, c in floats], weight)
        for averaged, current in others:
            averaged.copy_(current)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = int(updates)

    def broadcast_from_main(self, dist: Any) -> None:
        """Make every process's average rank 0's (a no-op in a single process)."""
        dist.broadcast_module(self.module)
