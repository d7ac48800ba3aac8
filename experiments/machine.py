"""Whether this machine can give a run the CPUs and GPUs its config asks of it.

Torch-free, so that the ``fedsim`` command can check before it starts Ray and imports
the engine: a CPU build of torch (``+cpu`` in its version, what ``./install.sh`` installs
without a GPU) cannot have a GPU, and saying so takes a second, not the 14 s of starting
and stopping Ray. A CUDA build is asked again once torch is imported (``cuda_available``).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable

from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError


def check_machine(
    config: FedsimConfig, *, cuda_available: Callable[[], bool] | None = None
) -> None:
    """Refuse a local run this machine cannot host, in one line.

    ``cuda_available``: torch's own question (``torch.cuda.is_available``), where torch is
    imported, asked only when the config wants GPUs; ``None`` decides from the installed
    torch's build alone (only a CPU build is a certain no). A Ray cluster's resources are
    the cluster's: nothing is checked for ``ray-address``.
    """
    if config.ray_address:
        return
    if config.client_gpus > 0:
        found = cuda_available() if cuda_available is not None else not cpu_build_of_torch()
        if not found:
            raise FedsimError(
                f"client-gpus={config.client_gpus} but no CUDA GPU is visible; "
                "set client-gpus=0 or install a CUDA build of torch"
            )
    cpus = os.cpu_count() or 1
    if config.client_cpus > cpus:
        raise FedsimError(
            f"client-cpus={config.client_cpus} exceeds this machine's {cpus} CPUs; "
            f"set client-cpus to at most {cpus}"
        )


def cpu_build_of_torch() -> bool:
    """Whether the installed torch is a CPU-only build (its version ends in ``+cpu``)."""
    try:
        return importlib.metadata.version("torch").endswith("+cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
