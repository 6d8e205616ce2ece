"""Dependencies point one way, imports inside functions included, and every third-party
import is declared in ``pyproject.toml``.

Layers, lowest first: the core (vocabulary, formats, backends, features), the models
(``neuroshard.models``), the TorchRec adapter (conversions and an estimator over a model),
then search and pretrain side by side (neither imports the other), and on top the
application (planner, CLI, report, the TorchRec planner). A module may import its own
layer or lower ones; the module graph has no cycle.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The installed layout: pretrain/ and search/ install as neuroshard.pretrain / .search.
PACKAGE_DIRS = {
    "neuroshard": ROOT / "neuroshard",
    "neuroshard.pretrain": ROOT / "pretrain",
    "neuroshard.search": ROOT / "search",
}

APP = {
    "neuroshard",
    "neuroshard.planner",
    "neuroshard.cli",
    "neuroshard.report",
    "neuroshard.torchrec_planner",
}
LAYERS = {"core": 0, "models": 1, "adapter": 2, "search": 3, "pretrain": 3, "app": 4}


def layer_of(module: str) -> str:
    if module in APP:
        return "app"
    for prefix, layer in (
        ("neuroshard.models", "models"),
        ("neuroshard.search", "search"),
        ("neuroshard.pretrain", "pretrain"),
        ("neuroshard.torchrec_adapter", "adapter"),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "core"


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "neuroshard" and parts and parts[0] in ("pretrain", "search", "data"):
                continue
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: Path) -> set[str]:
    """Every ``neuroshard`` module ``path`` imports, at any depth of the file."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in out if m == "neuroshard" or m.startswith("neuroshard.")}


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for module, path in known.items():
        # ``from pkg import name`` names a module only when pkg.name is one
        edges[module] = {m for m in imports_of(module, path) if m in known} - {module}
    return edges


def test_the_walker_sees_imports_inside_functions():
    edges = graph()
    assert "neuroshard.models" in edges["neuroshard.planner"]
    assert "neuroshard.search.surco" in edges["neuroshard.search.polish"]  # inside a function


def test_every_import_points_down_the_layers():
    wrong = sorted(
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
        for a, targets in graph().items()
        for b in targets
        if LAYERS[layer_of(b)] > LAYERS[layer_of(a)]
        or {layer_of(a), layer_of(b)} == {"search", "pretrain"}
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


# Import name -> the distribution that provides it, where they differ.
DISTRIBUTIONS = {
    "yaml": "pyyaml",
    "fbgemm_gpu": "fbgemm-gpu-cpu",
    "grpc": "grpcio",
    "sklearn": "scikit-learn",
}


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    names = set()
    for spec in specs:
        name = spec.split(";")[0]
        for sep in "<>=![ ~":
            name = name.split(sep)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def test_every_third_party_import_is_declared():
    have = declared()
    missing = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "neuroshard":
                    continue
                dist = DISTRIBUTIONS.get(top, top).lower().replace("_", "-")
                if dist not in have:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
