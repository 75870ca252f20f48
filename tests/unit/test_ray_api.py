"""raypose reaches Ray through its public API only; the few names it cannot (raypose.cluster.ray_internals)
are checked against the Ray in use here, so a Ray release that changes one fails these tests
instead of a user's run.

Scans raypose's own source (every module but raypose/cluster/ray_internals.py) for Ray names that start
with `_`, `ray.core.generated`, `internal_kv` and Ray names that Ray marks DeveloperAPI."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "raypose"
ISOLATED = PACKAGE / "cluster" / "ray_internals.py"


def _sources():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p != ISOLATED]


def _ray_imports(path: Path):
    """(module, name or None, line) for every import of a Ray module or name in path."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ray" or alias.name.startswith("ray."):
                    yield alias.name, None, node.lineno
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module == "ray" or node.module.startswith("ray."))
        ):
            for alias in node.names:
                yield node.module, alias.name, node.lineno


def test_no_private_ray_module_or_name_outside_the_isolated_module():
    found = []
    for path in _sources():
        for module, name, line in _ray_imports(path):
            parts = module.split(".") + ([name] if name else [])
            if any(p.startswith("_") for p in parts) or "generated" in parts:
                found.append(f"{path.name}:{line} {module} {name or ''}")
        text = path.read_text()
        for needle in ("internal_kv", "ray.core.generated", "ray._private", "._internal"):
            for n, line in enumerate(text.splitlines(), 1):
                code = line.split("#", 1)[0]
                if needle in code:
                    found.append(f"{path.name}:{n} {needle}")
    assert found == []


def test_no_developer_api_outside_the_isolated_module():
    """Ray appends "**DeveloperAPI:**" to the docstring of what it marks so."""
    found = []
    for path in _sources():
        for module, name, line in _ray_imports(path):
            if name is None:
                continue
            obj = getattr(importlib.import_module(module), name, None)
            if obj is None:  # a submodule imported by name
                obj = importlib.import_module(f"{module}.{name}")
            if "**DeveloperAPI:**" in (getattr(obj, "__doc__", None) or ""):
                found.append(f"{path.name}:{line} {module}.{name}")
    assert found == []


def test_the_isolated_names_are_what_raypose_expects():
    """Each name of raypose.cluster.ray_internals exists in this Ray and still does what raypose relies
    on; an import that fails here fails the test (raypose.cluster.ray_internals has no fallback)."""
    import inspect

    import ray.train

    from raypose.cluster import ray_internals

    # the file name raypose looks for; test_train_ray checks that a real run writes it
    assert ray_internals.CHECKPOINT_RECORD == "checkpoint_manager_snapshot.json"
    assert issubclass(ray_internals.TuneReportCallback, ray.train.UserCallback)
    assert inspect.signature(ray_internals.TuneReportCallback).parameters == {}
    for hook in (
        "suggest",
        "on_trial_result",
        "on_trial_complete",
        "save",
        "restore",
        "set_search_properties",
    ):
        assert callable(getattr(ray_internals.Searcher, hook)), hook
    assert "address" in inspect.signature(ray_internals.list_actors).parameters
    assert issubclass(ray_internals.ServerUnavailable, Exception)
    assert "bundles" in inspect.signature(ray_internals.request_resources).parameters


def test_every_run_is_a_torch_trainer(tiny_data, tmp_path):
    from ray.train.torch import TorchTrainer

    from raypose.cluster.driver import preflight
    from raypose.train.run import build_trainer
    from tests.support import tiny_config

    cfg = tiny_config(tiny_data, tmp_path / "exp")
    trainer = build_trainer(cfg, "run", preflight(cfg))
    assert type(trainer) is TorchTrainer


@pytest.mark.parametrize("workers", ["1:2"])
def test_elastic_groups_follow_the_ray_release(tiny_data, tmp_path, workers):
    """MIN:MAX workers run where Ray Train is elastic and are refused in one line elsewhere."""
    from raypose.cluster.driver import elastic_supported, preflight
    from raypose.config import ConfigError, set_workers
    from tests.support import tiny_config

    cfg = tiny_config(tiny_data, tmp_path / "exp")
    set_workers(cfg, workers, "--workers", {})
    if elastic_supported():
        preflight(cfg)
    else:
        with pytest.raises(ConfigError, match="elastic worker groups need Ray 2.55 or later"):
            preflight(cfg)
