"""Stop signals during training: SIGINT/SIGTERM finish the current batch, and every process stops at the same one."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch

from .distributed import Distributed
from .errors import TrainingInterrupted


class StopSignals:
    """SIGINT (Ctrl-C) or SIGTERM (what schedulers send before preempting a job) during training: the current
    batch finishes, last.pt is written at that exact point, and the run stops with TrainingInterrupted.
    A second signal goes to the previous handler (Ctrl-C twice still interrupts at once). Only the main
    thread can install handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def agreed(self, dist: Distributed, device: torch.device, checkpoint_due: bool = False) -> tuple[bool, bool]:
        """-> (stop, checkpoint): whether any process received a signal, and whether any process finds a
        mid-epoch checkpoint due, by one vote of them all; a process that learns another one received a signal
        takes it as its own. A process must stop on this answer only: acting on its own flag, set by a signal
        that arrived after the vote, it would leave the others waiting in their next collective (DDP's gradient
        all-reduce), and torchrun forwards a SIGTERM to each process at a slightly different moment. A signal
        that misses one vote is counted at the next. The checkpoint is voted on for the same reason: writing one
        sums the epoch's figures over the processes, and `--checkpoint-minutes` reads each process's own clock."""
        stopping, checkpointing = dist.any_each([self.received is not None, checkpoint_due], device)
        if stopping:
            self.received = self.received or signal.SIGTERM
        return stopping, checkpointing

    def raise_if_received(self, where: str, out: Path) -> None:
        if self.received is not None:
            name = signal.Signals(self.received).name
            raise TrainingInterrupted(f"stopped by {name} {where}; {out / 'last.pt'} holds this exact point: continue "
                                      f"with `captioner train --resume {out / 'last.pt'}`", self.received)
