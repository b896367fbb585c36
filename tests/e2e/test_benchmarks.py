import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_kernel_benchmark_runs_and_prints_ratios():
    """The benchmark script stays runnable (tiny shapes); its numbers are not asserted here."""
    out = subprocess.run([sys.executable, "benchmarks/grpo_kernels.py", "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loss from logits" in out.stdout and "fused linear" in out.stdout and "vs ours" in out.stdout


@pytest.mark.slow  # CI runs the same command in the vLLM environment as its last step (.ci/run)
def test_the_gpu_suite_runs_every_part_at_tiny_sizes(tmp_path):
    """`benchmarks/gpu_suite.py --tiny`: the command prepared for a lent GPU runs here before one appears. Every part
    reports, no check fails, and only what is not installed in this environment is marked missing."""
    import importlib.util

    report = tmp_path / "suite.md"
    out = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--out", str(report),
                          "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line.split(" | ") for line in report.read_text().splitlines() if line.startswith("| ") and "---" not in
            line][1:]
    parts = {r[0].strip("| ") for r in rows}
    assert parts == {"setup", "collectives", "kernels", "vllm", "megatron", "moe", "rl", "bench_kernels",
                     "bench_rollout"}
    status = {(r[0].strip("| "), r[1]): r[-1].strip(" |") for r in rows}
    assert "FAIL" not in status.values()
    has_vllm = importlib.util.find_spec("vllm") is not None
    for (part, item), s in status.items():
        if s == "missing":
            assert part in ("vllm", "bench_rollout") and not has_vllm or "te layers" in item or \
                item in ("import vllm", "import transformer_engine"), (part, item)
    assert sum(s == "ok" for (p, _), s in status.items() if p == "kernels") == 4
    assert "## bench_kernels" in report.read_text()
