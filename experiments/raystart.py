"""A simulation's own Ray, started early on a thread of its own, with its workers warm.

Ray's start used to come after everything else, and each worker's imports came later
still: the driver loaded the data and built the server, Flower's engine then started
Ray (3–5 s), then one worker process per client slot, and each worker imported torch,
Opacus and Flower (5–10 s) only when round 1's first message reached it. Round 1 paid
for all of it. ``RayStart`` starts Ray early: ``fedsim run`` before it imports the engine,
the Python API as soon as the run's folder is claimed, while the driver builds the
server and evaluates round 0. Flower finds Ray running and uses it.
A local Ray's workers import the client app as they start
(``preload_python_modules``), and Flower's actors are placed in those warm workers.

``ray.init`` runs on a thread that lives until Ray is shut down: Ray's processes die
with the thread that started them (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
import ray._private.utils as ray_utils

from fedsim.config import FedsimConfig
from fedsim.data import PRELOAD_VAR
from fedsim.errors import FedsimError
from fedsim.experiments.procs import RUN_TAG_VAR, descendants
from fedsim.experiments.signals import kill_run_processes, run_environment

WORKER_PRELOAD = "fedsim.clients.warm"  # what each worker of a local Ray imports first
RAY_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")  # where `ray start` leaves its address
RAY_CONNECT_TIMEOUT_S = 5.0


def ray_init_args(config: FedsimConfig, *, verbose: bool) -> dict[str, Any]:
    """The arguments of ``ray.init`` for ``config``.

    ``ray-address`` "" passes "local": a new Ray of this run's own, even where
    ``RAY_ADDRESS`` is set or ``ray start`` left a cluster running on this machine (Ray
    would join those otherwise). It gets only the CPUs of the run's
    ``simulation_workers`` (Flower starts as many workers as the CPUs fit: 16 on a
    16-core machine, whatever the run needs), and its workers import
    ``WORKER_PRELOAD`` as they start. Ray starts one worker per CPU ahead of time, unless
    fewer actors than CPUs are certain (``client-cpus`` above 1 on CPUs alone). Any
    other address is handed to ``ray.init(address=...)``, with the driver's ``sys.path``
    for the cluster's workers, as Flower would pass it; a running cluster takes no
    settings of ours.
    """
    args: dict[str, Any] = {
        "address": config.ray_address or "local",
        "logging_level": "INFO" if verbose else "ERROR",
        "log_to_driver": verbose,
        "include_dashboard": False,
    }
    if config.ray_address:
        args["runtime_env"] = {"env_vars": {"PYTHONPATH": driver_path()}}
        return args
    needed = math.ceil(config.simulation_workers * config.client_cpus)
    args["num_cpus"] = min(os.cpu_count() or 1, needed)
    # no runtime_env here: one would keep Flower's actors out of the workers that Ray
    # starts (and warms) with the cluster; they inherit PYTHONPATH instead
    # Ray runs its workers at nice 15, and here they do the run's work: beside any busy
    # process (another run, a test suite, an editor) they got a 36th of a core's share
    # (28 s runs took 235 s); at 0 they inherit the niceness the command was started with
    args["_system_config"] = {"preload_python_modules": [WORKER_PRELOAD], "worker_niceness": 0}
    if config.client_gpus == 0 and config.client_cpus > 1:
        # Ray starts a worker per CPU as the driver connects, and each imports the client
        # app (10 s of CPU); Flower makes an actor per client-cpus CPUs, so the others
        # would sit idle. Then the actors' own workers start as Flower makes them.
        args["_system_config"]["prestart_worker_first_driver"] = False
    return args


def driver_path() -> str:
    """The driver's ``sys.path`` as a PYTHONPATH, so that workers import what it imports.

    Your own parts (``"mymodels:MLP"``) import from the folder you run in; the workers
    are other processes and see only what their PYTHONPATH names. This is the value
    Flower's engine would set.
    """
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*sys.path, inherited] if inherited else sys.path)


def check_ray_address(address: str) -> None:
    """Fail in seconds where nothing answers at ``address`` (Ray itself retries for minutes).

    ``auto`` needs the cluster file ``ray start`` writes; ``[ray://]HOST:PORT`` an open port.
    """
    if address == "auto":
        if not os.environ.get("RAY_ADDRESS") and not RAY_CLUSTER_FILE.is_file():
            raise FedsimError(
                "ray-address='auto' but no Ray cluster runs on this machine; start one with "
                "`ray start --head`, or set ray-address='' for a Ray of the run's own"
            )
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise FedsimError(
            f"ray-address='{address}': nothing answers there within "
            f"{RAY_CONNECT_TIMEOUT_S:g} s ({exc.strerror or exc}); start the Ray head with "
            "`ray start --head`, or set ray-address='' for a Ray of the run's own"
        ) from None


class RayStart:
    """The run's own Ray: started on entering, shut down on leaving.

    Every process it starts carries ``RUN_TAG_VAR = tag`` in its environment. Leaving
    shuts Ray down and stops every process the run started: those below this one that
    were not there before (``spare``), and, by the tag, those orphaned when Ray's
    raylet died before them.
    """

    def __init__(self, config: FedsimConfig, *, verbose: bool = False) -> None:
        self.config = config
        self.init_args = ray_init_args(config, verbose=verbose)
        self.spare: set[int] = set()
        self.tag = ""
        self._error: BaseException | None = None
        self._started = threading.Event()
        self._release = threading.Event()
        self._owner = threading.Thread(target=self._own, name="fedsim-ray", daemon=True)
        self._restore = ExitStack()

    def __enter__(self) -> RayStart:
        if ray.is_initialized():
            raise FedsimError(
                "Ray already runs in this process, and a run starts its own; call "
                "ray.shutdown() first, or set ray-address to run on a Ray cluster"
            )
        if self.config.ray_address:
            check_ray_address(self.config.ray_address)
        self.spare = set(descendants(os.getpid()))
        self.tag = f"{os.getpid()}-{secrets.token_hex(8)}"
        env = {RUN_TAG_VAR: self.tag}
        # opt in to Ray's future behaviour now; it also silences Ray's warning about it
        env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = os.environ.get(
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"
        )
        if not self.config.ray_address:  # a cluster's workers get it by runtime_env
            env["PYTHONPATH"] = driver_path()
            env[PRELOAD_VAR] = json.dumps([self.config.dataset, self.config.data_dir])
        for name, value in env.items():
            self._restore.enter_context(run_environment(name, value))
        # ray.init would put its SIGTERM handler (exit at once, mid-round) in the run's
        # place, and fail off the main thread: the one function it does that through does
        # nothing meanwhile. Its C++ core would install absl's failure handler, which
        # takes SIGTERM as a crash, prints a stack and aborts (exit 134).
        self._patch(ray_utils, "set_sigterm_handler", _keep_handler)
        self._patch(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", True)
        self._owner.start()
        return self

    def ready(self) -> None:
        """Wait until Ray runs; raise what stopped it from starting."""
        self._started.wait()
        if self._error is not None:
            raise self._error

    def __exit__(self, *exc: object) -> None:
        self._started.wait()
        try:
            if ray.is_initialized():  # Flower shuts it down, unless an error skipped that
                ray.shutdown()
            kill_run_processes(self.spare, self.tag)  # workers can outlive the shutdown
        except Exception as error:
            # the run's outcome stands: a finished run stays finished, and a failed one
            # keeps its own error, whatever went wrong in the clean-up after it
            print(
                f"fedsim: warning: stopping Ray failed ({error}); processes of this run may "
                f"still run: their environment holds {RUN_TAG_VAR}={self.tag}",
                file=sys.stderr,
                flush=True,
            )
        finally:
            self._release.set()
            self._owner.join()
            self._restore.close()

    def _patch(self, module: object, name: str, value: object) -> None:
        self._restore.callback(setattr, module, name, getattr(module, name))
        setattr(module, name, value)

    def _own(self) -> None:
        try:
            ray.init(**self.init_args)
        except BaseException as exc:  # handed to the thread that waits in ready()
            self._error = exc
        finally:
            self._started.set()
        self._release.wait()  # Ray's processes die with this thread


def _keep_handler(handler: object) -> None:
    """Stands in for Ray's ``set_sigterm_handler``: the run's own handler stays."""
