"""The edge benchmark is split into small modules, its child entry stays torch-free, its report renders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _eclm_testutil import ROOT

EDGE_MODULES = ["edge_bench", "edge_common", "edge_setup", "edge_sections", "edge_children", "edge_baselines",
                "edge_report"]

# Runs `python -m bench.edge_bench --child ...`'s imports in a fresh interpreter where torch, the exporter and
# cloud_sync cannot be imported (as in the edge venv), and lists what got imported.
CHILD_IMPORTS = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "exporter", "cloud_sync", "scipy"):
            raise ImportError(f"{name} is not in the edge venv")
        return None

sys.meta_path.insert(0, Block())
import bench.edge_bench as eb
import bench.edge_children as ec
print(json.dumps({"children": sorted(eb.CHILDREN),
                  "edge_children_home": sorted({eb.CHILDREN[m].__module__
                                                for m in ("edge-memory", "predict", "serve-nodelay", "train-ort")}),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "exporter", "cloud_sync"))}))
"""


@pytest.mark.parametrize("name", EDGE_MODULES)
def test_each_edge_benchmark_module_is_under_400_lines(name: str) -> None:
    lines = (ROOT / "bench" / f"{name}.py").read_text().count("\n")
    assert lines <= 400, f"bench/{name}.py has {lines} lines"


def test_the_child_entry_imports_without_torch_exporter_or_cloud_sync() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD_IMPORTS], capture_output=True, text=True, cwd=str(ROOT),
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["children"] == ["edge-memory", "predict", "serve-nodelay", "torch-memory", "train-ort", "train-torch"]
    assert got["edge_children_home"] == ["bench.edge_children"]
    assert got["loaded"] == []


def test_help_lists_every_option_with_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.edge_bench", "--help"], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    for opt in ("--out", "--quick", "--work", "--only", "--serving-copy-max-mb", "--edge-venv",
                "--ort-training-venv"):
        assert opt in out.stdout
    assert "/tmp/eclm-edge-venv" in out.stdout and "--child" not in out.stdout


def test_the_report_renders_every_section_of_a_stored_result() -> None:
    from bench.edge_report import goals, preface, tables

    res = json.loads((ROOT / "docs" / "benchmarks" / "edge.json").read_text())
    doc = preface(res) + "\n" + goals(res) + "\n## Tables\n\n" + tables(res)
    assert doc.startswith("# Edge runtime benchmark\n")
    for heading in ("## Goals", "## Tables", "**A. Peak RSS", "**B. Predict overhead", "**D. Training step"):
        assert heading in doc
