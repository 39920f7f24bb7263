"""Reductions across torch.distributed ranks, used by the sharded fits and ShardedMixture (gloo on CPU,
NCCL on GPU: same calls)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of t over the ranks of `group` (a new tensor; t is left alone)."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise maximum of t over the ranks of `group` (a new tensor; t is left alone)."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate equally shaped [n, ...] tensors of every rank in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def is_rank_zero(group=None) -> bool:
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank(group) == 0
