"""fedsim: federated, differentially private learning on Flower and Opacus.

Data moves one way through the package: ``config`` -> ``data`` (datasets, partitions)
-> client training (``fedsim.clients``, with ``dp``) -> server aggregation and
accounting (``fedsim.server``) -> ``results`` (files, report). ``fedsim.experiments``
runs it all; its API is here::

    import fedsim

    result = fedsim.run(num_rounds=5)  # or a FedsimConfig, a dict, a TOML file's path
    print(result.accuracy, result.epsilon)
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# In the repository clients/, server/ and experiments/ sit beside this folder (the
# top-level layout is fixed); installed, they sit inside it. A checkout (or the copy of
# it that `flwr run` ships) has pyproject.toml one level up: look for them there too.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "server").is_dir():
    __path__.append(str(_checkout))

# name -> the module that defines it. Imported on first use, so that `import fedsim` and
# validating a config stay light; running imports torch and Flower.
_API = {
    "run": "fedsim.experiments.api",
    "resume": "fedsim.experiments.api",
    "sweep": "fedsim.experiments.api",
    "deploy": "fedsim.experiments.api",
    "load": "fedsim.experiments.api",
    "FedsimConfig": "fedsim.config",
    "as_config": "fedsim.config",
    "FedsimError": "fedsim.errors",
    "RunStopped": "fedsim.errors",
    "Dataset": "fedsim.data",
    "Result": "fedsim.results",
    "RoundRow": "fedsim.results",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """The API's functions and types, imported when first asked for (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'fedsim' has no attribute '{name}'")
    return getattr(importlib.import_module(_API[name]), name)
