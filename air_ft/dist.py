"""The few collective operations compression needs, no-ops in a single process.

Under ``accelerate launch --num_processes N`` (or ``torchrun``) the default process group is up and these spread
work over the processes: calibration batches are sharded (batch ``b`` goes to rank ``b mod N``), statistics are
summed with ``all_reduce``, each rank factors a share of a block's matrices and ``broadcast`` hands the factors to
the others. Every function takes and returns plain tensors, so the math modules stay free of distributed code.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["world", "rank", "is_main", "shard", "all_reduce_sum", "broadcast", "broadcast_object", "barrier",
           "assign", "local", "init_from_env"]

_local = 0  # > 0 inside `local()`: this process works alone


def _dist():
    import torch.distributed as dist

    if _local:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def init_from_env() -> None:
    """Join the process group that a launcher (``accelerate launch``, ``torchrun``) describes in the environment,
    if there is one and it is not up yet (accelerate's ``PartialState`` picks the backend: NCCL on GPUs, gloo on
    CPUs)."""
    import torch.distributed as d

    if not _local and int(os.environ.get("WORLD_SIZE", "1")) > 1 and d.is_available() and not d.is_initialized():
        from accelerate import PartialState

        # without GPUs, a torchrun-style launch (accelerate launch --multi_gpu) is a CPU group: gloo
        PartialState(cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def local():
    """Within this block the process works alone (``world() == 1``), e.g. the main process compressing while the
    others wait for its checkpoint."""
    global _local
    _local += 1
    try:
        yield
    finally:
        _local -= 1


def world() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This rank's share of ``items``: every ``world()``-th item starting at ``rank()``."""
    return items[rank()::world()]


def _wire(t: torch.Tensor) -> torch.Tensor:
    """The tensor as the backend can carry it (gloo: CPU; nccl: the rank's GPU)."""
    d = _dist()
    if d.get_backend() == "nccl" and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    if d.get_backend() == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``sum`` of ``t`` over all ranks (returned; ``t`` itself may be overwritten)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return t
    w = _wire(t.contiguous())
    d.all_reduce(w)
    return w.to(t.device) if w.device != t.device else w


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """``t`` as rank ``src`` holds it, on every rank (same shape and dtype everywhere)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return t
    w = _wire(t.contiguous())
    d.broadcast(w, src)
    return w.to(t.device) if w.device != t.device else w


def broadcast_object(obj, src: int):
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()


def assign(costs: dict[str, float], n: int) -> dict[str, int]:
    """Greedy balance: each name (most expensive first) goes to the least loaded of ``n`` ranks; deterministic."""
    load = [0.0] * n
    owner = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(n), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += costs[name]
    return owner
