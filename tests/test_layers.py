"""The core's structure (docs/architecture.md): folders import only downwards, nothing imports in a circle,
and the core never imports Airflow."""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_the_floors_contract_holds():
    # import-linter reads the layers from pyproject.toml; its report names any import that goes upwards.
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_no_module_of_the_core_imports_another_in_a_circle():
    graph = grimp.build_graph("lead_sync", cache_dir=None)
    modules = sorted(graph.modules)
    circles = [(a, b) for a, b in itertools.combinations(modules, 2)
               if graph.chain_exists(importer=a, imported=b) and graph.chain_exists(importer=b, imported=a)
               and not (b.startswith(a + ".") or a.startswith(b + "."))]  # a package and its own modules
    assert circles == []


def test_the_core_imports_no_airflow():
    # External packages appear in grimp's graph as one module each, named for the distribution's top package.
    graph = grimp.build_graph("lead_sync", cache_dir=None, include_external_packages=True)
    assert "airflow" not in graph.modules or graph.find_modules_that_directly_import("airflow") == set()


def test_no_module_of_the_core_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "include" / "lead_sync").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}
