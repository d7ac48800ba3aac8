"""Property tests: any config either runs or fails with one line, never worse."""

import os
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.config import FedsimConfig, parse_config
from fedsim.errors import FedsimError
from fedsim.experiments.run import preflight
from tests.conftest import ROOT

KEYS = [*sorted(f.alias for f in FedsimConfig.model_fields.values()), "num-client", "bogus"]
WORDS = ["iid", "dirichlet", "shards", "none", "sample", "rdp", "prv", "cnn", "digits", "mnist"]
VALUES = st.one_of(
    st.integers(-3, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=6),
    st.booleans(),
)


@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
@settings(max_examples=300, deadline=None)
def test_config_and_preflight_fail_with_one_line(values):
    try:
        preflight(parse_config(values))
    except FedsimError as exc:
        assert str(exc) and "\n" not in str(exc)


SMALL_RUNS = st.fixed_dictionaries(
    {
        "num-rounds": st.sampled_from([1, 0]),
        "num-clients": st.integers(1, 3),
        "clients-per-round": st.integers(1, 3),
        "batch-size": st.sampled_from([64, 128, -1]),
        "dp": st.sampled_from(["sample", "none", "maybe"]),
        "partition": st.sampled_from(["iid", "dirichlet", "shards"]),
        "dirichlet-alpha": st.sampled_from([0.5, 0.0]),
        "target-epsilon": st.sampled_from([2.0, 0.0]),
        "client-cpus": st.just(2),  # one Ray worker hosts the clients: 12 s less CPU a run
    }
)


@given(SMALL_RUNS)
@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_cli_runs_or_fails_cleanly(tmp_path_factory, values):
    cwd = tmp_path_factory.mktemp("prop")
    args = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    result = subprocess.run(
        [sys.executable, "-m", "fedsim.experiments.cli", "run", "--out", "out", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode in (0, 2), result.stderr
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert sorted(p.name for p in cwd.iterdir()) == []
    else:
        assert (cwd / "out" / "summary.json").is_file()
        assert [p.name for p in cwd.iterdir()] == ["out"]
