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


# what a dependency may pull in is part of the namespace: the checkout's root is sys.path[0] under `python -m pytest`,
# `python -c`, `python -m r1cli.cli` and torchrun started there, ahead of site-packages
ROOT_ENTRIES = sorted(p.name.removesuffix(".py") for p in ROOT.iterdir()
                      if not p.name.startswith(".") and (p.suffix == ".py" or (p.is_dir() and any(p.rglob("*.py")))))


def test_no_folder_at_the_root_but_r1cli_is_a_regular_package():
    """A folder with an __init__.py wins over an installed package of its name; one without is a namespace portion,
    which loses to it. transformers >= 5.25 imports PyPI's `kernels`, which kernels/__init__.py once hid."""
    regular = [name for name in ROOT_ENTRIES if name != "r1cli" and (ROOT / name / "__init__.py").exists()]
    assert not regular, f"top-level folders that would hide a PyPI package of their name: {regular}"


def _origin_from_root(name: str) -> str:
    code = f"import importlib.util as u; s = u.find_spec({name!r}); print(s.origin if s and s.origin else '')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_installed_packages_are_not_hidden_by_the_checkout():
    """Every installed distribution's import name that is also a name at the checkout's root (kernels: Hugging
    Face's kernel hub, a dependency of transformers) imports from site-packages when run from the root."""
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()
    assert "kernels" in installed, "PyPI's kernels is not installed: the dev extra brings it for this test"
    clashing = [name for name in ROOT_ENTRIES if name in installed and name != "r1cli"]
    assert "kernels" in clashing
    for name in clashing:
        origin = _origin_from_root(name)
        ours = (ROOT / name, ROOT / f"{name}.py")
        assert origin and not any(Path(origin).resolve().is_relative_to(p) for p in ours), (name, origin)


def test_transformers_kernel_hub_imports_from_the_root():
    proc = subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_subpackages_import_from_a_bare_checkout(tmp_path):
    """r1cli.kernels / .backends / .configs from the checkout on PYTHONPATH alone (no install: the GPU machine's
    plain checkout), run from another folder."""
    import os

    code = ("import r1cli, r1cli.kernels.ops, r1cli.backends.torch_trainer, r1cli.config as c; "
            "print(r1cli.kernels.ops.__file__, c.CONFIG_DIR)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path += {_site_paths()!r}; {code}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernels_file, configs = proc.stdout.split()
    assert Path(kernels_file) == ROOT / "kernels" / "ops.py" and Path(configs) == ROOT / "configs"


def _site_paths() -> list[str]:
    """site-packages without its .pth files (python -S), so the editable install's finder is not there."""
    import site

    return site.getsitepackages()
