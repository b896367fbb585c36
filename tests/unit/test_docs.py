"""The documentation cannot drift from the code: the generated references are current and complete, every `r1`
command shown in the README or on the site parses against the real command tree with its config and overrides
loaded, and the README stays a short front page."""

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from r1cli.cli import main
from r1cli.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
# the pages a reader copies commands from (the generated references show usage lines, not commands)
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if p.parent.name != "reference")]


def config_keys(obj=None, prefix=""):
    for f in dataclasses.fields(obj or Config()):
        value = getattr(obj or Config(), f.name)
        if dataclasses.is_dataclass(value):
            yield from config_keys(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_the_generated_references_are_current():
    """In a fresh interpreter: registered names in this process may include test plugins."""
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_the_configuration_reference_lists_every_key_with_a_note():
    rows = {}
    for line in (ROOT / "docs/reference/config.md").read_text().splitlines():
        m = re.match(r"\| `([\w.]+)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2).split(" | ")
    keys = list(config_keys())
    assert len(keys) > 150 and sorted(rows) == sorted(keys)
    undocumented = [k for k, cells in rows.items() if not cells[-1].strip()]
    assert undocumented == [], "give these fields a comment in r1cli/config/: " + ", ".join(undocumented)


def test_the_command_reference_lists_every_command_and_option():
    text = (ROOT / "docs/reference/cli.md").read_text()

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), cmd

    for name, cmd in walk(main, ["r1"]):
        assert f"## `{name}`" in text
        section = text.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert f"`{p.opts[0]}`" in section, (name, p.opts)


def shown_commands():
    """(page:line, argv after `r1`) for every r1 command in a fenced code block, continuation lines joined; also
    under torchrun (-m r1cli.cli), after environment assignments and after `&&`."""
    out = []
    for page in PAGES:
        lines, fenced, i = page.read_text().split("\n"), False, 0
        while i < len(lines):
            line, where = lines[i], f"{page.relative_to(ROOT)}:{i + 1}"
            if line.strip().startswith("```"):
                fenced = not fenced
            elif fenced and re.search(r"(^|[\s;&|])r1 |-m r1cli\.cli ", line):
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split, lexer.commenters = True, "#"
                commands, argv, redirect = [], [], False
                for word in lexer:
                    if word in ("&&", "||", ";", "|", "&"):
                        commands.append(argv)
                        argv = []
                    elif word in (">", ">>", "<", "2>", ">&", "2>&"):
                        redirect = True  # the next word is the redirection's file
                    elif redirect:
                        redirect = False
                    else:
                        argv.append(word)
                for argv in commands + [argv]:
                    if "r1cli.cli" in argv:
                        out.append((where, argv[argv.index("r1cli.cli") + 1:]))
                    else:
                        argv = [w for w in argv if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]
                        if argv[:1] == ["r1"]:
                            out.append((where, argv[1:]))
            i += 1
    return out


COMMANDS = shown_commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) > 60 and any(argv[:1] == ["rl"] for _, argv in COMMANDS)


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_command_shown_parses_and_its_config_loads(where, argv, tmp_path, monkeypatch):
    """The subcommand and its options exist and take the values shown (click parses without running the command);
    a shipped config it names exists, and the config with the overrides shown loads (every key and value
    checked). A config file of the reader's own (not under configs/) is replaced by the defaults."""
    cmd, args, ctx = main, list(argv), click.Context(main, info_name="r1")
    while isinstance(cmd, click.Group):
        name, cmd, args = cmd.resolve_command(ctx, args)
        ctx = click.Context(cmd, info_name=name, parent=ctx)
    ctx = cmd.make_context(ctx.info_name, args, parent=ctx.parent)
    params = ctx.params
    config = params.get("config_path")
    if config and config.startswith("configs/"):
        assert (ROOT / config).is_file(), f"{where}: {config} does not exist"
    if ctx.info_name == "pipeline" or "overrides" not in params:
        return
    overrides = [o for o in params["overrides"] if ":" not in o.split("=", 1)[0]]  # pipeline stage overrides aside
    own = config and not config.startswith("configs/")
    plugins = [o for o in overrides if o.startswith("plugins=")]
    if plugins:  # the reader's plugin file: the page shows it as a python block starting with `# PATH`
        monkeypatch.chdir(tmp_path)
        page = (ROOT / where.split(":")[0]).read_text()
        for path in plugins[0].split("=", 1)[1].strip("[]").split(","):
            block = re.search(rf"```python\n# {re.escape(path.strip())}\n(.*?)```", page, re.S)
            assert block, f"{where}: the page shows no python block for {path}"
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(block.group(1))
    config = str(ROOT / config) if config and not own else None
    load_config(config, overrides)


def test_a_wrong_command_fails_the_check(tmp_path, monkeypatch):
    args = (tmp_path, monkeypatch)
    with pytest.raises(click.NoSuchOption):
        test_every_command_shown_parses_and_its_config_loads("x", ["rl", "--confg", "configs/tiny/zero.yaml"], *args)
    with pytest.raises(AssertionError):
        test_every_command_shown_parses_and_its_config_loads("x", ["rl", "--config", "configs/tiny/zerro.yaml"], *args)
    from r1cli.errors import R1Error

    with pytest.raises(R1Error, match="unknown config key"):
        test_every_command_shown_parses_and_its_config_loads("x", ["sft", "grpo.betta=0"], *args)


def test_the_readme_is_a_short_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "pip install torch==2.13.0 && pip install -e . -c constraints.txt && r1 pipeline" in text
    assert "pip install -e \".[dev]\" -c constraints.txt && python -m pytest -q" in text


def test_the_readmes_links_reach_files():
    """The site's own links are checked by `mkdocs build --strict` (CI); the README sits outside it."""
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert local and [link for link in local if not (ROOT / link).exists()] == []
