"""The data-parallel process group of a multi-process evaluation.

``accelerate launch --num_processes N`` (or ``torchrun``) starts N copies of the evaluation with
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR`` set. lm-eval shards the requests by
``rank`` and synchronises through the model's ``all_gather`` / ``gather_object`` / ``barrier``,
which this group implements with ``torch.distributed`` (gloo on CPU, NCCL on CUDA). Ranks sit
in a barrier while slower ranks are still generating, so the group's timeout is hours, not the
default ten to thirty minutes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class ProcessGroup:
    rank: int
    world_size: int
    device: torch.device
    owned: bool = False          # this object initialised torch.distributed (and may tear it down)

    @classmethod
    def single(cls, device: torch.device) -> ProcessGroup:
        return cls(0, 1, device)

    @classmethod
    def from_env(cls, device: str | None, timeout: timedelta) -> ProcessGroup:
        """Join the launcher's group when ``WORLD_SIZE`` > 1, else a single process.
        ``device``: the requested device; under a launch each rank takes ``cuda:LOCAL_RANK``
        when CUDA is available and not ruled out by ``device``, else the CPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single(resolve_device(device))
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        owned = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
            owned = True
        return cls(dist.get_rank(), dist.get_world_size(), dev, owned)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated in rank order (a scalar counts as shape (1,))."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        t = tensor.reshape(1) if tensor.dim() == 0 else tensor.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """The list of every rank's ``obj`` on ``dst``; None on the other ranks."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Tear down the group if this object created it (idempotent)."""
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owned = False


def resolve_device(device: str | None, fallback: str = "cpu") -> torch.device:
    """``device`` if usable here; a CUDA request on a machine without CUDA falls back to the CPU
    (lm-eval's command line asks for ``cuda:0`` unless told otherwise)."""
    name = device or fallback
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", name)
        return torch.device("cpu")
    return torch.device(name)
