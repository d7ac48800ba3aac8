"""The run's own Ray: started on its own thread, its workers warm, nothing left behind."""

import os
import subprocess
import sys

import pytest
import ray
import ray._private.ray_constants as ray_constants
import ray._private.utils as ray_utils

from fedsim.config import parse_config
from fedsim.errors import FedsimError
from fedsim.experiments import raystart
from fedsim.experiments.procs import RUN_TAG_VAR, tagged
from fedsim.experiments.raystart import RayStart
from tests.conftest import ROOT

PRELOADED = (
    "fedsim.clients.client_app",
    "flwr.simulation.ray_transport.ray_actor",
    "torch._dynamo",
)


@pytest.mark.slow
def test_a_local_ray_s_workers_import_the_client_app_before_their_first_call():
    class Probe:  # a local class travels by value: it imports nothing in the worker
        def modules(self, names):
            return {name: name in sys.modules for name in names}

        def tag(self):
            return os.environ.get(RUN_TAG_VAR)

        def niceness(self):
            return os.nice(0)

        def datasets(self):  # loaded into the clients' cache before any client asked
            from fedsim.clients import task

            return task._dataset.cache_info().currsize

    config = parse_config({"num-clients": 2, "clients-per-round": 2})
    with RayStart(config) as started:
        started.ready()
        probe = ray.remote(num_cpus=1)(Probe).remote()  # an actor, as Flower's clients are
        found = ray.get(probe.modules.remote(PRELOADED), timeout=120)
        assert found == dict.fromkeys(PRELOADED, True)
        assert ray.get(probe.tag.remote()) == started.tag
        # as the command's own, not Ray's 15: beside a busy process, a client got a 36th
        # of a core's share
        assert ray.get(probe.niceness.remote()) == os.nice(0)
        assert ray.get(probe.datasets.remote()) == 1
    assert not ray.is_initialized()
    assert tagged(started.tag, var=RUN_TAG_VAR) == []  # every process of the run is gone
    assert RUN_TAG_VAR not in os.environ


def test_a_ray_that_fails_to_start_raises_in_ready_and_restores_everything(monkeypatch):
    def broken(**kwargs):
        assert ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER is True
        raise ConnectionError("no Ray here")

    monkeypatch.setattr(ray, "init", broken)
    handler = ray_utils.set_sigterm_handler
    with RayStart(parse_config({})) as started:
        assert os.environ[RUN_TAG_VAR] == started.tag
        with pytest.raises(ConnectionError, match="no Ray here"):
            started.ready()
    assert RUN_TAG_VAR not in os.environ
    assert ray_utils.set_sigterm_handler is handler
    assert ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER is False


WARM_DESPITE_A_FAILING_IMPORT = """
import sys

class Failing:
    def find_spec(self, name, path=None, target=None):
        if name == "torch._dynamo":
            raise RuntimeError("a module that fails as it imports")

sys.meta_path.insert(0, Failing())
import fedsim.clients.warm
print("fedsim.clients.client_app" in sys.modules, "torch._dynamo" in sys.modules)
"""


def test_the_preload_never_fails_a_worker():
    # Ray takes any error but an ImportError in a preloaded module as the worker's crash
    result = subprocess.run(
        [sys.executable, "-c", WARM_DESPITE_A_FAILING_IMPORT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


def test_a_ray_already_running_in_the_process_is_refused_with_one_line(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with pytest.raises(FedsimError, match="Ray already runs in this process"):
        RayStart(parse_config({})).__enter__()
    assert RUN_TAG_VAR not in os.environ


def test_a_failing_clean_up_warns_and_the_run_s_own_outcome_stands(monkeypatch, capsys):
    def unlistable(spare, tag):
        raise OSError(9, "Bad file descriptor", "/proc")

    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(raystart, "kill_run_processes", unlistable)
    with RayStart(parse_config({})) as started:  # a run that finished
        started.ready()
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("fedsim: warning: stopping Ray failed ([Errno 9] Bad file")
    assert f"{RUN_TAG_VAR}={started.tag}" in warning and len(warning.splitlines()) == 1
    with pytest.raises(FedsimError, match="the run's own error"), RayStart(parse_config({})):
        raise FedsimError("the run's own error")  # not the clean-up's
    assert RUN_TAG_VAR not in os.environ
