"""The versions CI has proven, and what moved since.

    python .ci/versions.py freeze [FILE]   write the environment's exact versions as a constraints file
                                           (default constraints.txt): run in CI's environment after a green run
    python .ci/versions.py diff [FILE]     print the installed versions that differ from the constraints file,
                                           and the releases that r1's upper bounds keep out (to try next)

`diff` is what CI's unconstrained step prints before and after its tests, so a failure there names the package
that moved. Only the standard library and `packaging` (pip's own) are used: it runs in any environment.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# torch is installed first by its own command (the CPU or the CUDA build, README: Install), and a CUDA build pins its
# own Triton (bounded in pyproject.toml instead); the project itself; the installers
LEFT_OUT = {"torch", "triton", "r1", "pip", "setuptools", "wheel"}
HEADER = """\
# The exact versions of the environment in which CI last passed (Python {py}, {platform}), written there by
# `python .ci/versions.py freeze {name}`. The README's install commands and .ci/run use it (pip install ... -c {name}).
# torch and Triton are left out: torch is installed first, by its own command, and its CUDA builds pin their own
# Triton. To move to newer versions: docs/install.md, "Tested versions".
"""

def _name(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def installed() -> dict[str, str]:
    return {_name(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}


def read_constraints(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def freeze(path: Path) -> None:
    import platform

    rows = sorted((n, v) for n, v in installed().items() if n not in LEFT_OUT)
    text = HEADER.format(py=platform.python_version(), platform=f"{platform.system()} {platform.machine()}",
                         name=path.name)
    path.write_text(text + "".join(f"{n}=={v}\n" for n, v in rows))
    print(f"{path}: {len(rows)} exact versions")


def bounded() -> dict[str, str]:
    """r1's dependencies that carry an upper bound (pyproject.toml), name -> specifier."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    out = {}
    for r in map(Requirement, reqs):
        if any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier):
            out[_name(r.name)] = str(r.specifier)
    return out


def newest_release(name: str) -> str | None:
    """The newest release on the index pip uses (None where the index cannot be asked)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, "--json"],
                              capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout)["latest"] if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError):
        return None


def diff(path: Path) -> None:
    from packaging.specifiers import SpecifierSet

    pins, now = read_constraints(path), installed()
    moved = [(n, pins[n], now[n]) for n in sorted(now) if n in pins and pins[n] != now[n]]
    new = [(n, now[n]) for n in sorted(now) if n not in pins and n not in LEFT_OUT]
    print(f"versions that differ from {path.name} ({len(moved)} moved, {len(new)} not in it):")
    for n, was, is_ in moved:
        print(f"  {n}: {was} -> {is_}")
    for n, is_ in new:
        print(f"  {n}: (new) {is_}")
    held = []
    for n, spec in bounded().items():
        latest = newest_release(n)
        if latest and latest not in SpecifierSet(spec, prereleases=False):
            held.append(f"  {n}: {latest} is out, r1 allows {spec}")
    print(f"releases r1's upper bounds keep out ({len(held)}): " + ("" if held else "none"))
    print("\n".join(held))


if __name__ == "__main__":
    command, file = (sys.argv[1:] + [""])[:2] if len(sys.argv) > 1 else ("", "")
    target = Path(file) if file else ROOT / "constraints.txt"
    if command == "freeze":
        freeze(target)
    elif command == "diff":
        diff(target)
    else:
        sys.exit(__doc__)
