"""Atomic, verified checkpoint folders.

Every rank writes its part into `step_N.tmp`; rank 0 then writes `manifest.json` (the
run's id, the step, each file's size and sha256) last, fsyncs, renames the folder to
`step_N` and points `latest` at it. A crash mid-write leaves a `.tmp` folder that is
never read. On resume the newest checkpoint whose files match its manifest is used; a
truncated or corrupt one is skipped with the reason, and a missing or dangling
`latest` falls back to scanning the folders. Rotation deletes only the current run's
own older checkpoints, never another run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from r1cli.errors import R1Error

MANIFEST = "manifest.json"
_STEP = re.compile(r"step_(\d+)")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:08d}.tmp"


def begin(run_dir: str | Path, step: int) -> Path:
    d = staging_dir(run_dir, step)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit(run_dir: str | Path, step: int, keep: int, run_id: str) -> Path:
    """Publish a staged checkpoint (manifest last) and drop all but this run's newest `keep`."""
    root = checkpoint_root(run_dir)
    tmp, final = staging_dir(run_dir, step), root / f"step_{step:08d}"
    files = {}
    for f in sorted(tmp.iterdir()):
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
        files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    write_text_atomic(tmp / MANIFEST, json.dumps({"run_id": run_id, "step": step, "files": files}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name)
    _fsync_dir(root)
    if keep > 0:
        mine = [d for d in completed(run_dir) if _run_id(d) == run_id]
        for old in mine[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def completed(run_dir: str | Path) -> list[Path]:
    """Published checkpoint folders, newest step first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and _STEP.fullmatch(d.name)]
    return sorted(found, key=lambda d: int(_STEP.fullmatch(d.name).group(1)), reverse=True)


def _manifest(d: Path) -> dict | None:
    try:
        return json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _run_id(d: Path) -> str | None:
    m = _manifest(d)
    return m.get("run_id") if isinstance(m, dict) else None


def verify(d: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    m = _manifest(d)
    if not isinstance(m, dict) or "files" not in m:
        return "no readable manifest.json (an unfinished or damaged checkpoint)"
    for name, want in m["files"].items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and a line for each newer one skipped. The checkpoint `latest` names
    decides which run is resumed (another run's folders are never candidates); without it (deleted,
    dangling) every folder is."""
    root = checkpoint_root(run_dir)
    candidates = completed(run_dir)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named in candidates and _run_id(named) is not None:
        candidates = [d for d in candidates if _run_id(d) == _run_id(named)]
    skipped = []
    for d in candidates:
        if not (d / MANIFEST).exists() and (d / "trainer.pt").is_file():
            # published by an r1 from before manifests: usable, but nothing to verify it against
            return d, skipped + [f"checkpoint {d.name} has no manifest.json (an older r1 wrote it): not verified"]
        problem = verify(d)
        if problem is None:
            return d, skipped
        skipped.append(f"skipped checkpoint {d.name}: {problem}")
    return None, skipped


def require_latest(run_dir: str | Path, say=print) -> Path:
    d, skipped = latest(run_dir)
    for line in skipped:
        say(line)
    if d is None:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise R1Error(f"--resume: no intact checkpoint under {checkpoint_root(run_dir)}{why}")
    return d


def run_id_of(d: Path) -> str | None:
    return _run_id(d)


def save(trainer, run_dir: str | Path, step: int, keep: int, run_id: str, carry: object = None) -> Path:
    """Every rank writes its part into the staging folder; rank 0 verifies and publishes it. `carry`: this rank's
    loop state beyond the trainer's (an asynchronous run's samples for the next step), resumed by load_carry."""
    p = trainer.parallel
    staging = staging_dir(run_dir, step)
    try:
        if p.is_main:
            begin(run_dir, step)
        p.barrier()
        if carry is not None:
            import torch

            torch.save(carry, staging / f"carry_rank{p.rank}.pt")
        trainer.save(staging, {"step": step})
        final = staging.with_suffix("")
        if p.is_main:
            final = commit(run_dir, step, keep, run_id)
    except OSError as e:  # a full disk: the half-written checkpoint goes, the earlier ones stay
        shutil.rmtree(staging, ignore_errors=True)
        earlier = completed(run_dir)
        kept = f"the checkpoint of {earlier[0].name} is intact: " if earlier else ""
        raise R1Error(f"cannot write the checkpoint of step {step} under {checkpoint_root(run_dir)}: "
                      f"{e.strerror or e}; {kept}free space and continue with --resume") from None
    p.barrier()
    return final


def load_carry(directory: Path, rank: int) -> object:
    """What save(carry=...) wrote for this rank, or None."""
    import torch

    path = Path(directory) / f"carry_rank{rank}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None


def save_rng(directory: Path, rank: int) -> None:
    """This rank's CPU and CUDA generator states, so a resumed run draws what the uninterrupted one drew."""
    import torch

    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               Path(directory) / f"rng_rank{rank}.pt")


def restore_rng(directory: Path, rank: int) -> bool:
    """Restore what save_rng wrote for this rank; False when the checkpoint has none for it."""
    import torch

    path = Path(directory) / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    rng = torch.load(path, weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return True
