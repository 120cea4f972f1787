"""Multi-process training under torchrun: who this process is, and the few collectives training needs.

`torchrun --nproc_per_node N -m captioner.cli train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them
everything here degrades to single-process no-ops, so the training loop has one code path. Backend: NCCL on
CUDA, gloo on CPU (the CI test runs two CPU processes with gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import CaptionerError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes checkpoints and the run folder's files."""
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of small per-process numbers over all processes (one all_reduce)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """True when `flag` holds on every process: decisions that change control flow (skip this step,
        stop now) must be taken by all processes together, or the next collective waits forever."""
        if not self.enabled:
            return flag
        return self.sum([0.0 if flag else 1.0], device)[0] == 0.0

    def any_each(self, flags: list[bool], device: torch.device) -> list[bool]:
        """For each flag, whether it holds on at least one process: several decisions in one all_reduce."""
        if not self.enabled:
            return list(flags)
        return [count > 0 for count in self.sum([1.0 if flag else 0.0 for flag in flags], device)]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj` (picklable), in rank order, on every process."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.enabled:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every process's parameters and buffers of `module` rank 0's, in place."""
        if not self.enabled:
            return
        for tensor in module.state_dict().values():
            if tensor.is_contiguous():
                dist.broadcast(tensor, src=0)
            else:  # channels_last weights: a dense copy travels
                dense = tensor.contiguous()
                dist.broadcast(dense, src=0)
                tensor.copy_(dense)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[Distributed, str]:
    """Join the process group torchrun describes (if any) -> (context, device name for this process).

    Under torchrun with CUDA each process takes GPU LOCAL_RANK; `--device cpu` (or no GPU) uses gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise CaptionerError(f"--device {device_name}: CUDA is not available on this machine (use --device cpu)")
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, local_rank), device_name


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
