"""r1cli/plugins.py: a user's files and modules named in the config register their rewards and checkers before the
config's names are checked; a broken plugin is one line naming it."""

import pytest

from r1cli.config import load_config
from r1cli.errors import R1Error
from r1cli.rewards import REWARDS, TASKS, RewardContext, score

PLUGIN = '''
from r1cli.rewards import reward, task
from helper import LIMIT  # a sibling module of the plugin file


@reward("{name}")
def short(completion, row, ctx):
    return float(len(completion) <= LIMIT)


@task("{name}_task")
def checker(completion, row, ctx):
    return float(completion.strip() == row["answer"])
'''


def _plugin(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "helper.py").write_text("LIMIT = 3\n")
    (folder / "rewards.py").write_text(PLUGIN.format(name=name))
    return folder / "rewards.py"


def test_a_plugin_beside_the_config_file_registers_before_the_names_are_checked(tmp_path, monkeypatch):
    _plugin(tmp_path / "task", "plug_short")
    (tmp_path / "task" / "run.yaml").write_text("plugins: [rewards.py]\nrewards:\n  weights: {plug_short: 1.0}\n")
    monkeypatch.chdir(tmp_path.parent)  # not where the plugin is: it is found beside the config file
    try:
        cfg = load_config(str(tmp_path / "task" / "run.yaml"))
        assert cfg.plugins == [str((tmp_path / "task" / "rewards.py").resolve())]  # resolved for --resume
        s = score(["abc", "abcd"], [{}, {}], cfg.rewards.weights, RewardContext())
        assert s.total == [1.0, 0.0]
        assert TASKS.get("plug_short_task")("7 ", {"answer": "7"}, RewardContext()) == 1.0
    finally:
        REWARDS.unregister("plug_short")
        TASKS.unregister("plug_short_task")


def test_without_the_plugin_the_name_is_unknown_and_a_function_can_be_named_directly(tmp_path):
    with pytest.raises(R1Error, match="unknown reward 'plug_other' in rewards.weights"):
        load_config(None, ["rewards.weights={plug_other: 1.0}"])
    path = _plugin(tmp_path / "other", "plug_other")
    ref = f"{path}:short"
    try:
        cfg = load_config(None, [f"rewards.weights={{'{ref}': 2.0}}"])
        assert score(["ab"], [{}], cfg.rewards.weights, RewardContext()).total == [2.0]
    finally:
        REWARDS.unregister(ref)
        REWARDS.unregister("plug_other")
        TASKS.unregister("plug_other_task")


def test_a_broken_or_missing_plugin_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def oops(:\n")
    with pytest.raises(R1Error, match=r"plugin .*bad.py failed to import: SyntaxError"):
        load_config(None, [f"plugins=[{bad}]"])
    with pytest.raises(R1Error, match="plugin file not found: .*nowhere.py"):
        load_config(None, [f"plugins=[{tmp_path / 'nowhere.py'}]"])
    with pytest.raises(R1Error, match="plugin module 'no_such_module_r1' cannot be imported"):
        load_config(None, ["plugins=[no_such_module_r1]"])
    (tmp_path / "plain.py").write_text("X = 1\n")
    with pytest.raises(R1Error, match="has no 'missing'"):
        load_config(None, [f"rewards.weights={{'{tmp_path / 'plain.py'}:missing': 1.0}}"])
