"""Read and write rows of a data set from local paths: JSONL (one object a line), Parquet, Arrow, a folder of such
files, or a folder written by `datasets.Dataset.save_to_disk` (read with pyarrow; the datasets package is not
needed). `read_data` also renames columns as data.columns maps them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from r1cli.errors import R1Error

MAX_LINE_BYTES = 64 << 20  # data.max_line_mb's default: one JSONL line is read whole into memory


class Records(list):
    """Rows of one file that remember where each came from, so that an error can name file:line."""

    def __init__(self, rows, path: str, lines: list[int]):
        super().__init__(rows)
        self.path, self.lines = path, lines

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Records(super().__getitem__(i), self.path, self.lines[i])
        return super().__getitem__(i)

    def where(self, i: int) -> str:
        line = self.lines[i]  # a line number, or "file:line" for rows read from a folder
        return f"{self.path}/{line}" if isinstance(line, str) else f"{self.path}:{line}"

    def value(self, i: int, name: str, key: str = ""):
        """Row i's field `name`, or an error that names the file, line and the fields the row does have."""
        row = self[i]
        if name not in row:
            hint = f"; map the right column with {key}" if key else ""
            raise R1Error(f"{self.where(i)}: row has no field '{name}' (it has: {', '.join(row) or 'nothing'}){hint}")
        return row[name]

    def require(self, name: str, key: str) -> None:
        """Every row has field `name` (set by config key `key`)."""
        for i in range(len(self)):
            self.value(i, name, key)


DATA_SUFFIXES = (".jsonl", ".parquet", ".pq", ".arrow")


def _saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` folder in order (None for an ordinary folder); a DatasetDict folder is
    an error naming its splits."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise R1Error(f"{folder} holds a DatasetDict ({', '.join(splits)}): name one split's folder, e.g. "
                      f"{folder / (splits[0] if splits else 'train')}")
    if not (folder / "state.json").is_file():
        return None
    try:
        names = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise R1Error(f"{folder / 'state.json'}: not a datasets save_to_disk state ({e})") from None
    return [folder / n for n in names]


def _read_arrow(p: Path) -> list[dict]:
    """An Arrow IPC stream (what save_to_disk writes) or file."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(p)) as source:
            try:
                return pa.ipc.open_stream(source).read_all().to_pylist()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all().to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise R1Error(f"{p}: not a readable Arrow file ({type(e).__name__}: {e})") from None


def _read_folder(folder: Path, max_samples: int, max_line_bytes: int | None) -> Records:
    """Every JSONL / Parquet / Arrow file of a folder (a save_to_disk folder: its own files, in order), in name
    order, as one set of rows."""
    saved = _saved_dataset_files(folder)
    files = saved if saved is not None else \
        sorted(f for f in folder.iterdir() if f.suffix in DATA_SUFFIXES and f.is_file())
    if not files:
        raise R1Error(f"data folder {folder} has no .jsonl, .parquet or .arrow files")
    rows, lines = [], []
    for f in files:
        part = read_records(str(f), max_samples - len(rows) if max_samples else 0, max_line_bytes)
        rows += part
        lines += [f"{f.name}:{n}" for n in part.lines]
        if max_samples and len(rows) >= max_samples:
            break
    return Records(rows, str(folder), lines)


def read_records(path: str, max_samples: int = 0, max_line_bytes: int | None = None) -> Records:
    """All rows of a local JSONL or Parquet file (or of every such file in a folder); a malformed line names file
    and line. JSONL lines are read one at a time, at most max_line_bytes each: one enormous line is an error, not
    an exhausted memory."""
    if not path:
        raise R1Error("no data file given (set data.train)")
    # the limit is data.max_line_mb where a caller passes it; elsewhere (eval, prepare) a fixed one with no option
    hint = "raise data.max_line_mb if it is meant to be" if max_line_bytes else "the most r1 reads as one line"
    p = Path(path)
    if p.is_dir():
        return _read_folder(p, max_samples, max_line_bytes)
    max_line_bytes = max_line_bytes or MAX_LINE_BYTES
    if not p.is_file():
        raise R1Error(f"data file not found: {path}")
    rows, lines = [], []
    if p.suffix == ".arrow":
        rows = _read_arrow(p)
        lines = list(range(1, len(rows) + 1))  # row numbers
    elif p.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
            raise R1Error(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        lines = list(range(1, len(rows) + 1))  # row numbers
    else:
        with p.open("rb") as f:
            lineno = 0
            while not (max_samples and len(rows) >= max_samples):
                raw = f.readline(max_line_bytes + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    raise R1Error(f"{path}:{lineno}: line longer than {max_line_bytes >> 20} MiB ({hint})")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise R1Error(f"{path}:{lineno}: not UTF-8 (byte {e.start + 1} of the line)") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise R1Error(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise R1Error(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
                rows.append(row)
                lines.append(lineno)
    if max_samples:
        rows, lines = rows[:max_samples], lines[:max_samples]
    if not rows:
        raise R1Error(f"data file is empty: {path}")
    return Records(rows, path, lines)


def read_data(path: str, data, max_samples: int = 0) -> Records:
    """read_records with the DataConfig's line limit, each row's columns renamed as data.columns maps them
    ({"problem": "prompt"}: the source's `problem` is read as `prompt`)."""
    rows = read_records(path, max_samples, data.max_line_mb << 20)
    if data.columns:
        for i, row in enumerate(rows):
            rows[i] = {data.columns.get(k, k): v for k, v in row.items()}
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write atomically (temp file, then rename); returns the row count. A failed write leaves nothing behind."""
    path = Path(path)
    if path.is_dir():
        raise R1Error(f"{path} is a folder; give a file name such as {path / 'data.jsonl'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
