"""What megatron-core assumes about CUDA, mapped to the CPU, for gloo runs on machines without a GPU (CI, laptops).

Loaded only by the megatron backend when there is no GPU. Measured with megatron-core 0.16.1:
  - tensors made with device="cuda" / torch.cuda.current_device() (rotary frequencies, pipeline p2p buffers,
    the global memory buffer): a TorchFunctionMode maps every CUDA device argument to the CPU, and
    torch.cuda.current_device() answers "cpu";
  - torch.cuda.synchronize() and stream waits: no-ops; the MoE all-to-all dispatcher's side stream (made with
    torch.cuda.Stream, entered with torch.cuda.stream) is one that does nothing, as the CPU runs all in order,
    and its split sizes become numpy arrays as its copy to the host makes them on a GPU;
  - its optimizers and gradient clipping sort parameters by `tensor.type()` name and accept only
    "torch.cuda.*Tensor": `Tensor.type()` (no argument) answers the CUDA name of a CPU tensor's type;
  - its RNG tracker forks the CUDA RNG state: `model_parallel_cuda_manual_seed` is replaced by a tracker
    that forks the CPU RNG state (tensor-parallel dropout then draws on the CPU generator);
  - activation recompute saves and restores the CUDA generator around each checkpointed layer: there is
    none, so that state is empty (the CPU generator and the tracker's states are saved beside it); and it
    re-runs the layer inside the backward pass, where the function mode above is not in force, so the
    default causal mask (made with device="cuda") is made on the CPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _InOrderStream:
    """A CUDA stream's interface for code that overlaps copies on a side stream: on the CPU all work is in order."""

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return self  # an event that is already done: synchronize() returns at once

    def synchronize(self) -> None:
        pass


def install() -> None:
    """Once per process, before megatron builds anything."""
    global _installed
    if _installed:
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    CudaToCpu().__enter__()  # for the life of the process
    from megatron.core.tensor_parallel import random as mrandom

    def cpu_seed(seed: int, *args, **kwargs) -> None:
        from megatron.core import parallel_state as ps

        tracker = mrandom.get_cuda_rng_tracker()
        tracker.reset()
        torch.manual_seed(seed)
        tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718)
        ep_rank = ps.get_expert_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank)

    class CpuForkTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            gen = torch.Generator().manual_seed(seed)
            self.states_[name] = gen.get_state()
            self.seeds_.add(seed)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _InOrderStream()  # its side stream to the host
    to_host = token_dispatcher.maybe_move_tensor_to_cpu

    def splits_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        """The split sizes the all-to-all takes as numpy arrays: what the GPU path's copy to the host makes them."""
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return to_host(tensor, as_numpy, record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = splits_to_host

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mutils

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    mutils.get_default_causal_mask = fused_softmax.get_default_causal_mask = causal_mask
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._CUDA_RNG_STATE_TRACKER = CpuForkTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.model_parallel_cuda_manual_seed = cpu_seed
    _installed = True
