"""Count the tensor memory a kernel call needs at full size, without a GPU and without data.

The call runs under FakeTensorMode (tensors carry shapes and dtypes, no storage) with
torch's MemTracker counting every live tensor, and every Triton launch does nothing: the
launchers allocate their outputs in torch before launching, so the count is the same.
What it leaves out is what the CUDA caching allocator and cuBLAS workspaces add on top;
a GPU's max_memory_allocated is the measured figure, this is the model of it.
"""

from __future__ import annotations

from unittest import mock

import torch


def counted_peak(fn, make_inputs) -> int:
    """Peak bytes of live tensors during `fn(*inputs)` and the backward of its first output's sum, above
    the inputs themselves; `make_inputs()` builds the inputs (called under fake mode, so any size is free)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from triton.runtime.jit import KernelInterface

    with mock.patch.object(KernelInterface, "__getitem__", lambda self, grid: (lambda *a, **k: None)):
        with FakeTensorMode():
            args = make_inputs()
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tracker = MemTracker()
            tracker.track_external(*tensors)
            with tracker:
                out = fn(*args)
                (out[0] if isinstance(out, tuple) else out).sum().backward()
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
            return peak - sum(t.numel() * t.element_size() for t in tensors)
