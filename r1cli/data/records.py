"""Read and write rows of a data set: JSONL (one object a line) and Parquet, from local paths."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from r1cli.errors import R1Error


def read_records(path: str, max_samples: int = 0) -> list[dict]:
    """All rows of a local JSONL or Parquet file; a malformed line names file and line."""
    if not path:
        raise R1Error("no data file given (set data.train)")
    p = Path(path)
    if not p.is_file():
        raise R1Error(f"data file not found: {path}")
    if p.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise R1Error(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    else:
        rows = []
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise R1Error(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise R1Error(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
                rows.append(row)
                if max_samples and len(rows) >= max_samples:
                    break
    if max_samples:
        rows = rows[:max_samples]
    if not rows:
        raise R1Error(f"data file is empty: {path}")
    return rows


def field(row: dict, name: str, path: str, index: int):
    """row[name], or an error that names the file, the row and the fields it does have."""
    if name not in row:
        raise R1Error(f"{path}: row {index + 1} has no field '{name}' (it has: {', '.join(row)}); "
                      f"map the right column with data.*_field")
    return row[name]


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write atomically (temp file, then rename); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
