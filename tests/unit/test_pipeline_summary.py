"""r1 pipeline's closing table reads in an 80-column terminal: paths inside the pipeline's folder are printed
relative to it (the title names the folder) and a long one wraps instead of being cut with an ellipsis."""

from rich.console import Console

from r1cli import pipeline
from r1cli.pipeline import Pipeline


def test_the_final_table_fits_80_columns_without_cutting_paths(tmp_path, monkeypatch):
    root = tmp_path / "runs" / "tiny-moe-pipeline-with-a-long-name"
    results = [
        {"stage": "coldstart", "command": "coldstart", "model": str(tmp_path / "runs/tiny-model"),
         "made_model": str(root / "coldstart/hf"), "seconds": 35, "eval/accuracy": 0.25},
        {"stage": "rejection-sampling", "command": "sample", "model": str(root / "reasoning-rl/hf"),
         "made_data": str(root / "rejection-sampling/samples-of-every-prompt-kept.jsonl"), "seconds": 15},
    ]
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    monkeypatch.setattr(pipeline, "console", console)
    pipeline._summary(Pipeline(output_dir=str(root), stages=[], report=False), results, tmp_path / "none.json")
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text
    # each column's text, its wrapped pieces joined in order
    columns: dict[int, str] = {}
    for line in text.splitlines():
        if line.startswith("│"):
            for i, cell in enumerate(line.strip("│").split("│")):
                columns[i] = columns.get(i, "") + cell.strip()
    made, came_from = columns[3], columns[2]
    assert made == "coldstart/hf" + "rejection-sampling/samples-of-every-prompt-kept.jsonl"
    assert came_from == str(tmp_path / "runs/tiny-model") + "reasoning-rl/hf"  # outside the folder: as given
