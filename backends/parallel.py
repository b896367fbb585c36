"""The process layout of a run: global, data-, tensor- and pipeline-parallel ranks and their groups.

Ranks are laid out as Megatron does: tensor-parallel ranks are neighbours, then
data-parallel, then pipeline stages (rank = (pp * dp_size + dp) * tp_size + tp).
The ranks of one model replica (same dp rank) must see the same data; data shards
and metric reductions therefore go over the data-parallel group, never the world.
gloo on CPU, NCCL on GPU; one process without torchrun needs no process group.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from r1cli.errors import R1Error


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    dp_group: Any = None  # None: the default group (or no group in one process)
    tp_group: Any = None
    pp_group: Any = None

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp_size) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.dp_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, value: float | torch.Tensor, device: torch.device | None = None) -> float:
        """Sum over the data-parallel group (float64 so that counts stay exact)."""
        t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value),
                                                                                       dtype=torch.float64)
        if device is not None:
            t = t.to(device)
        if self.distributed and self.dp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return float(t)

    def all_gather(self, obj) -> list:
        """Every data-parallel rank's `obj`, in dp-rank order."""
        if not (self.distributed and self.dp_size > 1):
            return [obj]
        out = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.dp_group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _close_process_group() -> None:
    """Destroy the process group while the interpreter is whole: a gloo group left to interpreter
    teardown can abort the process (SIGABRT, "terminate called without an active exception") after
    the run has finished."""
    if dist.is_initialized():
        dist.destroy_process_group()


def start_process_group(device: torch.device) -> None:
    """torchrun's process group (gloo on CPU, NCCL on GPU), closed again at exit; a single process gets a group
    of one (megatron-core needs one)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    atexit.register(_close_process_group)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(device: torch.device, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> DistributedContext:
    """Join torchrun's process group (when launched by torchrun) and build the dp / tp / pp groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = tensor_parallel * pipeline_parallel
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise R1Error("parallel.tensor_parallel and parallel.pipeline_parallel must be at least 1")
    if world % model_parallel:
        raise R1Error(f"{world} processes do not split into tensor_parallel={tensor_parallel} x "
                      f"pipeline_parallel={pipeline_parallel} replicas")
    if world == 1:
        return DistributedContext()
    start_process_group(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    ctx = DistributedContext(dist.get_rank(), dist.get_world_size(), local, tensor_parallel, pipeline_parallel)
    if model_parallel == 1:
        return ctx  # data parallel only: the default group is the dp group
    tp, dp, pp = tensor_parallel, ctx.dp_size, pipeline_parallel
    rank_of = lambda t, d, p: (p * dp + d) * tp + t  # noqa: E731
    # every rank must create every group, in the same order
    for p in range(pp):
        for t in range(tp):
            g = dist.new_group([rank_of(t, d, p) for d in range(dp)])
            if (ctx.pp_rank, ctx.tp_rank) == (p, t):
                ctx.dp_group = g
        for d in range(dp):
            g = dist.new_group([rank_of(t, d, p) for t in range(tp)])
            if (ctx.pp_rank, ctx.dp_rank) == (p, d):
                ctx.tp_group = g
    for d in range(dp):
        for t in range(tp):
            g = dist.new_group([rank_of(t, d, p) for p in range(pp)])
            if (ctx.dp_rank, ctx.tp_rank) == (d, t):
                ctx.pp_group = g
    return ctx
