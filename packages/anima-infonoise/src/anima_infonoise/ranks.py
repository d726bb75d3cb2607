"""What the sampler needs from torch.distributed, and nothing when it is not initialised (one process)."""

from __future__ import annotations

from typing import Any


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _group_active() else 0


def gather(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` in one process). Objects may differ in size, e.g. the
    records of ranks that saw different numbers of non-regularisation samples."""
    if not _group_active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
