"""torch.distributed for zoo runs under torchrun: rank and world size,
barriers, and rank 0's checks shared with every rank."""
from __future__ import annotations

import os
from collections.abc import Callable

from ._base import ZooError

def _distributed():
    """(rank, world size), initialising torch.distributed (gloo) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _agree(world, rank, step: Callable[[], object]):
    """Run `step` on rank 0 only and give its result (or its ZooError) to every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = step()
        except ZooError as caught:
            error = str(caught)
    if world > 1:
        import torch.distributed as dist

        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise ZooError(error)
    return result
