"""Configs ship inside the package: `configs/...` resolves from any folder, a file that exists where the user stands
wins, and `r1 configs` lists exactly what is shipped."""

from pathlib import Path

import pytest
from conftest import ROOT, run_r1

from r1cli.config import CONFIG_DIR, load_config, resolve_config, shipped_configs
from r1cli.errors import R1Error


def test_every_yaml_of_the_checkout_is_shipped():
    folder = ROOT / "configs"
    on_disk = sorted(f"configs/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*.yaml"))
    assert on_disk and shipped_configs() == on_disk


def test_shipped_names_resolve_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("configs/zero.yaml") == CONFIG_DIR / "zero.yaml"
    assert resolve_config("tiny/sft.yaml") == CONFIG_DIR / "tiny" / "sft.yaml"  # the configs/ prefix is optional
    assert load_config("configs/zero.yaml").rollout.n == 16


def test_a_file_where_the_user_stands_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "zero.yaml").write_text("rollout: {n: 3}\n")
    assert load_config("configs/zero.yaml").rollout.n == 3


def test_a_missing_config_names_the_listing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(R1Error, match=r"config file not found: configs/nope.yaml \(shipped configs: `r1 configs`\)"):
        load_config("configs/nope.yaml")


def test_r1_configs_lists_and_prints():
    listing = run_r1("configs")
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()] == shipped_configs()
    shown = run_r1("configs", "students/qwen-7b")
    assert shown.returncode == 0 and shown.stdout == (CONFIG_DIR / "students" / "qwen-7b.yaml").read_text()
    missing = run_r1("configs", "nope")
    assert missing.returncode == 2 and "config file not found: nope.yaml" in missing.stderr


def test_the_distill_presets_and_the_pipeline_default_come_from_the_shipped_folder():
    from r1cli.distill.presets import STUDENTS
    from r1cli.pipeline import DEFAULT

    assert STUDENTS == CONFIG_DIR / "students" and DEFAULT == CONFIG_DIR / "tiny" / "r1.yaml"
    assert Path(CONFIG_DIR).is_dir()
