"""The install users make, checked from an empty folder: the installed r1 (not the checkout) answers the commands
that need shipped files, and every module of it imports (those of an optional extra fail only for lack of it)."""

import importlib
import subprocess
from pathlib import Path

import r1cli

OPTIONAL = {"megatron", "triton", "vllm", "transformer_engine", "liger_kernel"}  # the extras' import names

home = Path(r1cli.__file__).resolve().parent
assert "site-packages" in home.parts, f"r1cli imports from {home}, not from an installed copy"
assert not Path("configs").exists(), "run this from an empty folder"


def r1(*args: str) -> str:
    proc = subprocess.run(["r1", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"r1 {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


assert "Usage" in r1("--help")
assert "fits" in r1("distill", "--student", "qwen-7b", "--data", "teacher.jsonl", "--dry-run", "--gpus", "8")
zero = r1("rl", "--config", "configs/zero.yaml", "--print-config")
assert "n: 16" in zero and "ref_update_every: 400" in zero, zero
listed = r1("configs").split()
for name in ("configs/zero.yaml", "configs/tiny/r1.yaml", "configs/students/qwen-7b.yaml"):
    assert name in listed, f"{name} not among the shipped configs: {listed}"

# every module file: pkgutil's walk would skip backends/, kernels/ and configs/, which are namespace folders
modules = sorted("r1cli." + ".".join(p.relative_to(home).with_suffix("").parts).removesuffix(".__init__")
                 for p in home.rglob("*.py"))
for folder in ("backends", "kernels", "configs"):
    assert (home / folder).is_dir(), f"the wheel lacks r1cli/{folder}"
bad = []
for name in modules:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in OPTIONAL:
            bad.append(f"{name}: {e}")
    except ImportError as e:
        bad.append(f"{name}: {e}")
assert not bad, "modules of the installed copy that do not import:\n" + "\n".join(bad)
print(f"installed r1 at {home}: commands and {len(modules)} modules ok")
