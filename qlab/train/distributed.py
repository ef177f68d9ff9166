"""Small helpers around ``torch.distributed`` so the trainer reads the same in 1 or N processes.

Launch with ``torchrun``: it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, and
:func:`setup` initialises the process group from them (NCCL on GPU, gloo on CPU).
Without those variables everything degrades to a single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def setup(device: str) -> torch.device:
    """Initialise the process group if launched by torchrun; return this rank's device."""
    use_cuda = device.startswith("cuda")
    if launched_by_torchrun() and not is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        return torch.device("cuda", local_rank() if is_initialized() else torch.cuda.current_device())
    return torch.device("cpu")


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; ``t`` itself is untouched)."""
    out = t.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world_size()
    return out


def all_reduce_max(value: float, device: torch.device) -> float:
    """Largest ``value`` over ranks — used so every rank takes the same wallclock decision."""
    if not is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (per-rank loader / RNG states for checkpoints)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def weights_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """One int64 per parameter: the sum of its raw bit patterns (equal weights ⇒ equal sums)."""
    sums = []
    for p in module.parameters():
        flat = p.detach().reshape(-1)
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        sums.append(flat.view(bits).to(torch.int64).sum())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def ranks_identical(module: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical parameters (always True in one process)."""
    if not is_initialized():
        return True
    fp = weights_fingerprint(module)
    lo, hi = fp.clone(), fp.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
