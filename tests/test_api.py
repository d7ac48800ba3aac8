"""The Python API and parts of your own, as the README shows them."""

import os
import re
import subprocess
import sys

import pytest

import fedsim
from fedsim.config import parse_config
from fedsim.errors import FedsimError, RunInterrupted, RunStopped
from fedsim.experiments import api
from tests.conftest import ROOT


def readme_example():
    """The two Python blocks of the README's 'Python API' section: nets.py and a script."""
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the README's example is nets.py and a script"
    return blocks


@pytest.mark.slow
def test_readme_example_runs_from_a_folder_outside_the_repository(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outside")
    assert ROOT not in folder.parents
    nets, script = readme_example()
    (folder / "nets.py").write_text(nets)
    (folder / "example.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed fedsim
    result = subprocess.run(
        [sys.executable, "example.py"], cwd=folder, capture_output=True, text=True,
        timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"accuracy [01]\.\d+ at ε = [0-4]\.\d+", result.stdout), result.stdout
    assert (folder / "blobs-run" / "summary.json").is_file()


def test_own_parts_are_imported_when_the_config_is_checked(tmp_path, monkeypatch):
    nets, _ = readme_example()
    (tmp_path / "nets.py").write_text(nets)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config({"model": "nets:MLP", "dataset": "nets:blobs"})
    assert config.own_parts == ["nets:MLP", "nets:blobs"]
    (tmp_path / "broken_syntax.py").write_text("class M(:\n")
    (tmp_path / "broken_raise.py").write_text("raise RuntimeError('config missing')\n")
    (tmp_path / "broken_dep.py").write_text("import nonexistent_dep_xyz\n")
    cases = {
        "nets:MLPP": "nets has no attribute MLPP (the module found is",
        "nosuch.module:X": "cannot import nosuch.module",
        "mlp": "unknown model 'mlp'",
        # your module's own error is yours to fix, not fedsim's internal one
        "broken_syntax:M": "importing broken_syntax failed (SyntaxError: invalid syntax",
        "broken_raise:M": "importing broken_raise failed (RuntimeError: config missing)",
        "broken_dep:M": "it imports nonexistent_dep_xyz, which cannot be found",
    }
    for name, needle in cases.items():
        with pytest.raises(FedsimError, match=re.escape(needle)) as info:
            parse_config({"model": name})
        assert "\n" not in str(info.value)
    with pytest.raises(FedsimError, match=r"model nets:MLP cannot learn dataset sst2.*task image"):
        parse_config({"model": "nets:MLP", "dataset": "sst2"})


def test_a_model_that_declares_an_unknown_task_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "bags.py").write_text(
        "class Text:\n    tasks = ('text',)\n\n\n"
        "class One:\n    tasks = 'text-classification'\n\n\n"
        "class Loose:\n    tasks = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("bags:Text", "bags:Loose"):
        with pytest.raises(FedsimError, match=r"its tasks attribute is .*'next-char'") as info:
            parse_config({"model": name, "dataset": "sst2"})
        assert "\n" not in str(info.value)
    # one task named as a string is that task, not its letters
    assert parse_config({"model": "bags:One", "dataset": "sst2"}).model == "bags:One"


def test_a_strategy_that_is_no_strategy_is_refused_before_any_folder(tmp_path, monkeypatch):
    nets, _ = readme_example()
    (tmp_path / "nets.py").write_text(nets)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FedsimError, match="strategy 'nets:MLP': MLP has no configure_train"):
        parse_config({"strategy": "nets:MLP"})


def test_a_stopped_run_leaves_a_script_s_loop_as_ctrl_c_does(monkeypatch, tmp_path):
    """``except Exception`` around runs must not turn a Ctrl-C into 'next run, please'."""

    def stopped(*args, **kwargs):
        raise RunInterrupted("stopped by SIGINT; continue with: fedsim run --resume x", 2)

    monkeypatch.setattr(api, "run_experiment", stopped)
    went_on = []
    with pytest.raises(RunStopped, match="continue with") as caught:
        for eps in (1, 4):
            try:
                fedsim.run(config={"target-epsilon": eps}, out=tmp_path / f"r{eps}")
            except Exception:
                went_on.append(eps)
    assert went_on == [] and isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.signum == 2
