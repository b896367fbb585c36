"""Fails unless every row of a gpu_suite report is ok, measured, info, or missing for what the machine is not
meant to hold (vLLM, Transformer Engine): an import error of anything else is a wheel benchmarks/gpu_wheels.txt
lacks, or an import r1 made that it should not need."""

import sys

ABSENT = ("vllm", "transformer_engine", "te layers", "liger")
rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in open(sys.argv[1])
        if line.startswith("| ") and "---" not in line][1:]
bad = [r for r in rows if r[-1] == "FAIL" or r[-1] == "missing" and not any(a in " ".join(r[:3]).lower()
                                                                             for a in ABSENT)]
bad += [r for r in rows if r[-1] not in ("ok", "measured", "info", "missing")]
for r in bad:
    print("bad row:", " | ".join(r))
print(f"{len(rows)} rows, {len(bad)} bad")
sys.exit(1 if bad or not rows else 0)
