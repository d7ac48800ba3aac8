"""The import direction the layout promises, and a clean lint."""

import ast
import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FORBIDDEN = {
    "fedsim": {"clients", "server", "experiments"},
    "clients": {"server", "experiments"},
    "server": {"clients", "experiments"},
}


def imported_packages(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = set(imported_packages(path)) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_report_reads_files_only():
    assert not {"server", "clients", "flwr", "torch"} & set(
        imported_packages(ROOT / "fedsim" / "report.py")
    )


def test_ruff_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff not installed (./install.sh --dev installs it)")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_ruff_format_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff not installed (./install.sh --dev installs it)")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout
