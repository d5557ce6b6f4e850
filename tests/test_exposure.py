"""Nothing is exposed or unpickled that should not be.

* README.md and cluster.yaml never bind the Ray dashboard / job API or an MLflow server
  to every interface without auth, and cluster.yaml starts Ray with token auth.
* Every ``torch.load`` in platform/, jobs/, benchmarks/ passes ``weights_only=True``,
  every ``np.load`` passes ``allow_pickle=False``, and YAML is only read safely.

Each checker is also run on bad snippets, so a checker that finds nothing fails.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("platform", "jobs", "benchmarks", "docs")

# ----------------------------------------------------------------- shell text

_ALL_INTERFACES = r"(?:0\.0\.0\.0|::|\[::\]|\*)"
_DASHBOARD_OPEN = re.compile(rf"--dashboard-host(?:=|\s+){_ALL_INTERFACES}(?:\s|$|['\"])")
_MLFLOW = re.compile(r"\bmlflow\s+(?:server|ui)\b")
_MLFLOW_OPEN = re.compile(rf"(?:--host|-h)(?:=|\s+)['\"]?{_ALL_INTERFACES}(?:\s|$|['\"])")
_MLFLOW_AUTH = re.compile(r"--app-name(?:=|\s+)basic-auth")


def shell_commands(text: str) -> list[str]:
    """Logical command lines: backslash continuations joined, YAML folding undone."""
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines()
            if line.strip()]


def exposure_problems(text: str, source: str) -> list[str]:
    """Commands in ``text`` that open the dashboard, the job API or MLflow to the world."""
    problems = []
    for command in shell_commands(text):
        if _DASHBOARD_OPEN.search(command):
            problems.append(f"{source}: dashboard/job API on all interfaces: {command}")
        if "RAY_AUTH_MODE=disabled" in command:
            problems.append(f"{source}: Ray token auth turned off: {command}")
        if _MLFLOW.search(command) and _MLFLOW_OPEN.search(command) and \
                not _MLFLOW_AUTH.search(command):
            problems.append(f"{source}: MLflow on all interfaces without auth: {command}")
    return problems


def cluster_problems(config: dict) -> list[str]:
    """Ray start commands of a launcher config without token auth or a loopback dashboard."""
    problems = exposure_problems("\n".join(_strings(config)), "cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key) or [] if "ray start" in c]
        if not starts:
            problems.append(f"cluster.yaml: {key} starts no Ray")
        for command in starts:
            if not re.search(r"\bRAY_AUTH_MODE=token\b", command):
                problems.append(f"cluster.yaml: {key}: ray start without RAY_AUTH_MODE=token")
            if "--head" in command and not re.search(
                    r"--dashboard-host(?:=|\s+)(?:127\.0\.0\.1|localhost)\b", command):
                problems.append(f"cluster.yaml: {key}: dashboard not bound to 127.0.0.1")
    return problems


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# ----------------------------------------------------------------- python code

_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> full dotted name, from the module's imports."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _resolve(node: ast.AST, aliases: dict[str, str]) -> str:
    dotted = _dotted(node)
    head, _, rest = dotted.partition(".")
    full = aliases.get(head, head)
    return f"{full}.{rest}" if rest else full


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def _safe_loader_classes(tree: ast.AST, aliases: dict[str, str]) -> set[str]:
    """Classes defined here that derive from a safe yaml loader."""
    safe = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {_resolve(b, aliases) for b in node.bases}
            if any(b.startswith("yaml.") and b.split(".")[-1] in _SAFE_YAML_LOADERS
                   for b in bases):
                safe.add(node.name)
    return safe


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Pickle-capable loads in Python ``source``: each as 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    safe_classes = _safe_loader_classes(tree, aliases)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = _resolve(base, aliases)
                if name.startswith("yaml.") and name.endswith("Loader") and \
                        name.split(".")[-1] not in _SAFE_YAML_LOADERS:
                    problems.append(f"{filename}:{node.lineno}: YAML loader {node.name} "
                                    f"derives from unsafe {name}")
        if not isinstance(node, ast.Call):
            continue
        func = _resolve(node.func, aliases)
        where = f"{filename}:{node.lineno}"
        if func == "torch.load" and _keyword(node, "weights_only") is not True:
            problems.append(f"{where}: torch.load without weights_only=True")
        elif func in ("numpy.load", "np.load") and _keyword(node, "allow_pickle") is not False:
            problems.append(f"{where}: np.load without allow_pickle=False")
        elif func in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
                      "yaml.full_load_all"):
            problems.append(f"{where}: {func} (use yaml.safe_load)")
        elif func in ("yaml.load", "yaml.load_all"):
            loader = node.args[1] if len(node.args) > 1 else _keyword(node, "Loader")
            name = _resolve(loader, aliases) if isinstance(loader, ast.AST) else ""
            if name.split(".")[-1] not in _SAFE_YAML_LOADERS | safe_classes:
                problems.append(f"{where}: {func} with loader {name or 'None'} (use "
                                "yaml.safe_load)")
        elif func in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads",
                      "mlflow.pytorch.load_model"):
            problems.append(f"{where}: {func} runs code from the file")
    return problems


# ----------------------------------------------------------------- the checks


def test_readme_and_cluster_yaml_expose_nothing() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))
    problems = exposure_problems(readme, "README.md") + cluster_problems(cluster)
    assert problems == []
    # The README tells people how to reach the cluster without opening it.
    assert "ray dashboard cluster.yaml" in readme and "RAY_AUTH_MODE=token" in readme


def test_code_loads_nothing_that_can_run_code() -> None:
    files = [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30  # the scan really covers the code base
    problems = [p for f in files
                for p in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert problems == []


@pytest.mark.parametrize("snippet", [
    "ray start --head --dashboard-host=0.0.0.0",
    "ray start --head \\\n    --dashboard-host 0.0.0.0 --port=6379",
    "mlflow server --backend-store-uri postgresql://db/mlflow --host 0.0.0.0",
    "mlflow ui -h 0.0.0.0 --port 5000",
    "mlflow server --host '::'",
    "RAY_AUTH_MODE=disabled ray start --head",
])
def test_exposure_checker_catches_bad_commands(snippet: str) -> None:
    assert exposure_problems(snippet, "snippet")


@pytest.mark.parametrize("snippet", [
    "ray start --head --dashboard-host=127.0.0.1",
    "mlflow server --host 10.0.0.10 --port 5000",
    "mlflow server --app-name basic-auth --host 0.0.0.0",
    "mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1",
])
def test_exposure_checker_accepts_private_commands(snippet: str) -> None:
    assert exposure_problems(snippet, "snippet") == []


def test_cluster_checker_catches_missing_auth_and_open_dashboard() -> None:
    good = yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))
    assert cluster_problems(good) == []
    no_token = {**good, "worker_start_ray_commands": [
        c.replace("RAY_AUTH_MODE=token", "") for c in good["worker_start_ray_commands"]]}
    assert any("RAY_AUTH_MODE=token" in p for p in cluster_problems(no_token))
    open_head = {**good, "head_start_ray_commands": [
        c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
        for c in good["head_start_ray_commands"]]}
    assert len(cluster_problems(open_head)) == 2  # open, and not on loopback
    default_host = {**good, "head_start_ray_commands": [
        c.replace("--dashboard-host=127.0.0.1", "") for c in good["head_start_ray_commands"]]}
    assert cluster_problems(default_host)


@pytest.mark.parametrize("snippet,what", [
    ("import torch\nstate = torch.load(path)\n", "torch.load without weights_only"),
    ("import torch\nstate = torch.load(path, weights_only=False)\n", "torch.load without"),
    ("from torch import load\nstate = load(path, map_location='cpu')\n", "torch.load without"),
    ("import numpy as np\na = np.load(path, mmap_mode='r')\n", "np.load without"),
    ("import numpy\na = numpy.load(path, allow_pickle=True)\n", "np.load without"),
    ("import yaml\nd = yaml.load(text, Loader=yaml.Loader)\n", "yaml.load with loader"),
    ("import yaml\nd = yaml.unsafe_load(text)\n", "yaml.unsafe_load"),
    ("import yaml as y\nd = y.full_load(text)\n", "yaml.full_load"),
    ("import yaml\nclass L(yaml.FullLoader):\n    pass\n", "unsafe yaml.FullLoader"),
    ("import pickle\nobj = pickle.loads(blob)\n", "pickle.loads"),
])
def test_load_checker_catches_unsafe_loads(snippet: str, what: str) -> None:
    problems = unsafe_loads(snippet, "bad.py")
    assert problems and what in problems[0] and problems[0].startswith("bad.py:")


def test_load_checker_accepts_safe_loads() -> None:
    snippet = (
        "import numpy as np, torch, yaml\n"
        "class Strict(yaml.SafeLoader):\n    pass\n"
        "a = np.load(p, mmap_mode='r', allow_pickle=False)\n"
        "s = torch.load(p, map_location='cpu', weights_only=True)\n"
        "d = yaml.safe_load(t)\n"
        "e = yaml.load(t, Loader=Strict)\n"
        "f = yaml.load(t, yaml.SafeLoader)\n"
    )
    assert unsafe_loads(snippet, "good.py") == []
