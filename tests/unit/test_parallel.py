"""backends/parallel.py: every collective r1 calls reads a tensor on the device the process group serves. On gloo
the CPU takes any tensor, so the check mode (R1_CHECK_COLLECTIVES=1, on in every test process) is what catches a
collective that NCCL would refuse - the metric reduction that built a CPU float64 scalar did, on every GPU run."""

import subprocess
import sys

import torch
from conftest import ROOT

CODE = """
import torch, torch.distributed as dist
from r1cli.backends.parallel import DistributedContext, start_process_group
start_process_group(torch.device("cpu"))  # a gloo group of one, with the check on
scope = {"__name__": "r1cli.rl.somewhere", "dist": dist}
exec("def reduce(t):\\n    dist.all_reduce(t)\\n", scope)
ctx = DistributedContext(device=torch.device("cpu"))
scope["reduce"](ctx.on_group_device(torch.ones(3)))  # placed: fine (several elements: no == on tensors)
try:
    scope["reduce"](torch.ones(1))
except RuntimeError as e:
    print("refused:", e)
dist.all_reduce(torch.ones(1))  # torch's or megatron's own collectives are not r1's to check
"""


def test_a_collective_on_a_tensor_not_placed_for_the_group_is_refused():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**__import__("os").environ, "R1_CHECK_COLLECTIVES": "1"})
    assert proc.returncode == 0, proc.stderr
    assert ("refused: torch.distributed.all_reduce from r1cli.rl.somewhere on a tensor that was not placed on the "
            "process group's device (DistributedContext.on_group_device): (1,) torch.float32 on cpu") in proc.stdout


def test_the_group_device_is_the_ranks_gpu_under_nccl():
    import torch

    from r1cli.backends.parallel import DistributedContext, group_device

    assert group_device(torch.device("cuda"), 3) == torch.device("cuda", 3)
    assert group_device(torch.device("cpu"), 3) == torch.device("cpu")
    assert DistributedContext().device == torch.device("cpu")


def test_collectives_wait_parallel_timeout_min_not_nccls_ten_minutes(monkeypatch):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from r1cli.backends import parallel
    from r1cli.config import load_config

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(parallel.weakref, "finalize", lambda obj, fn: None)  # no teardown of the stand-in group
    monkeypatch.setenv("RANK", "0")  # as under torchrun (else a group of one is set up in os.environ)
    cfg = load_config("configs/tiny/zero.yaml", ["parallel.timeout_min=45"])
    parallel.start_process_group(torch.device("cuda"), cfg.parallel.timeout_min)
    assert seen == {"backend": "nccl", "timeout": timedelta(minutes=45)}
    assert load_config("configs/tiny/zero.yaml", []).parallel.timeout_min == 30


def _metric_sums_worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), R1_CHECK_COLLECTIVES="1")
    from r1cli.backends.parallel import add_metric_sums, init_parallel

    ctx = init_parallel(torch.device("cpu"))
    sums: dict = {}
    for micro in range(2):  # two micro-batches, then the ranks
        add_metric_sums(sums, {"loss": torch.tensor(float(rank + micro)), "mismatch_max": torch.tensor(rank * 10.0
                                                                                                         + micro)})
    torch.save(ctx.reduce_metric_sums(sums), f"{out}/rank{rank}.pt")


def test_metric_sums_add_up_and_maxima_stay_maxima_over_micro_batches_and_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_metric_sums_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # loss: (0 + 1) + (1 + 2); mismatch_max: max(0, 1, 10, 11)
        assert torch.load(tmp_path / f"rank{rank}.pt") == {"loss": 4.0, "mismatch_max": 11.0}
