"""fedsim: federated, differentially private learning on Flower and Opacus.

Data moves one way through the package: ``config`` -> ``data`` (datasets, partitions)
-> client training (``fedsim.clients``, with ``dp``) -> server aggregation and
accounting (``fedsim.server``) -> ``results`` (files, report). ``fedsim.experiments``
runs it all: ``run``, ``sweep``, ``deploy`` and the ``fedsim`` command.
"""

from pathlib import Path

__version__ = "0.1.0"

# In the repository clients/, server/ and experiments/ sit beside this folder (the
# top-level layout is fixed); installed, they sit inside it. A checkout (or the copy of
# it that `flwr run` ships) has pyproject.toml one level up: look for them there too.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "server").is_dir():
    __path__.append(str(_checkout))
