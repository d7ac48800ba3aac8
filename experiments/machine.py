"""Whether this machine can give a run the CPUs and GPUs its config asks of it.

Torch-free, so that the ``fedsim`` command can check before it starts Ray and imports
the engine, in a second, not the 14 s of starting and stopping Ray. Without torch, a GPU is
certainly absent where torch is a CPU build (``+cpu`` in its version, what ``./install.sh``
installs without a GPU), where ``CUDA_VISIBLE_DEVICES`` hides every device, on a Mac, and on
Linux where no NVIDIA device file exists (``/dev/nvidia0``…; WSL's ``/dev/dxg``), which a
CUDA build (PyPI's default on Linux) cannot run without. Anything else is asked again once
torch is imported (``cuda_available``).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable
from pathlib import Path

from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError


def check_machine(
    config: FedsimConfig, *, cuda_available: Callable[[], bool] | None = None
) -> None:
    """Refuse a local run this machine cannot host, in one line.

    ``cuda_available``: torch's own question (``torch.cuda.is_available``), where torch is
    imported, asked only when the config wants GPUs; ``None`` refuses only where a GPU is
    certainly absent (:func:`why_no_cuda`). A Ray cluster's resources are the cluster's:
    nothing is checked for ``ray-address``.
    """
    if config.ray_address:
        return
    if config.client_gpus > 0:
        if cuda_available is not None:
            why = None if cuda_available() else "torch sees none"
        else:
            why = why_no_cuda()
        if why is not None:
            raise FedsimError(
                f"client-gpus={config.client_gpus} but no CUDA GPU is visible ({why}); "
                "set client-gpus=0"
            )
    cpus = os.cpu_count() or 1
    if config.client_cpus > cpus:
        raise FedsimError(
            f"client-cpus={config.client_cpus} exceeds this machine's {cpus} CPUs; "
            f"set client-cpus to at most {cpus}"
        )


def why_no_cuda(dev: Path = Path("/dev")) -> str | None:
    """Why torch can certainly see no CUDA GPU here, decided without importing it; else None.

    ``dev``: where the device files are (a test's folder in tests).
    """
    if cpu_build_of_torch():
        return "torch is a CPU build: install a CUDA build for a GPU"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.split(",")[0].strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    if sys.platform == "darwin":
        return "macOS has no CUDA"
    if sys.platform == "linux" and "+rocm" not in _torch_version():  # ROCm: /dev/kfd
        if not any(dev.glob("nvidia[0-9]*")) and not (dev / "dxg").exists():
            return f"no NVIDIA GPU device in {dev}"
    return None


def cpu_build_of_torch() -> bool:
    """Whether the installed torch is a CPU-only build (its version ends in ``+cpu``)."""
    return _torch_version().endswith("+cpu")


def _torch_version() -> str:
    """The installed torch's version, ``""`` where none is installed."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""
