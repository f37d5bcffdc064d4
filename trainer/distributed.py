"""Several processes (torchrun / accelerate launch): who we are, and the collective operations the loop needs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if `flag` is True on any."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def share(self, items: list) -> list:
        """This process's share of `items` (every size-th, from rank)."""
        return items[self.rank::self.size]


def init_world(device: torch.device, timeout_minutes: int | None = None) -> World:
    """Read torchrun's (or accelerate's) environment and join the process group (--ddp_timeout: minutes a
    collective may wait, else torch's default)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        timeout = {"timeout": datetime.timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **timeout)
    return world


def pick_device(requested: str | None, world: World | None = None) -> torch.device:
    """The device this process computes on: `requested` (--device), else CUDA when there is one, else the CPU. Under
    torchrun every process reads LOCAL_RANK: a CUDA device without an index (`cuda`, or none requested) is this
    process's own card, cuda:LOCAL_RANK, and becomes the current device; an explicit index is taken as given."""
    device = torch.device(requested) if requested else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    if device is None:
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        local = world.local_rank if world is not None else int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device
