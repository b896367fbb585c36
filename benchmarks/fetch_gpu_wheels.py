"""Download the wheels benchmarks/gpu_suite.py needs on a machine that holds only torch and Triton
(benchmarks/gpu_wheels.txt), built for that machine's Python and platform, and check that together they fit one
device call (the lent GPU machines' 64 MiB carry, less the checkout).

    python benchmarks/fetch_gpu_wheels.py --out wheels --python 3.12      # the lent H100/H200 image: Python 3.12
    python benchmarks/fetch_gpu_wheels.py --out wheels                    # this machine's Python (CI's bare venv)

On the GPU machine: pip install --no-deps wheels/*.whl && python benchmarks/gpu_suite.py --wheels wheels --out ...
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

LIST = Path(__file__).with_name("gpu_wheels.txt")
MAX_MB = 40.0  # of the 64 MiB a device call carries: the checkout and the run's outputs need the rest


def wanted() -> list[str]:
    return [ln.split("#")[0].strip() for ln in LIST.read_text().splitlines() if ln.split("#")[0].strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the wheels")
    ap.add_argument("--python", help="the target's Python as X.Y (default: this one's)")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64", help="the target's platform tag")
    ap.add_argument("--max-mb", type=float, default=MAX_MB)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out)]
    if args.python:
        major, minor = args.python.split(".")[:2]
        cmd += ["--python-version", f"{major}.{minor}", "--implementation", "cp", "--abi", f"cp{major}{minor}",
                "--platform", args.platform,
                *(f"--platform={tag}" for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "linux_x86_64"))]
    subprocess.run(cmd + wanted(), check=True)
    names = {w.split("==")[0].lower().replace("-", "_").replace(".", "_") for w in wanted()}
    found = [w for w in sorted(out.glob("*.whl")) if w.name.split("-")[0].lower() in names]
    missing = names - {w.name.split("-")[0].lower() for w in found}
    total = sum(w.stat().st_size for w in found) / 2**20
    for w in found:
        print(f"{w.stat().st_size / 2**20:6.1f} MB  {w.name}")
    print(f"{total:6.1f} MB  in {len(found)} wheels (limit {args.max_mb:.0f} MB)")
    if missing:
        print(f"not downloaded: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    if total > args.max_mb:
        print(f"{total:.1f} MB is over the {args.max_mb:.0f} MB one device call can carry beside the checkout: "
              "drop a wheel from benchmarks/gpu_wheels.txt", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
