"""logging.backends: the same scalars and sample tables reach TensorBoard, W&B (offline without a network) and
MLflow (a file store in the run folder), across --resume; a missing package is one line naming the extra."""

import json
import sys

import pytest
from conftest import run_r1

from r1cli.run.metrics import read_metrics


@pytest.mark.slow  # opt-in since the default run passed 15 minutes
def test_scalars_and_samples_reach_every_backend_across_a_resume(cold_start, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the store back, as the run wrote it

    out = tmp_path / "run"
    args = ["rl", "--config", "configs/tiny/zero.yaml", f"model.path={cold_start / 'sft' / 'hf'}",
            f"data.train={cold_start / 'train.jsonl'}", "data.eval=", "grpo.prompts_per_step=4", "rollout.n=4",
            f"train.output_dir={out}", "logging.progress=false", "checkpoint.export_hf=false", "checkpoint.every=1",
            "logging.backends=[jsonl, tensorboard, wandb, mlflow]", "logging.sample_every=1"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = run_r1(*args, "train.steps=2", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "W&B is offline" in first.stderr
    wandb_id, mlflow_id = (out / "wandb_run_id").read_text(), (out / "mlflow_run_id").read_text()
    second = run_r1(*args, "train.steps=3", "--resume", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (out / "wandb_run_id").read_text() == wandb_id and (out / "mlflow_run_id").read_text() == mlflow_id

    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_id, "reward/total"))
    assert history == [(m["step"], pytest.approx(m["reward/total"])) for m in steps]  # one run, steps 1-3
    assert {"samples/step_000001.json", "samples/step_000003.json"} <= {
        f"samples/{a.path.split('/')[-1]}" for a in client.list_artifacts(mlflow_id, "samples")}
    assert client.get_run(mlflow_id).data.params["grpo.prompts_per_step"] == "4"

    table = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in table} == {1, 2, 3} and {"prompt", "completion", "reward"} <= set(table[0])
    runs = list((out / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert runs and all(b"reward/total" in r.read_bytes() and b"samples" in r.read_bytes() for r in runs)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_missing_logger_package_names_the_extra(tmp_path, monkeypatch):
    from r1cli.config import load_config
    from r1cli.errors import R1Error
    from r1cli.run.loggers import LOGGERS

    cfg = load_config(None, [])
    for name in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(R1Error, match=f"pip install 'r1\\[{name}\\]'"):
            LOGGERS.get(name)(tmp_path, cfg, False)
    with pytest.raises(R1Error, match="unknown logger 'wandbb' in logging.backends; did you mean 'wandb'"):
        load_config(None, ["logging.backends=[wandbb]"])
