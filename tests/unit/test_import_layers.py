"""The package's import graph: no cycle among r1's modules (counting imports inside functions too - a lazy import
hides a circle, it does not remove it), and every import goes to the same or a lower layer of LAYERS."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the checkout's folders that a wheel installs inside r1cli (r1cli/__init__.py maps them)
MAPPED = ("backends", "kernels", "configs")

# low to high: a module may import its own layer and those before it. The foundation (errors, registries, config,
# completion parsing), then what the commands are made of, then the commands and what runs them.
LAYERS = [
    ["r1cli", "errors", "plugins", "registry", "seeds", "token_batch", "parsing"],
    ["config", "lr_schedule"],
    ["kernels"],
    ["data"],
    ["models"],
    ["run"],
    ["interfaces"],
    ["sandbox"],
    ["tools"],
    ["rewards"],
    ["backends"],
    ["sample"],
    ["eval"],
    ["sft"],
    ["rl"],
    ["coldstart", "distill"],
    ["pipeline"],
    ["cli"],
]


def package_modules() -> dict[str, Path]:
    mods = {}
    for top in ("r1cli", *MAPPED):
        for f in (ROOT / top).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[0] != "r1cli":
                parts.insert(0, "r1cli")
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


def _canonical(name: str) -> str:
    return f"r1cli.{name}" if name.split(".")[0] in MAPPED else name


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The r1 modules `name` imports anywhere in its file (TYPE_CHECKING blocks aside), parents included: importing
    r1cli.a.b runs r1cli/a/__init__.py first."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None)
            if isinstance(child, ast.If) and getattr(test, "id", getattr(test, "attr", "")) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.update(_canonical(a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = _canonical(child.module or "")
                found.add(module)
                found.update(f"{module}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out = set()
    for target in found:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        while target:  # the module and the packages above it
            if target != name and target in mods and not name.startswith(target + "."):
                out.add(target)
            target = target.rpartition(".")[0]
    return out


def graph() -> dict[str, set[str]]:
    mods = package_modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in g.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (each group once, sorted)."""
    reach = {v: reachable(g, v) for v in g}
    groups = {tuple(sorted(w for w in reach[v] if v in reach[w])) for v in g if v in reach[v]}
    return sorted(map(list, groups))


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "r1cli"
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module}: its folder/module '{part}' has no place in LAYERS (add it there)")


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_go_down_the_layers():
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                    for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m))
    assert upward == [], "\n".join(upward)


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "r1cli" / "sample"
    pkg.mkdir(parents=True)
    (pkg / "judge.py").write_text("def f():\n    from .filters import x\n    from r1cli.rewards import y\n")
    mods = {"r1cli": tmp_path / "r1cli/__init__.py", "r1cli.sample": pkg / "__init__.py",
            "r1cli.sample.filters": pkg / "filters.py", "r1cli.sample.judge": pkg / "judge.py",
            "r1cli.rewards": tmp_path / "r1cli/rewards/__init__.py"}
    # its own packages (r1cli, r1cli.sample) are not imports of it
    assert imports_of("r1cli.sample.judge", pkg / "judge.py", mods) == {"r1cli.sample.filters", "r1cli.rewards"}
