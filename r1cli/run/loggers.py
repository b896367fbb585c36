"""Where a run's scalars and sample tables go besides metrics.jsonl: logging.backends names them.

`jsonl` (metrics.jsonl and samples.jsonl in the run folder) is always written: --resume and `r1 report` read it.
`tensorboard` writes tensorboard/; `wandb` logs to Weights & Biases - offline when api.wandb.ai cannot be reached
(or WANDB_MODE=offline), synced later with `wandb sync`; `mlflow` logs to MLFLOW_TRACKING_URI, else to a local file
store in the run folder (mlruns/). A backend whose package is missing is one line naming the pip extra.
A logger is `factory(run_dir, cfg, resume) -> object` with scalars(step, {name: float}), samples(step, [row]) and
close(); register your own with `@LOGGERS.register("name")` in a plugin.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

from r1cli.errors import missing_extra
from r1cli.registry import Registry

LOGGERS = Registry("logger", "logging.backends")


@LOGGERS.register("jsonl")
class JsonlLogger:
    """metrics.jsonl itself is written by MetricsLog (always); naming it changes nothing."""

    def __init__(self, run_dir, cfg, resume: bool):
        pass

    def scalars(self, step: int, values: dict) -> None:
        pass

    def samples(self, step: int, rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


def _markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                     ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows])


@LOGGERS.register("tensorboard")
class TensorBoardLogger:
    def __init__(self, run_dir, cfg, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def samples(self, step: int, rows: list[dict]) -> None:
        self.writer.add_text("samples", _markdown(rows), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _require(module: str, extra: str):
    """The logger's package, or one line naming the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(module, extra) from None


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@LOGGERS.register("wandb")
class WandbLogger:
    def __init__(self, run_dir, cfg, resume: bool):
        wandb = _require("wandb", "wandb")
        from r1cli.config import to_dict
        from r1cli.run.console import console

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if _reachable("api.wandb.ai") else "offline")
        run_dir = Path(run_dir).resolve()
        ident = run_dir / "wandb_run_id"  # the same W&B run across --resume
        run_id = ident.read_text().strip() if resume and ident.is_file() else uuid.uuid4().hex[:8]
        ident.write_text(run_id)
        self.run = wandb.init(project=cfg.logging.project, name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), mode=mode, config=to_dict(cfg))
        if mode == "offline":
            console.print(f"W&B is offline (no network): `wandb sync {run_dir / 'wandb'}/offline-run-*` uploads "
                          "this run later")

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        cols = list(rows[0])
        self.run.log({"samples": self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])},
                     step=step)

    def close(self) -> None:
        self.run.finish()


@LOGGERS.register("mlflow")
class MLflowLogger:
    def __init__(self, run_dir, cfg, resume: bool):
        import logging

        from r1cli.config import to_dict

        self.mlflow = mlflow = _require("mlflow", "mlflow")
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines would cut through the progress bar
        run_dir = Path(run_dir).resolve()
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run folder, no server, no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it, behind this switch
            mlflow.set_tracking_uri((run_dir / "mlruns").as_uri())
        mlflow.set_experiment(cfg.logging.project)
        ident = run_dir / "mlflow_run_id"  # the same MLflow run across --resume
        if resume and ident.is_file():
            self.run = mlflow.start_run(run_id=ident.read_text().strip())
        else:
            self.run = mlflow.start_run(run_name=run_dir.name)
            flat = _flatten(to_dict(cfg))
            keys = list(flat)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 parameters a call
                mlflow.log_params({k: str(flat[k])[:6000] for k in keys[i: i + 100]})
        ident.write_text(self.run.info.run_id)

    def scalars(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(values, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        self.mlflow.log_dict(rows, f"samples/step_{step:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def finite_scalars(values: dict) -> dict:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
