"""aoq's layers import one way, and only ``aoq.cluster`` imports Ray or MLflow.

The import graph is read from the source with ``ast`` (imports inside functions count
too), so the rule holds for what the code says, not for what a test run happened to
import. The layers, bottom to top, are documented in docs/architecture.md.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "platform" / "aoq"

#: Bottom to top. A unit (subpackage, or top-level module) may import only units listed
#: before it. ``atomic`` and ``storage`` are file utilities every layer may use; ``cli``
#: is the command-line glue of ``jobs/``.
LAYERS = ("atomic", "storage", "config", "data", "models", "search", "losses", "negatives",
          "evaluation", "training", "inspection", "cluster", "cli")
#: Third-party packages that only the cluster layer may import.
CLUSTER_ONLY = ("ray", "mlflow")


def _unit(path: Path, root: Path) -> str:
    rel = path.relative_to(root).parts
    return rel[0].removesuffix(".py")


def _imported_modules(node: ast.AST, package: list[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = package[: len(package) - node.level + 1]
            return [".".join(base + ([node.module] if node.module else []))]
        return [node.module or ""]
    return []


def _function_import_lines(tree: ast.AST) -> set[int]:
    """Line numbers of import statements inside a function or method body."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines |= {sub.lineno for sub in ast.walk(node)
                      if isinstance(sub, (ast.Import, ast.ImportFrom))}
    return lines


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(unit -> units it imports, problems that are not about the graph's shape).

    The problems are Ray/MLflow imported outside ``cluster`` and aoq modules imported
    inside functions (aoq's own imports go at module top, so a reader sees every edge).
    """
    edges: dict[str, set[str]] = {}
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        unit = _unit(path, root)
        if unit == "__init__":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = _function_import_lines(tree)
        package = ["aoq", *path.relative_to(root).parts[:-1]]
        for node in ast.walk(tree):
            for name in _imported_modules(node, package):
                parts = name.split(".")
                where = f"{path.relative_to(root.parent)}:{node.lineno}"
                if parts[0] in CLUSTER_ONLY and unit != "cluster":
                    problems.append(f"{where}: imports {name} outside aoq.cluster")
                if parts[0] != "aoq" or len(parts) < 2:
                    continue
                if node.lineno in in_function:
                    problems.append(f"{where}: imports {name} inside a function "
                                    "(aoq's own imports go at module top)")
                if parts[1] != unit:
                    edges.setdefault(unit, set()).add(parts[1])
    return edges, problems


def layer_violations(edges: dict[str, set[str]], layers: tuple[str, ...] = LAYERS
                     ) -> list[str]:
    """Every cycle between units, every import of a higher layer, every unknown unit."""
    rank = {name: i for i, name in enumerate(layers)}
    out = [f"{unit} is not a known layer (add it to LAYERS and docs/architecture.md)"
           for unit in sorted(set(edges) | set().union(*edges.values())) if unit not in rank]

    def reaches(a: str, b: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n}))
                   for n in edges.get(a, ()))

    cycles = sorted({tuple(sorted(pair)) for pair in itertools.permutations(edges, 2)
                     if reaches(*pair) and reaches(pair[1], pair[0])})
    out += [f"cycle: {a} <-> {b}" for a, b in cycles]
    for unit, targets in sorted(edges.items()):
        for target in sorted(targets):
            if unit in rank and target in rank and rank[target] >= rank[unit]:
                out.append(f"upward import: {unit} imports {target}")
    return out


def check(root: Path) -> list[str]:
    edges, problems = import_graph(root)
    return layer_violations(edges) + problems


def test_aoq_layers_import_one_way() -> None:
    assert check(ROOT) == []


def test_every_unit_is_a_documented_layer() -> None:
    units = {_unit(p, ROOT) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert units <= set(LAYERS)
    doc = (ROOT.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert all(f"`{name}" in doc for name in LAYERS)


# ------------------------------------------------------------ the checker itself


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "aoq"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {"__init__.py": "", "config/__init__.py": "", "data/__init__.py": "",
         "data/prepare.py": "from aoq.config import load_config\n",
         "training/__init__.py": "", "training/steps.py": "import torch\n",
         "cluster/__init__.py": "", "cluster/job.py": "import ray\nimport aoq.training\n"}


def test_the_checker_accepts_a_clean_tree(tmp_path: Path) -> None:
    assert check(_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(("extra", "expected"), [
    ({"config/loader.py": "from aoq.data.prepare import x\n"},
     "upward import: config imports data"),
    ({"config/loader.py": "from ..training import steps\n"},
     "upward import: config imports training"),
    ({"data/prepare.py": "from aoq.training.steps import x\n",
      "training/steps.py": "from aoq.data.prepare import y\n"},
     "cycle: data <-> training"),
    ({"training/steps.py": "import mlflow\n"}, "imports mlflow outside aoq.cluster"),
    ({"data/prepare.py": "def f():\n    import ray.train\n"}, "imports ray.train outside"),
    ({"training/steps.py": "def f():\n    from aoq.data import prepare\n"},
     "inside a function"),
    ({"viz/plot.py": "import aoq.config\n"}, "viz is not a known layer"),
])
def test_the_checker_catches(tmp_path: Path, extra: dict[str, str], expected: str) -> None:
    problems = check(_tree(tmp_path, {**CLEAN, **extra}))
    assert any(expected in p for p in problems), problems
