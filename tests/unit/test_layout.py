"""r1cli reaches backends only through the registries; backends never import the loops or the CLI."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _imports(folder: str) -> dict[str, set[str]]:
    out = {}
    for path in (ROOT / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def test_no_import_cycle_between_r1cli_and_backends():
    for path, names in _imports("r1cli").items():
        assert not any(n.startswith("r1cli.backends") for n in names), path
    loops = ("r1cli.cli", "r1cli.rl.loop", "r1cli.sft.loop", "r1cli.run.harness")
    for folder in ("backends", "kernels"):
        for path, names in _imports(folder).items():
            assert not any(n.startswith(loops) for n in names), path


def test_loading_the_loops_loads_no_backend():
    code = ("import sys, r1cli.cli, r1cli.rl.loop, r1cli.sft.loop, r1cli.interfaces\n"
            "bad = [m for m in sys.modules if m.startswith('r1cli.backends') or m.split('.')[0] in "
            "('megatron', 'vllm', 'transformer_engine')]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(ROOT))
    assert proc.returncode == 0, proc.stderr
