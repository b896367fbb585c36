"""Every option a message or help text names exists: a hint that points nowhere (`--resume` for a command
without it, `data.max_line_mb` where nothing reads it) sends a user looking for something that is not there."""

import ast
import dataclasses
import re
from pathlib import Path

from r1cli.config import MOVED, RENAMED, Config

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "plugins"]
KEY = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)}|pipeline)\.([a-z_]+(?:\.[a-z_]+)*)\b(?![.(/\w-])")
FILES = {"jsonl", "json", "yaml", "safetensors", "pt", "bin", "py", "html", "txt", "gz", "csv", "arrow", "parquet",
         "md", "tmp", "lock", "done"}
PIPELINE = {"output_dir", "seed", "prepare", "report"}
OLD_NAMES = set(MOVED) | set(RENAMED) | {"train.eval_"}  # still accepted, with a note saying where they went


def _exists(section: str, path: list[str]) -> bool:
    if section == "pipeline":
        return path[0] in PIPELINE and len(path) == 1
    obj = Config()
    for part in [section, *path]:
        if isinstance(obj, dict):
            return True  # a mapping section (rewards.weights.NAME, data.columns.NAME): any name
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def _strings(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_every_config_key_named_in_the_code_exists():
    bad = []
    for f in sorted((ROOT / "r1cli").rglob("*.py")) + sorted((ROOT / "backends").rglob("*.py")):
        for line, text in _strings(f):
            for m in KEY.finditer(text):
                parts = m.group(2).split(".")
                if parts[-1] in FILES or m.group(0) in OLD_NAMES or m.group(0) == "pipeline.key":
                    continue
                if m.group(1) == "model" and f.parts[-3:][0] in ("backends", "megatron"):
                    continue  # Hugging Face tensor names (model.norm.weight), not options
                if not _exists(m.group(1), parts):
                    bad.append(f"{f.relative_to(ROOT)}:{line}: {m.group(0)}")
    assert not bad, "messages name options that do not exist:\n" + "\n".join(bad)


def test_a_huge_line_in_a_benchmark_names_no_option_eval_lacks(tmp_path):
    from r1cli.data.records import read_records
    from r1cli.errors import R1Error

    big = tmp_path / "bench.jsonl"
    big.write_bytes(b'{"a": "' + b"x" * (65 << 20) + b'"}\n')
    try:
        read_records(str(big))  # as r1 eval reads a benchmark: no data.max_line_mb there
    except R1Error as e:
        assert "data.max_line_mb" not in str(e) and "the most r1 reads as one line" in str(e)
    else:
        raise AssertionError("a 65 MB line was read")
