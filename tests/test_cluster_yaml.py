"""cluster.yaml passes Ray's own launcher validation, and broken copies of it do not."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def load_cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it launches anything (docs/cluster.md), offline."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _flag(commands: list[str], name: str) -> str | None:
    """The value of ``--name=value`` in a list of shell commands, if present."""
    for command in commands:
        for token in shlex.split(command.replace(";", " ")):
            if token.startswith(f"--{name}="):
                return token.split("=", 1)[1]
    return None


def _bytes(size: str) -> int:
    """Docker's --shm-size syntax (``20g``, ``512m``) to bytes."""
    m = re.fullmatch(r"(\d+)([kmg]?)", size.lower())
    assert m, size
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def test_cluster_yaml_passes_ray_validation() -> None:
    prepared = ray_validate(load_cluster())
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    head = types[prepared["head_node_type"]]
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p"))
                           for t in workers)
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)  # autoscaling
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for t in workers)


def test_setup_installs_the_project_as_the_readme_does() -> None:
    config = load_cluster()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = "python -m pip install -e ."
    assert install in readme
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(cmd.strip().endswith(install) for cmd in config[key]), key
    cpu_torch = next(c for c in config["head_setup_commands"] if "torch==" in c)
    assert cpu_torch in readme.replace("\n", " ").replace("  ", " ") or \
        re.search(r"pip install torch==[\d.]+ --index-url\s+https://download.pytorch.org/whl/cpu",
                  readme)
    assert "~/aoq" in config["file_mounts"] and ".git" in config["rsync_exclude"]


@pytest.mark.parametrize("role,start", [("head", "head_start_ray_commands"),
                                        ("worker", "worker_start_ray_commands")])
def test_shared_memory_fits_the_object_store(role: str, start: str) -> None:
    config = load_cluster()
    store = _flag(config[start], "object-store-memory")
    shm = _flag(config["docker"][f"{role}_run_options"], "shm-size")
    assert store is not None and shm is not None
    assert int(store) < _bytes(shm), f"{role}: object store {store} B > /dev/shm {shm}"


def _broken(mutate) -> dict[str, Any]:
    config = load_cluster()
    mutate(config)
    return config


@pytest.mark.parametrize("name,mutate", [
    ("misspelt top-level key", lambda c: c.update(max_worker=c.pop("max_workers"))),
    ("head type not defined", lambda c: c.update(head_node_type="no_such_type")),
    ("min_workers above max_workers", lambda c: c.update(max_workers=0) or
     c["available_node_types"]["gpu_spot"].update(min_workers=2)),
    ("node type without node_config", lambda c: c["available_node_types"]["gpu_spot"]
     .pop("node_config")),
    ("resources not a mapping", lambda c: c["available_node_types"]["head"]
     .update(resources="CPU=0")),
])
def test_broken_copies_are_rejected(name: str, mutate) -> None:
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(_broken(mutate))


def test_the_real_file_would_fail_if_broken_on_disk(tmp_path: Path) -> None:
    """The same check on a file: a copy with one typo is refused by Ray's validator."""
    import jsonschema

    text = CLUSTER_YAML.read_text(encoding="utf-8").replace("head_node_type:", "head_node_typ:")
    bad = tmp_path / "cluster.yaml"
    bad.write_text(text)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(yaml.safe_load(bad.read_text()))
