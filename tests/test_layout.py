"""The import direction the layout promises, one public face per package, and a clean lint.

Data moves config -> data -> (dp) -> models -> clients -> server -> results, and the
imports point the same way: a package may import only the packages listed for it below.
Outside a core package (data, dp, models, results), only its public face (``fedsim.data``,
not ``fedsim.data.images``) is imported. ``fedsim.experiments`` runs everything and may
import all of it.
"""

import ast
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

TOP = {"fedsim", "fedsim.errors", "fedsim.registry", "fedsim.config", "fedsim.messages"}
CORE = {"fedsim.data", "fedsim.dp", "fedsim.models", "fedsim.results"}
# package -> the fedsim packages it may import (besides its own modules)
ALLOWED = {
    "fedsim": TOP,
    "fedsim.config": TOP,
    "fedsim.data": TOP,
    "fedsim.dp": TOP,
    "fedsim.models": TOP | {"fedsim.data", "fedsim.dp"},
    "fedsim.results": TOP | {"fedsim.dp"},  # the frontier composes the ledgers it reads
    "fedsim.clients": TOP | CORE,
    "fedsim.server": TOP | CORE,
    "fedsim.experiments": TOP | CORE | {"fedsim.clients", "fedsim.server"},
}
FOLDERS = {
    "clients": "fedsim.clients",
    "server": "fedsim.server",
    "experiments": "fedsim.experiments",
}


def package_of(path):
    """The fedsim package a source file belongs to (``fedsim`` for the top modules)."""
    parts = path.relative_to(ROOT).parts
    if parts[0] in FOLDERS:
        return FOLDERS[parts[0]]
    return "fedsim" if len(parts) == 2 else f"fedsim.{parts[1]}"


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def face(module):
    """The package face an import reaches: fedsim.data.images -> fedsim.data."""
    parts = module.split(".")
    name = ".".join(parts[:2])
    return (
        name if name in CORE | {"fedsim.clients", "fedsim.server", "fedsim.experiments"} else module
    )


def sources():
    for folder in ("fedsim", *FOLDERS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "research" not in path.parts:
                yield path


@pytest.mark.parametrize("path", list(sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way_through_public_faces(path):
    package = package_of(path)
    for module in imported_modules(path):
        top = module.split(".")[0]
        assert top not in FOLDERS, f"imports {module}: use fedsim.{module}"
        if top != "fedsim" or face(module) == package or module.startswith(f"{package}."):
            continue
        assert face(module) in ALLOWED[package] | {"fedsim"}, f"{package} must not import {module}"
        if face(module) in CORE:  # the apps (fedsim.server.server_app, ...) are named whole
            assert face(module) == module, f"import {face(module)}, not {module}"


def test_every_package_is_installed():
    # a package missing from pyproject's list works in a checkout and fails once installed
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        package_of(init) if init.parent.parent != ROOT else FOLDERS.get(init.parent.name, "fedsim")
        for init in sources()
        if init.name == "__init__.py"
    }
    assert found == listed


def test_report_reads_files_only():
    for name in ("report.py", "frontier.py"):
        imported = {m.split(".")[0] for m in imported_modules(ROOT / "fedsim/results" / name)}
        assert not {"flwr", "torch", "opacus"} & imported, name


def test_validating_a_config_imports_neither_torch_nor_flower():
    code = (
        "import sys; from fedsim.config import parse_config; "
        "parse_config({'model': 'lstm', 'dataset': 'shakespeare'}); "
        "print(sorted({'torch', 'flwr', 'opacus', 'ray'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_client_worker_does_not_import_the_accountants():
    # every simulation worker imports the client app as it starts; the server accounts
    code = (
        "import sys; import fedsim.clients.client_app; "
        "print(sorted({'dp_accounting', 'fedsim.dp.accounting'} & set(sys.modules))); "
        "from fedsim.dp import accounting, history_epsilon; "
        "print(history_epsilon is accounting.history_epsilon)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["[]", "True"], out.stdout + out.stderr


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


def installed_layout(into: Path) -> Path:
    """The import namespace as installed (``clients/`` as ``fedsim/clients``...), by links.

    The checkout maps ``clients/``, ``server/`` and ``experiments/`` into ``fedsim`` (the
    package-dir table in pyproject.toml), which a type checker cannot follow.
    """
    package = into / "fedsim"
    package.mkdir()
    for entry in (ROOT / "fedsim").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for folder in ("clients", "server", "experiments"):
        (package / folder).symlink_to(ROOT / folder)
    return package


def test_types_check(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy not installed (./install.sh --dev installs it)")
    installed_layout(tmp_path)
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "fedsim", "--exclude", "fedsim/experiments/research",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(ROOT / ".mypy_cache"),
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
