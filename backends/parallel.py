"""The process layout of a run: global, data-, tensor- and pipeline-parallel ranks and their groups.

Ranks are laid out as Megatron does: tensor-parallel ranks are neighbours, then
context-parallel, then data-parallel, then pipeline stages
(rank = ((pp * dp_size + dp) * cp_size + cp) * tp_size + tp).
The ranks of one model replica (same dp rank: its TP, CP and PP ranks) must see the
same data; data shards and metric reductions therefore go over the data-parallel
group, never the world. Gradients are averaged over the data- and context-parallel
ranks together (grad_group): each CP rank holds a slice of every sequence.
gloo on CPU, NCCL on GPU; one process without torchrun needs no process group.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import weakref
from dataclasses import dataclass, field
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
    mp_group: Any = None  # the ranks of this model replica (its TP x CP x PP ranks); None: a replica of one rank
    cp_size: int = 1  # context parallelism: the ranks that split one sequence (backends/context_parallel.py)
    cp_group: Any = None
    grad_group: Any = None  # data x context parallel: where gradients are averaged (None: the default group)
    # where the groups' collectives read tensors: the rank's GPU under NCCL (which serves CUDA tensors only), the
    # CPU under gloo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.cp_size * self.pp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp_size) % self.cp_size

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp_size * self.cp_size)) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.cp_size * self.dp_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    # ------------------------------------------------------------------ collectives
    def on_group_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` where this context's collectives can read it (every tensor r1 hands a collective goes through
        here; R1_CHECK_COLLECTIVES=1 asserts it)."""
        t = t.to(self.device)
        _PLACED[id(t)] = t
        return t

    def all_reduce_sum(self, value: float | torch.Tensor) -> float:
        """Sum over the data-parallel group (float64 so that counts stay exact)."""
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def all_reduce_max(self, value: float | torch.Tensor) -> float:
        """Maximum over the data-parallel group."""
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def _all_reduce(self, value: float | torch.Tensor, op) -> float:
        return float(self._reduce(value if isinstance(value, torch.Tensor) else torch.tensor(float(value)), op))

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor summed elementwise over the data-parallel group (float64, on the CPU)."""
        return self._reduce(t, dist.ReduceOp.SUM).cpu()

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        t = t.detach().to(torch.float64)
        if self.distributed and self.dp_size > 1:
            t = self.on_group_device(t.clone())
            dist.all_reduce(t, op=op, group=self.dp_group)
        return t

    def reduce_metric_sums(self, sums: dict) -> dict[str, float]:
        """A step's metric sums over the data-parallel group: keys ending in _max by maximum, the rest by sum (the
        order is fixed, so every rank issues the same collectives)."""
        return {k: (self.all_reduce_max(v) if k.endswith("_max") else self.all_reduce_sum(v))
                for k, v in sorted(sums.items())}

    def all_gather(self, obj) -> list:
        """Every data-parallel rank's `obj`, in dp-rank order."""
        if not (self.distributed and self.dp_size > 1):
            return [obj]
        out = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.dp_group)
        return out

    @property
    def is_replica_leader(self) -> bool:
        """The replica's first rank (TP and CP rank 0 of the first pipeline stage): the one that generates for it."""
        return self.tp_rank == 0 and self.cp_rank == 0 and self.pp_rank == 0

    def share_in_replica(self, obj):
        """The replica leader's `obj` on every rank of its replica: what one rank generated, the others use, so
        the TP / PP ranks of a replica never hold samples that differ (GPU sampling is not bit-reproducible) and
        no prompt is generated TP x PP times."""
        if self.mp_group is None or not self.distributed:
            return obj
        box = [obj if self.is_replica_leader else None]
        dist.broadcast_object_list(box, src=min(dist.get_process_group_ranks(self.mp_group)), group=self.mp_group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


# Tensors placed for a collective by on_group_device. With R1_CHECK_COLLECTIVES=1 every tensor collective called
# from r1's own code (not from megatron's or torch's) must hold one of them: on a CPU, where gloo takes any tensor,
# this is what catches a collective that NCCL would refuse ("No backend type associated with device type cpu").
# (a WeakSet would compare tensors with ==, which is elementwise: keyed by id, checked by identity)
_PLACED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
CHECKED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce")


def add_metric_sums(sums: dict, part: dict) -> None:
    """Add one micro-batch's metric sums into the step's (keys ending in _max keep the largest)."""
    for k, v in part.items():
        if k not in sums:
            sums[k] = v
        elif k.endswith("_max"):
            sums[k] = torch.maximum(torch.as_tensor(sums[k]), torch.as_tensor(v))
        else:
            sums[k] = sums[k] + v


def _tensors(args, kwargs):
    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def check_collectives() -> None:
    """Wrap torch.distributed's tensor collectives so that those r1 calls assert their tensors were placed on the
    process group's device (idempotent)."""
    for name in CHECKED:
        fn = getattr(dist, name)
        if getattr(fn, "_r1_checked", False):
            continue

        @functools.wraps(fn)
        def checked(*args, _fn=fn, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("r1cli.") and not caller.startswith("r1cli.kernels"):
                group = kwargs.get("group")
                gloo = group is not None and dist.get_backend(group) == "gloo"  # a CPU group of its own (the
                # vLLM engine's step agreements): CPU tensors are what it serves, whatever the trainer's backend
                bad = [t for t in _tensors(args, kwargs) if _PLACED.get(id(t)) is not t
                       and not (gloo and t.device.type == "cpu")]
                if bad:
                    raise RuntimeError(f"torch.distributed.{_name} from {caller} on a tensor that was not placed on "
                                       f"the process group's device (DistributedContext.on_group_device): "
                                       f"{tuple(bad[0].shape)} {bad[0].dtype} on {bad[0].device}")
            return _fn(*args, **kwargs)

        checked._r1_checked = True
        setattr(dist, name, checked)


def _close_process_group() -> None:
    """Destroy the process group while the interpreter is whole: a gloo group left to interpreter
    teardown can abort the process (SIGABRT, "terminate called without an active exception") after
    the run has finished."""
    if dist.is_initialized():
        dist.destroy_process_group()


def group_device(device: torch.device, local_rank: int) -> torch.device:
    """The device a process group started for `device` serves: this rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else torch.device("cpu")


def start_process_group(device: torch.device, timeout_min: float = 30.0) -> None:
    """torchrun's process group (gloo on CPU, NCCL on GPU), closed again at exit; a single process gets a group
    of one (megatron-core needs one). A collective waits `timeout_min` for the slowest rank (parallel.timeout_min)."""
    from datetime import timedelta

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(minutes=timeout_min))
    # at exit, after what was created later has closed: a weakref finalizer runs at exit in reverse order of
    # creation, so vLLM's engine (its own finalizer destroys its groups) shuts down before the group goes - an
    # atexit hook ran first and left vLLM's cleanup an already destroyed group ("Invalid process group specified")
    weakref.finalize(dist, _close_process_group)
    if os.environ.get("R1_CHECK_COLLECTIVES") == "1":
        check_collectives()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(device: torch.device, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                  timeout_min: float = 30.0, context_parallel: int = 1) -> DistributedContext:
    """Join torchrun's process group (when launched by torchrun) and build the dp / tp / cp / pp groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = tensor_parallel * context_parallel * pipeline_parallel
    if min(tensor_parallel, pipeline_parallel, context_parallel) < 1:
        raise R1Error("parallel.tensor_parallel, parallel.pipeline_parallel and parallel.context_parallel must be at "
                      "least 1")
    if world % model_parallel:
        raise R1Error(f"{world} processes do not split into tensor_parallel={tensor_parallel} x context_parallel="
                      f"{context_parallel} x pipeline_parallel={pipeline_parallel} replicas")
    if world == 1:
        return DistributedContext()
    start_process_group(device, timeout_min)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    ctx = DistributedContext(dist.get_rank(), dist.get_world_size(), local, tensor_parallel, pipeline_parallel,
                             device=group_device(device, local), cp_size=context_parallel)
    if model_parallel == 1:
        return ctx  # data parallel only: the default group is the dp group
    tp, cp, dp, pp = tensor_parallel, context_parallel, ctx.dp_size, pipeline_parallel
    coords = list(itertools.product(range(tp), range(cp), range(dp), range(pp)))  # (t, c, d, p) of every rank
    me = (ctx.tp_rank, ctx.cp_rank, ctx.dp_rank, ctx.pp_rank)

    def group_of(same: tuple[int, ...]) -> Any:
        """One group per value of the coordinates `same` (indices into (t, c, d, p)), every rank creating every
        group in the same order; returns this rank's."""
        mine = None
        for key in sorted({tuple(x[i] for i in same) for x in coords}):
            g = dist.new_group(sorted(((x[3] * dp + x[2]) * cp + x[1]) * tp + x[0] for x in coords
                                      if tuple(x[i] for i in same) == key))
            if tuple(me[i] for i in same) == key:
                mine = g
        return mine

    ctx.dp_group = group_of((0, 1, 3))  # the ranks that differ in dp only
    ctx.tp_group = group_of((1, 2, 3))
    ctx.cp_group = group_of((0, 2, 3))
    ctx.pp_group = group_of((0, 1, 2))
    ctx.mp_group = group_of((2,))  # one replica
    ctx.grad_group = group_of((0, 3)) if tp * pp > 1 else None  # data x context parallel (TP = PP = 1: the world)
    return ctx
