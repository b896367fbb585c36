"""What defines a folder's results, recorded beside them, so that results are never continued, skipped or reported
under different inputs.

An identity is a flat mapping: content fingerprints of the model and data (not their paths: a model moved
elsewhere is the same model) and the config keys that shape the results (`a.b` -> value). The first run writes
it; a later run into the same folder must match it, or it is refused in one line that says what changed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

from r1cli.errors import R1Error

WHOLE = 8 << 20  # files up to this size are hashed whole; larger ones by size and three 1 MB windows
WINDOW = 1 << 20


def fingerprint(path: str | Path) -> str:
    """A content hash of a file or a folder (every file under it, by relative name); "" for an empty path."""
    if not str(path):
        return ""
    p = Path(path).expanduser()
    if not p.exists():
        return f"missing:{p}"
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= WHOLE:
                h.update(fh.read())
            else:
                for at in (0, size // 2, size - WINDOW):
                    fh.seek(at)
                    h.update(fh.read(WINDOW))
    return h.hexdigest()[:16]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(obj) if isinstance(obj, tuple) else obj}


def config_fields(cfg, sections: list[str], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config keys under `sections` (`a` or `a.b`), less those matching an `ignore` pattern."""
    out: dict[str, Any] = {}
    for name in sections:
        obj = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        out.update(flatten(obj, name + "."))
    return {k: v for k, v in out.items() if not any(fnmatch.fnmatchcase(k, pat) for pat in ignore)}


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def matches(record: str | Path, fields: dict[str, Any]) -> bool:
    """Whether `record` exists and holds exactly `fields`."""
    try:
        return json.loads(Path(record).read_text()) == json.loads(json.dumps(fields))
    except (OSError, json.JSONDecodeError):
        return False


def check(record: str | Path, fields: dict[str, Any], what: str, fix: str) -> None:
    """Write `record` the first time; later, refuse if `fields` differ from it, naming what changed."""
    record = Path(record)
    fields = json.loads(json.dumps(fields))  # as JSON would give them back
    if record.is_file():
        try:
            before = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            before = None
        if isinstance(before, dict):
            changed = [k for k in sorted(set(before) | set(fields)) if before.get(k) != fields.get(k)]
            if changed:
                said = ", ".join(f"{k} {_show(before.get(k, '(unset)'))} -> {_show(fields.get(k, '(unset)'))}"
                                 for k in changed[:4])
                more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
                raise R1Error(f"{what} holds results made with other inputs ({said}{more}); {fix}")
            return
    write(record, fields)


def write(record: str | Path, fields: dict[str, Any]) -> None:
    """Record `fields` as what the results beside `record` are made from (replacing an earlier record)."""
    from r1cli.run.checkpoint import write_text_atomic

    record = Path(record)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(fields, indent=1, sort_keys=True))


# keys that change how a command runs, not what it produces (or paths whose content is fingerprinted instead)
HOW = ("*.out", "model.path", "data.train", "data.eval", "data.max_samples", "data.max_line_mb", "train.output_dir",
       "train.steps", "train.device", "train.kernels", "rollout.engine", "rollout.vllm.*",
       "rollout.prompts_per_generate", "rollout.timeout_s", "rollout.start_timeout_s", "rewards.timeout_s",
       "coldstart.generator",
       "coldstart.exemplars", "sample.judge", "rewards.model.path", "rewards.judge.path", "distill.teacher",
       "distill.student", "distill.chunk_tokens", "critic.path")


def of_config(cfg, sections: list[str], paths: dict[str, str]) -> dict[str, Any]:
    """The content of the files named in `paths` (config key -> path) and the config under `sections`."""
    fields: dict[str, Any] = {f"{key} (content)": fingerprint(path) for key, path in paths.items() if path}
    fields.update(config_fields(cfg, sections, HOW))
    return fields
